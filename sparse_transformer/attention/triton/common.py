"""Device helpers shared by the forward and backward kernels: index maps and the element rule.

Legend: p a slot in a segment's order, i / j sequence positions of queries / keys, L stride, C chunk or group size.
KIND 0 natural (p = i), 1 transposed (i = (p % C) * L + p // C, the paper's column-major view of a [C, L] matrix),
2 gather (keys only: j = (p // C) * L + lo + p % C, the summary cells of every block packed together).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Column indices of the per-head rule table (see layouts.P_* and plan.P_STR_MIN / P_SUM_EXCL); constexpr globals so
# that jit functions can read them.
P_ALL, P_WIN, P_BLK, P_STR, P_SUM_L, P_SUM_LO, P_SUM_HI, P_CUSTOM, P_STR_MIN, P_SUM_EXCL = (tl.constexpr(c) for c in
                                                                                          range(10))
NUM_SEG_PARAMS = tl.constexpr(10)


# Program order over (tile, batch x head): heads go in groups and, inside a group, the tile order is the slow index
# (every head's longest tile, then every head's next ...), so the longest rows (or columns) no longer start last. The
# forward and dQ interleave every head; dK/dV programs stream their head's Q and dO, so they interleave only as many
# heads as the L2 (50 MB on an H100 / H200) holds of that, in equal groups. H200, python bench/dev_probe.py order
# (bench/results/dev-order-20261130*.json), graph fwd+bwd from one head after another to every head interleaved:
# fixed-12k 1.424 -> 1.260 ms, fixed-64k 7.734 -> 7.240 (7.112 with dK/dV in groups of 2 heads), strided-12k 0.537 ->
# 0.532, strided-64k 1.721 -> 1.683, strided-3k 0.260 -> 0.255. A short last group measured slower (fixed-12k dK/dV in
# groups of 12 + 4 heads: 537 us, against 424 in one group of 16). HEAD_GROUP (an int) overrides the rule everywhere
# (rounded down to a divisor).
HEAD_GROUP = None
L2_STREAM_BYTES = 50 << 20


def head_group(bh: int, stream_bytes: int | None = None) -> int:
    """Heads per group for a grid of bh heads, a divisor of bh; stream_bytes: what one head's programs stream (None:
    interleave every head)."""
    if HEAD_GROUP is not None:
        group = HEAD_GROUP
    else:
        group = bh if stream_bytes is None else L2_STREAM_BYTES // stream_bytes
    group = max(1, min(bh, group))
    while bh % group:  # equal groups: a short last group would start its longest tiles last
        group -= 1
    return group


MAX_GRID_Y = 65535


def program_grid(nt: int, bh: int, group: int):
    """Launch grid of nt tiles x bh heads in groups of `group` (a divisor of bh) and the T_ON_X constexpr: (group, nt,
    bh / group) with the tile order on y; more than 65535 tiles (y's limit; n > 4M at 64-row tiles) keep one head's
    tiles after another on x, (nt, 1, bh)."""
    return ((nt, 1, bh), True) if nt > MAX_GRID_Y else ((group, nt, bh // group), False)


@triton.jit
def _program_tile(GROUP, T_ON_X: tl.constexpr):
    """(tile order, batch x head index) of this program in a program_grid."""
    if T_ON_X:
        return tl.program_id(0), tl.program_id(2)
    return tl.program_id(1), tl.program_id(2) * GROUP + tl.program_id(0)


@triton.jit
def _program_head(bh, H, TH, prm_ptr):
    """Batch and head of a program (64-bit: B * H * N * D may pass 2^31), its table head, rule row and summary offset."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    th = h % TH
    prm = prm_ptr + th * NUM_SEG_PARAMS
    return b, h, th, prm, tl.load(prm + P_SUM_LO)


@triton.jit
def _query_positions(p, N, NQ, SEG_L, SEG_C, KIND: tl.constexpr):
    if KIND == 1:
        i = (p % SEG_C) * SEG_L + p // SEG_C
    else:
        i = p
    return i, (p < NQ) & (i < N)


@triton.jit
def _key_positions(p, N, NK, SEG_L, SEG_C, lo, KIND: tl.constexpr):
    if KIND == 1:
        j = (p % SEG_C) * SEG_L + p // SEG_C
    elif KIND == 2:
        j = (p // SEG_C) * SEG_L + lo + p % SEG_C
    else:
        j = p
    return j, (p < NK) & (j < N)


@triton.jit
def _tile_mask(i, j, pq, pk, k_ok, prm, SEG_C, KIND: tl.constexpr, HAS_DENSE: tl.constexpr,
               HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr, HAS_SUM: tl.constexpr):
    """The segment's element rule on a partial tile. i, pq: query positions / slots as a column [BM, 1]; j, pk, k_ok:
    key positions / slots / validity as a row [1, BN]. Per-element work is compares only: divisions act on vectors."""
    if KIND == 1:  # transposed strided part: causal inside a chunk, in slot order (the diagonal is dropped when the
        # band holds it: P_STR_MIN > 0)
        strict = (tl.load(prm + P_STR_MIN) > 0).to(tl.int32)
        vis = ((pq // SEG_C) == (pk // SEG_C)) & (pk + strict <= pq) & (tl.load(prm + P_STR) > 0)
    else:
        d = i - j
        vis = d < 0  # all False, with the broadcast shape
        if HAS_DENSE:  # dense causal and custom tiles: inside a tile that is on, only causality remains
            vis = vis | ((tl.load(prm + P_ALL) + tl.load(prm + P_CUSTOM)) > 0)
        if HAS_WIN:
            win = tl.load(prm + P_WIN)
            vis = vis | ((win > 0) & (d < win))
        if HAS_BLK:
            blk = tl.load(prm + P_BLK)
            blk1 = tl.maximum(blk, 1)
            vis = vis | ((blk > 0) & (i // blk1 == j // blk1))
        if HAS_SUM:
            sl = tl.load(prm + P_SUM_L)
            sl1 = tl.maximum(sl, 1)
            r = j % sl1
            insum = (sl > 0) & (r >= tl.load(prm + P_SUM_LO)) & (r < tl.load(prm + P_SUM_HI))
            excl = (tl.load(prm + P_SUM_EXCL) > 0) & (i // sl1 == j // sl1)
            vis = vis | (insum & ~excl)
        vis = vis & (d >= 0)
    return vis & k_ok
