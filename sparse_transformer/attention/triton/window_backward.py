"""Backward of a causal sliding window (the strided pattern's band: query i sees keys i - W < j <= i) in one kernel:
dQ, dK, dV and Delta = rowsum(dO * O) for every row. Experimental, off by default (SPARSE_TRANSFORMER_WINDOW_BWD=1
turns it on): written on 2026-11-30 after that session's device time was spent, checked in Triton's interpreter only.

Legend: B batch, H heads, N sequence, D head dim, W window, T tile, REACH = ceil((W - 1) / T) key tiles before a query
tile that it may see, SPAN tiles owned per program.

A window has no blocks: every key tile reaches the REACH query tiles after it. One program per (SPAN consecutive tiles,
batch x head) owns those tiles' rows: their dK / dV (it visits every query tile that sees them, the REACH after the
span too) and their dQ and Delta (it visits every key tile they see, the REACH before the span too). The pairs at the
span's two edges are computed by both neighbours, each storing only its own rows, so there are no atomics and nothing
is added across programs. Per key tile kt (in order) and query tile qt >= kt: P = exp2(S - LSE) from the saved
log-sum-exp of the whole layout, dV += P^T dO, dS = P * (dO V^T - Delta), dK += dS^T Q in registers (stored once per
owned key tile); dQ += dS K goes to memory for owned query tiles (stored at the first key tile that reaches them, added
to after), with a barrier after each key tile. Against the generic pair (a dQ kernel that also computes Delta, then a
dK/dV kernel: 14 d flops per tile entry, Q, K, V and dO read twice) it does 10 d per entry plus the edge pairs again
(with SPAN = 4 and REACH = 2, 15 pairs for 12 owned ones). The price, as in block_backward.py: dQ is rounded to the
input's dtype once per key tile that reaches it, up to REACH extra times for 16-bit inputs.
Where it runs (when switched on): function.backward, for a first segment that is exactly one causal window for every
head (Launch.window), head dims up to 128.
"""
import os

import torch
import triton
import triton.language as tl

from .block_backward import _head_bases, _tile_pair
from .launcher import launch as launch_kernel

WINDOW_BWD = os.environ.get("SPARSE_TRANSFORMER_WINDOW_BWD", "0") == "1"
# Compiled for sm_90 (Triton 3.6, a one-off probe like bench/compile_probe.py): d=64 on 64-row tiles and 4 warps, 255
# registers, no spill (2 stages spill 108 bytes); d=128 on 64-row tiles spills 100 bytes on 8 warps, on 32-row tiles
# and 8 warps 176 registers, no spill.
TILE = 64  # head dims up to 64; 128 runs 32-row tiles
SPAN = 4  # tiles owned per program (bench/block_bwd.py measures others)
STAGES = 1
_REVERSE = False  # tests: programs in reverse order (the interpreter runs them one by one; a row stored by a program
# that does not own it would then be overwritten the other way round)


def window_tile(head_dim: int) -> int | None:
    """The tile of the window kernel for this head dim (None: the generic kernels take it)."""
    if head_dim > 128:
        return None
    return TILE if head_dim <= 64 else min(TILE, 32)


@triton.jit
def _attn_bwd_window_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,  # shared by o, do and dq
    stride_gb, stride_gh, stride_gn,  # dk's and dv's
    BH, H, N, W, REACH, SPAN,
    IEEE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, REVERSE: tl.constexpr,
):
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    bh = pid % BH
    b, h, q_base, k_base, v_base, o_base, do_base, dq_base = _head_bases(
        bh, H, q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
        stride_vh, stride_ob, stride_oh)
    row = bh.to(tl.int64) * N  # lse / delta rows (64-bit: B * H * N may pass 2^31)
    offs = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    nt = tl.cdiv(N, TILE)
    t0 = (pid // BH) * SPAN
    t1 = tl.minimum(t0 + SPAN, nt)  # this program owns tiles t0 .. t1 - 1
    for kt in range(tl.maximum(t0 - REACH, 0), t1):
        j = kt * TILE + offs
        k_ok = j < N
        k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        dk = tl.zeros([TILE, HEAD_DIM], tl.float32)
        dv = tl.zeros([TILE, HEAD_DIM], tl.float32)
        # an owned key tile meets every query tile that sees it; one before the span only the owned query tiles
        q_end = tl.minimum(kt + REACH + 1, tl.where(kt >= t0, nt, t1))
        for qt in range(tl.maximum(kt, t0), q_end):
            i = qt * TILE + offs
            q_ok = i < N
            # (masks as vectors: the interpreter does not combine a block mask with a scalar one)
            own = q_ok & (i < t1 * TILE)  # this program's dQ and Delta rows
            first = tl.maximum(qt - REACH, 0) * TILE + offs  # the first key tile reaching qt: dQ stored there, added
            # to after
            g_off = i.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
            q = tl.load(q_base + i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None],
                        other=0.0)
            do = tl.load(do_base + g_off, mask=q_ok[:, None], other=0.0)
            o = tl.load(o_base + g_off, mask=q_ok[:, None], other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            tl.store(delta_ptr + row + i, delta, mask=own & (j == first))
            # keys with 0 <= i - j < W
            dk, dv, dq = _tile_pair(q, k, v, do, delta, lse_ptr + row + i, q_ok, i, j, k_ok, 0, W, dk, dv, qk_scale,
                                    sm_scale, IEEE, True)
            dq += tl.load(dq_base + g_off, mask=(own & (j > first))[:, None], other=0.0).to(tl.float32)
            tl.store(dq_base + g_off, dq.to(dq_ptr.dtype.element_ty), mask=own[:, None])
        g = b * stride_gb + h * stride_gh + j.to(tl.int64)[:, None] * stride_gn + offs_d[None, :]
        owned = (k_ok & (j >= t0 * TILE))[:, None]
        tl.store(dk_ptr + g, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=owned)
        tl.store(dv_ptr + g, dv.to(dv_ptr.dtype.element_ty), mask=owned)
        tl.debug_barrier()  # this key tile's dQ stores before the next one's loads


def window_backward(q, k, v, o, do, dq, dk, dv, lse, delta, W, scale):
    """dQ, dK, dV (stored, not added) and Delta of a causal window of W keys for every head (the first segment).
    q, k, v, o, do: [B, H, N, D] (last dim contiguous); o, do and dq share strides, dk and dv share theirs; lse: fp32
    [B, H, N] of the whole layout; delta: fp32 [B, H, N], written here for the later segments."""
    B, H, N, D = q.shape
    assert dq.stride() == do.stride() == o.stride() and dk.stride() == dv.stride()
    tile = window_tile(D)
    reach = -(-(W - 1) // tile)
    spans = triton.cdiv(triton.cdiv(N, tile), SPAN)
    launch_kernel(_attn_bwd_window_kernel, (spans * B * H,),
                  (q, k, v, o, do, dq, dk, dv, lse, delta),
                  (scale * 1.4426950408889634, scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                   *do.stride()[:3], *dk.stride()[:3], B * H, H, N, W, reach, SPAN),
                  dict(IEEE=q.dtype == torch.float32, TILE=tile, HEAD_DIM=D, REVERSE=_REVERSE,
                       num_warps=8 if D > 64 else 4, num_stages=STAGES))
