"""Attention of one new query per sequence over a key/value cache, reading only the keys the layout allows.

Legend: B batch, H heads, T cache length (>= t + 1), Dk / Dv query-key / value width, t the new query's position,
L stride, C summary size, W window.

Cached decoding (paper section 7's samples) asks, at every step, for one row of the layout: the keys j <= t that query t
sees. For every pattern of the paper that row is a contiguous *range* plus a regular *grid* of keys:

    range   all: [0, t]   window W: [t - W + 1, t]   block L: [t // L * L, t]
    grid    stride L:  j = t % L + m L           (one key per earlier block)
            summary (L, lo, hi):  j = m L + lo + r, 0 <= r < hi - lo   (the summary cells of every block)

with grid keys inside the range dropped (they are counted once). A row of the strided or fixed pattern holds
O(sqrt(n)) keys, so a decode step reads O(sqrt(n)) cache rows per head instead of O(n). `decode_params` writes
each head's range and grid as six integers; the Triton kernel (triton/decode.py) and the torch path below both
enumerate keys from them, so they need no per-step index tables. Custom (block-mask) heads are enumerated from their
tiles on the torch path.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from ..layouts import Layout
from .plan import LRUCache

R_NONE, R_ALL, R_WINDOW, R_BLOCK = range(4)  # range kinds
G_NONE, G_STRIDE, G_SUMMARY = range(3)  # grid kinds
NUM_DECODE_PARAMS = 6  # range kind, range width, grid kind, grid period, grid offset, grid run length


def decode_params(layout: Layout) -> torch.Tensor:
    """int32 [num_heads, 6]: (range kind, W or L, grid kind, period L, offset lo, run length) per head pattern.

    Raises ValueError for custom heads (their rows are not a range plus a grid; use `row_keys`)."""
    return torch.tensor([head_params(hp) for hp in layout.heads], dtype=torch.int32)


def head_params(hp) -> tuple[int, int, int, int, int, int]:
    """One `HeadPattern`'s row as (range kind, range width, grid kind, period, offset, run length)."""
    if hp.custom:
        raise ValueError("custom (block-mask) layouts have no range + grid form; decode them on the torch path")
    if hp.all:
        rng = (R_ALL, 0)
    elif hp.window:
        rng = (R_WINDOW, hp.window)
    elif hp.block:
        rng = (R_BLOCK, hp.block)
    else:
        rng = (R_NONE, 0)
    if hp.stride:
        grid = (G_STRIDE, hp.stride, 0, 1)
    elif hp.summary:
        L, lo, hi = hp.summary
        grid = (G_SUMMARY, L, lo, hi - lo)
    else:
        grid = (G_NONE, 1, 0, 0)
    return rng + grid


