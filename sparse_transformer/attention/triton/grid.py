"""Launch grids: the order in which a kernel's programs, one per (tile, batch x head), start.

Heads go in groups and, inside a group, the tile order is the slow index: every head's longest tile (row or column of
the tile table) starts first, then every head's next, so the longest ones never start last and run alone at the end.
The forward and dQ kernels interleave every head. dK/dV programs stream their head's Q and dO, so they interleave only
as many heads as the device's L2 holds of that, in equal groups (a short last group would start its longest tiles
last). The grid is (group, tiles, heads / group), read back by common._program_tile without divisions; more tiles than
y allows (n > 4M at 64-row tiles) go on x, one head after another (T_ON_X).

Measured on an H200 (python bench/dev_probe.py order, bench/results/dev-order-20261130*.json, graph-replayed fwd+bwd,
a 1-D grid that mapped programs with divisions): from one head after another to every head interleaved, fixed-12k
1.424 -> 1.260 ms, fixed-64k 7.734 -> 7.240 (7.082 with the dK/dV groups of the rule below: 2 heads), strided-12k
0.537 -> 0.532, strided-64k 1.721 -> 1.683, strided-3k 0.260 -> 0.255. fixed-12k's dK/dV in groups of 12 + 4 heads:
537 us, against 424 in one group of 16. In one process on strided-12k the 1-D grid took 0.534 ms against 0.513 for
the kernels before it (dev-order-20261130-ab-*.json); the 3-D grid, without its divisions, took 0.510 in the next
device run's bench attention.
"""
from __future__ import annotations

import torch

HEAD_GROUP = None  # an int overrides the rule for every kernel (rounded down to a divisor of batch x heads)
MAX_GRID_Y = MAX_GRID_Z = 65535
_DEFAULT_L2 = 50 << 20  # H100 / H200; used where the device does not say (the interpreter on the CPU)
_L2: dict = {}
_GRIDS: dict = {}


def l2_bytes(device) -> int:
    """The device's L2 cache size in bytes (cached)."""
    key = (device.type, device.index)
    if key not in _L2:
        size = 0
        if device.type == "cuda":
            size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        _L2[key] = size or _DEFAULT_L2
    return _L2[key]


def program_grid(nt: int, bh: int, stream_bytes: int | None = None, device=None) -> tuple[tuple, int, bool]:
    """(grid, group, T_ON_X) for nt tiles x bh heads. stream_bytes: what one head's programs stream (None: interleave
    every head); device: whose L2 holds it."""
    key = (nt, bh, stream_bytes, device, HEAD_GROUP, MAX_GRID_Y)
    hit = _GRIDS.get(key)
    if hit is None:
        if len(_GRIDS) > 4096:
            _GRIDS.clear()
        hit = _GRIDS[key] = _program_grid(nt, bh, stream_bytes, device)
    return hit


def _program_grid(nt, bh, stream_bytes, device):
    if HEAD_GROUP is not None:
        group = HEAD_GROUP
    elif stream_bytes is None:
        group = bh
    else:
        group = l2_bytes(device or torch.device("cpu")) // stream_bytes
    group = max(1, min(bh, group))
    while bh % group:
        group -= 1
    grid, t_on_x = ((nt, 1, bh), True) if nt > MAX_GRID_Y else ((group, nt, bh // group), False)
    if grid[2] > MAX_GRID_Z:
        raise ValueError(f"batch x heads = {bh} is too many for one launch (at most {MAX_GRID_Z} "
                         f"{'per program group' if not t_on_x else 'with more than 65535 tiles per head'})")
    return grid, group, t_on_x
