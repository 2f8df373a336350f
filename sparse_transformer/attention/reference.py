"""Exact dense masked attention: the ground truth every backend is tested against.

Legend: B batch, H heads, N sequence length, D head dim. O(N^2) time and memory: for tests and small N.
Rows that see no key (possible only in custom layouts) give a zero output and lse = -inf, never NaN.
"""
from __future__ import annotations

import math

import torch

from ..layouts import Layout


def attention_ref(q, k, v, layout: Layout, scale: float | None = None, upcast: bool = True):
    """Dense masked attention. q, k, v: [B, H, N, D]. Returns (out [B, H, N, D] in q's dtype, lse [B, H, N] fp32/fp64).

    upcast=True computes in float64 (the reference); upcast=False computes in the inputs' dtype (to measure how much
    error the dtype itself brings, as FlashAttention's tests do).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = layout.element_mask(device=q.device)  # (N, N) or (H, N, N)
    if mask.dim() == 3:
        mask = mask[None]
    dt = torch.float64 if upcast else q.dtype
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale  # (B, H, N, N)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = torch.matmul(p, v.to(dt)) / torch.where(l > 0, l, torch.ones_like(l))
    lse = torch.where(l > 0, m + torch.log(torch.where(l > 0, l, torch.ones_like(l))), torch.full_like(l, -math.inf))
    return o.to(q.dtype), lse[..., 0].to(torch.float64 if upcast else torch.float32)