def row_keys(layout: Layout, head: int, t: int) -> np.ndarray:
    """int64 sorted array of the keys j that query t of head `head` sees (t < layout.n). O(keys), not O(n)."""
    hp = layout.heads[head % layout.num_heads]
    if hp.custom:
        b = layout.custom_block
        tiles = layout.custom_tiles[head % len(layout.custom_tiles)][t // b]
        cols = np.flatnonzero(tiles)
        keys = (cols[:, None] * b + np.arange(b)[None, :]).ravel()
        return keys[keys <= t].astype(np.int64)
    kind, width, gkind, period, lo, run = head_params(hp)
    start = _range_start(kind, width, t)
    keys = [np.arange(start, t + 1, dtype=np.int64)]
    if gkind != G_NONE:
        base = t % period if gkind == G_STRIDE else lo
        grid = (base + np.arange(t // period + 1, dtype=np.int64)[:, None] * period + np.arange(run)[None, :]).ravel()
        keys.append(grid[(grid <= t) & (grid < start)])
    return np.sort(np.concatenate(keys))


def _range_start(kind: int, width: int, t: int) -> int:
    if kind == R_ALL:
        return 0
    if kind == R_WINDOW:
        return max(t - width + 1, 0)
    if kind == R_BLOCK:
        return t // width * width
    return t + 1


def _padded_rows(layout: Layout, heads: int, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head pattern's row t as a padded index matrix [P, K] (P = 1 if shared, else heads) and its validity."""
    rows = [row_keys(layout, h, t) for h in range(1 if layout.num_heads == 1 else heads)]
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), dtype=np.int64)
    ok = np.zeros((len(rows), width), dtype=bool)
    for h, r in enumerate(rows):
        idx[h, :len(r)], ok[h, :len(r)] = r, True
    return torch.from_numpy(idx).to(device), torch.from_numpy(ok).to(device)


def is_dense(layout: Layout) -> bool:
    return all(hp.all for hp in layout.heads)


def decode_attention(q, k_cache, v_cache, layout: Layout, pos, scale: float | None = None, backend: str = "auto"):
    """Attention of the query at position `pos` over cache rows 0..pos, restricted to the layout's row `pos`.

    Args:
        q: [B, H, Dk], the new position's queries.
        k_cache, v_cache: [B, H, T, Dk] and [B, H, T, Dv] with rows 0..pos already written (row pos included).
        layout: the layer's layout (its n may exceed T; only the head patterns matter).
        pos: the query position, an int or a 1-element integer tensor on q's device (what CUDA graphs replay).
        backend: "auto" (Triton on CUDA, else torch), "triton", "torch", or "sdpa" (dense causal layouts only: SDPA
            over the cache).
    Returns: [B, H, Dv] in q's dtype. A query that sees no key gets zeros.

    Example:
        >>> from sparse_transformer import layouts
        >>> lay = layouts.strided(4096, 64)
        >>> k_cache, v_cache = torch.randn(2, 8, 4096, 64), torch.randn(2, 8, 4096, 64)
        >>> out = decode_attention(torch.randn(2, 8, 64), k_cache, v_cache, lay, pos=1000)  # reads 64 + 15 rows
    """
    _check(q, k_cache, v_cache, layout)
    if isinstance(pos, numbers.Integral):
        pos = int(pos)
        if not 0 <= pos < k_cache.shape[2]:
            raise ValueError(f"position {pos} is outside the cache (length {k_cache.shape[2]})")
    elif not (isinstance(pos, torch.Tensor) and pos.numel() == 1 and not pos.is_floating_point()):
        raise TypeError(f"pos must be an int or a 1-element integer tensor, got {pos!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        if is_dense(layout):
            backend = "sdpa"
        elif q.is_cuda and not any(hp.custom for hp in layout.heads):
            backend = "triton"
        else:
            backend = "torch"
    if backend == "sdpa":
        return dense_decode(q, k_cache, v_cache, pos, scale)
    if backend == "triton":
        from .triton.decode import attn_decode

        return attn_decode(q, k_cache, v_cache, _device_params(layout, q.device), _pos_tensor(pos, q), scale)
    if backend != "torch":
        raise ValueError(f"backend={backend!r} is not one of auto, triton, torch, sdpa")
    if isinstance(pos, torch.Tensor):  # its keys are picked on the host: a device position would need a sync
        raise ValueError("the torch decode path takes an int position (a tensor position is for CUDA graphs: use "
                         "backend 'auto' or 'triton' on CUDA)")
    return decode_torch(q, k_cache, v_cache, layout, pos, scale)


def decode_torch(q, k_cache, v_cache, layout: Layout, pos: int, scale: float):
    """Gather the row's keys, then a masked softmax in fp32 (the CPU path, and the fallback on GPU)."""
    B, H, _ = q.shape
    idx, ok = _padded_rows(layout, H, pos, q.device)  # (P, K)
    if idx.shape[0] == 1:
        k, v = k_cache[:, :, idx[0]], v_cache[:, :, idx[0]]  # (B, H, K, D)
    else:
        heads = torch.arange(H, device=q.device)[:, None]
        k, v = k_cache[:, heads, idx], v_cache[:, heads, idx]
    s = torch.einsum("bhd,bhkd->bhk", q.float(), k.float()) * scale
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no key: all -inf -> NaN -> 0
    return torch.einsum("bhk,bhkd->bhd", p, v.float()).to(q.dtype)


def dense_decode(q, k_cache, v_cache, pos, scale: float):
    """Dense causal decode through SDPA over the whole cache, rows after pos masked: the same operations for an int and
    a device position, so eager and CUDA-graph decoding agree bit for bit (a dense KV-cache step reads every row)."""
    pos = _pos_tensor(pos, q)
    mask = (torch.arange(k_cache.shape[2], device=q.device) <= pos.reshape(())).view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask, scale=scale)[:, :, 0]


_PARAMS = LRUCache(64)  # decode_params on each device, built once per layout


def _device_params(layout: Layout, device) -> torch.Tensor:
    return _PARAMS.get((layout.key, str(device)), lambda: decode_params(layout).to(device))


_POSITIONS = LRUCache(4)  # one host-to-device copy per step, shared by every layer


def _pos_tensor(pos, q) -> torch.Tensor:
    if isinstance(pos, torch.Tensor):
        return pos
    return _POSITIONS.get((int(pos), str(q.device)), lambda: torch.tensor([int(pos)], device=q.device))


def _check(q, k_cache, v_cache, layout):
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q must be [B, H, Dk] and the caches [B, H, T, D], got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    B, H, Dk = q.shape
    if k_cache.shape[:2] != (B, H) or v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[3] != Dk:
        raise ValueError(f"cache shapes k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)} do not fit "
                         f"q {tuple(q.shape)}")
    if layout.num_heads not in (1, H):
        raise ValueError(f"layout has {layout.num_heads} head patterns but q has {H} heads")
