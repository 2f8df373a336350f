"""Autograd wrapper of the Triton kernels: tile choice per segment, launch order, merged segments.

Legend: B batch, H heads, N sequence, D head dim, BM/BN query/key tile.

Forward launches one kernel per segment of the layout's plan (natural, transposed strided, gathered summary); the
second and third fold their result into the first through the log-sum-exp inside the kernel. Backward computes
Delta = rowsum(dO * O) once and launches dQ and dK/dV per segment, each adding to the rows the earlier ones wrote.
Tables are built once per (layout, tiles, device) and cached (plan.get_tables).
"""
from __future__ import annotations

import math

import torch

from ..plan import GATHER, TRANSPOSED, Segment, get_segments, get_tables
from .backward import attn_backward
from .forward import attn_forward

_PARAMS: dict = {}


# Launch settings per (segment kind, head-dim bucket): (BM, BN, num_warps, num_stages). Measured on an H100 with
# bench/dev_kernels.py; experiments may edit TUNING before the first call with a layout.
TUNING = {
    ("natural", 64): (128, 64, 8, 3), ("natural", 128): (64, 64, 4, 3),
    ("gather", 64): (128, 64, 8, 3), ("gather", 128): (64, 64, 4, 3),
    ("transposed", 64): (64, 64, 4, 3), ("transposed", 128): (64, 64, 4, 3),
}


def choose_tiles(seg: Segment, head_dim: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for a segment; the transposed strided part gets chunk-aligned tiles."""
    bm, bn, warps, stages = TUNING[(seg.kind, 64 if head_dim <= 64 else 128)]
    if seg.kind == TRANSPOSED and seg.C % 64 and seg.C <= 192:  # short chunks: tiles that divide them
        t = 32 if seg.C % 32 == 0 or seg.C > 48 else 16
        bm, bn = t, t
    return bm, bn, warps, stages


def _segment_launches(layout, head_dim, device, block_m=None, block_n=None):
    """[(segment, tables, params, (num_warps, num_stages))] for a layout, in launch order."""
    out = []
    for idx, seg in enumerate(get_segments(layout)):
        bm, bn, warps, stages = choose_tiles(seg, head_dim)
        bm, bn = block_m or bm, block_n or bn
        if layout.custom_block:
            bm, bn = math.gcd(bm, layout.custom_block), math.gcd(bn, layout.custom_block)
        if bm * bn < 128 * 64:
            warps = min(warps, 4)
        key = (layout.key, idx, str(device))
        if key not in _PARAMS:
            _PARAMS[key] = seg.params.to(device=device, dtype=torch.int32).contiguous()
        out.append((seg, get_tables(layout, idx, bm, bn, device), _PARAMS[key], (warps, stages)))
    return out


class SparseAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, block_m, block_n):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, H, N, D = q.shape
        launches = _segment_launches(layout, D, q.device, block_m, block_n)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
        for idx, (seg, tab, prm, (warps, stages)) in enumerate(launches):
            attn_forward(q, k, v, o, lse, seg, tab, prm, scale, merge=idx > 0, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.launches, ctx.scale = launches, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # (B, H, N)
        dq = torch.empty_like(do)
        # the gathered summary keys do not cover every key: when it runs alone, keys outside it get zero gradient
        gather_only = ctx.launches[0][0].kind == GATHER
        alloc = torch.zeros_like if gather_only else torch.empty_like
        dk = alloc(k)
        dv = alloc(k, dtype=v.dtype)
        for idx, (seg, tab, prm, (warps, stages)) in enumerate(ctx.launches):
            attn_backward(q, k, v, do, dq, dk, dv, lse, delta, seg, tab, prm, ctx.scale, accum=idx > 0,
                          accum_kv=idx > 0 or gather_only, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(q, k, v, layout, scale=None, block_m=None, block_n=None):
    """Fused Triton block-sparse attention. q, k, v: [B, H, N, D] on CUDA (or CPU under TRITON_INTERPRET=1), D a power
    of two in 16..256. Returns (out [B, H, N, D], lse fp32 [B, H, N]). block_m / block_n override the tile shape."""
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"backend='triton' needs head_dim a power of two in 16..256, got head_dim={D}")
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32, got float64 (use 'reference')")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return SparseAttentionFunction.apply(q, k, v, layout, scale, block_m, block_n)
