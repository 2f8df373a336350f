"""Block-sparse attention in plain PyTorch: runs anywhere (CPU, or GPU without Triton), with autograd.

Legend: B batch, H heads, N sequence length, D head dim, BM/BN tiles, R key tiles per query tile (padded).

For each segment of the plan (natural / transposed / gather, see plan.py) the query tiles are processed in chunks: each
chunk gathers only the key tiles its rows need ([B, H, rows, R, BN, D]), applies the segment's element rule, and
computes a safe softmax. Chunks run under activation checkpointing when gradients are needed, so memory grows with one
chunk's active tiles, not with N^2. Segments are merged through their log-sum-exp.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..layouts import P_CUSTOM, Layout
from .plan import LRUCache, Segment, Tables, get_plan, segment_rule

CHUNK_ELEMENTS = 1 << 20  # score entries per chunk (B * H * rows * BM * R * BN): 4 MB in fp32, ~100 MB of mask temporaries


def attention_torch(q, k, v, layout: Layout, scale: float | None = None, block: int = 64):
    """q, k, v: [B, H, N, D]. Returns (out [B, H, N, D], lse [B, H, N] fp32)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if layout.custom_block:
        block = math.gcd(block, layout.custom_block)  # kernel tiles must nest inside the user's tiles
    parts = [_segment(q, k, v, layout, seg, tab, scale) for seg, tab in get_plan(layout, block, block, q.device)]
    out, lse = merge(parts)
    return out, lse.float()


def merge(parts):
    """Combine partial attentions over disjoint key sets: [(out, lse)] -> (out, lse). Rows empty everywhere give 0."""
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([lse for _, lse in parts])  # (S, B, H, N)
    m = lses.amax(0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m)  # 0 where a segment has no key
    tot = w.sum(0)
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    acc = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32
    out = sum(o.to(acc) * (wi / safe).to(acc)[..., None] for (o, _), wi in zip(parts, w))
    lse = torch.where(tot > 0, m + torch.log(safe), torch.full_like(tot, -math.inf))
    return out.to(parts[0][0].dtype), lse


def _segment(q, k, v, layout: Layout, seg: Segment, tab: Tables, scale: float):
    B, H, N, D = q.shape
    dev = q.device
    TH = seg.params.shape[0]
    q_orig, _ = seg.query_positions()
    k_orig, k_valid = seg.key_positions()  # (TH, nk)
    q_orig, k_orig, k_valid = q_orig.to(dev), k_orig.to(dev), k_valid.to(dev)
    nqp, nkp = tab.nqb * tab.bm, tab.nkb * tab.bn
    qi = torch.nn.functional.pad(q_orig, (0, nqp - len(q_orig)), value=N)  # query positions, padded (N = none)
    kj = torch.nn.functional.pad(k_orig, (0, nkp - k_orig.shape[1]), value=N)
    kv_ok = torch.nn.functional.pad(k_valid, (0, nkp - k_valid.shape[1]), value=False)
    # gather Q, K, V into the segment's order (a copy; the Triton kernels use the index map directly)
    qs = _take(q, qi.clamp(max=N - 1)[None].expand(H, -1))  # (B, H, nqp, D)
    ks = _take(k, kj.clamp(max=N - 1).expand(H, -1))  # (B, H, nkp, D)
    vs = _take(v, kj.clamp(max=N - 1).expand(H, -1))
    cols, slot_ok = _padded_rows(tab, TH)  # (TH, nqb, R)
    R = cols.shape[-1]
    params = seg.params.to(dev).T[:, :, None, None, None]  # (P, TH, 1, 1, 1): one head per leading index
    tiles = None
    if layout.custom_tiles is not None and bool((seg.params[:, P_CUSTOM] > 0).any()):
        tiles = torch.as_tensor(layout.custom_tiles, device=dev)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, B * H * tab.bm * R * tab.bn))
    outs, lses = [], []
    for r0 in range(0, tab.nqb, rows_per_chunk):
        r1 = min(tab.nqb, r0 + rows_per_chunk)
        args = (qs, ks, vs, cols[:, r0:r1].to(dev), slot_ok[:, r0:r1].to(dev), qi, kj, kv_ok, params, tiles, r0, r1,
                tab, layout.custom_block, scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            o, lse = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            o, lse = _chunk(*args)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, 2)[:, :, : seg.nq]  # (B, H, nq, D), segment order
    lse = torch.cat(lses, 2)[:, :, : seg.nq]
    if seg.nq != N or not torch.equal(q_orig, torch.arange(N, device=dev)):
        inv = torch.empty(N, dtype=torch.long, device=dev)  # slot of each sequence position
        valid = q_orig < N
        inv[q_orig[valid]] = torch.arange(seg.nq, device=dev)[valid]
        o, lse = o[:, :, inv], lse[:, :, inv]
    return o, lse


def _chunk(qs, ks, vs, cols, slot_ok, qi, kj, kv_ok, params, tiles, r0, r1, tab, tile_size, scale):
    B, H, _, D = qs.shape
    bm, bn = tab.bm, tab.bn
    nr, R = cols.shape[1], cols.shape[2]
    TH = cols.shape[0]
    key_slots = (cols[..., None] * bn + torch.arange(bn, device=qs.device)).reshape(TH, nr, R * bn)  # (TH, nr, R*BN)
    key_slots_h = key_slots.expand(H, -1, -1)  # TH is 1 or H
    qt = qs[:, :, r0 * bm : r1 * bm].reshape(B, H, nr, bm, D)
    kt = ks[:, torch.arange(H, device=qs.device)[:, None, None], key_slots_h]  # (B, H, nr, R*BN, D)
    vt = vs[:, torch.arange(H, device=qs.device)[:, None, None], key_slots_h]
    acc = torch.float64 if qs.dtype == torch.float64 else torch.float32  # softmax precision
    s = torch.matmul(qt.to(acc), kt.to(acc).transpose(-1, -2)) * scale  # (B, H, nr, BM, R*BN)
    i = qi[r0 * bm : r1 * bm].reshape(1, nr, bm, 1)
    head_rows = torch.arange(TH, device=qs.device)
    j = torch.gather(kj.expand(TH, -1), 1, key_slots.reshape(TH, -1)).reshape(TH, nr, 1, R * bn)
    ok = torch.gather(kv_ok.expand(TH, -1), 1, key_slots.reshape(TH, -1)).reshape(TH, nr, 1, R * bn)
    ok = ok & slot_ok.repeat_interleave(bn, -1)[:, :, None]
    on = None
    if tiles is not None:
        on = tiles[head_rows[:, None, None, None], i.clamp(max=tiles.shape[1] * tile_size - 1) // tile_size,
                   j.clamp(max=tiles.shape[2] * tile_size - 1) // tile_size]
    mask = segment_rule(params, i, j, on) & ok  # (TH, nr, BM, R*BN)
    if TH == 1:
        mask = mask.expand(H, -1, -1, -1)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    safe = torch.where(l > 0, l, torch.ones_like(l))
    o = torch.matmul(p, vt.to(acc)) / safe  # (B, H, nr, BM, D)
    lse = torch.where(l > 0, m + torch.log(safe), torch.full_like(l, -math.inf))[..., 0]
    return o.reshape(B, H, nr * bm, D).to(qs.dtype), lse.reshape(B, H, nr * bm)


def _take(x, idx):
    """x: (B, H, N, D), idx: (H, M) -> (B, H, M, D)."""
    return x[:, torch.arange(x.shape[1], device=x.device)[:, None], idx]


_ROWS = LRUCache()


def _padded_rows(tab: Tables, TH: int):
    """Key tiles of each query tile as a padded [TH, nqb, R] array and a validity mask (cached per table)."""

    def build():
        ptr, idx = tab.q_ptr.cpu().long(), tab.q_idx.cpu().long()
        counts = ptr[1:] - ptr[:-1]
        R = max(1, int(counts.max()) if len(counts) else 1)
        slot = torch.arange(R)
        ok = slot[None] < counts[:, None]
        pos = (ptr[:-1, None] + slot[None]).clamp(max=max(0, len(idx) - 1))
        cols = torch.where(ok, idx[pos] if len(idx) else torch.zeros_like(pos), torch.zeros_like(pos))
        return tab, cols.reshape(TH, tab.nqb, R), ok.reshape(TH, tab.nqb, R)  # tab: keeps id(tab) unique

    _, cols, ok = _ROWS.get(id(tab), build)
    return cols, ok
