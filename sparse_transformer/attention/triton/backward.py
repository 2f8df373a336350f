"""Backward kernels: dQ over each query tile's key tiles, dK / dV over each key tile's query tiles (no N^2 buffer).

Legend: B batch, H heads, N sequence, D head dim, BM/BN query/key tile, TH heads in the table (1 = shared).

Algorithm (FlashAttention-2, section 3.2): P is recomputed from Q, K and the saved log-sum-exp of the *whole* layout
(all segments merged), so each segment's pass is exactly its share of the gradient: with Delta = rowsum(dO * O),
dS = P * (dO V^T - Delta), dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO. The dK/dV kernel walks the CSC copy of
the tile table (query tiles per key tile), so every program owns its key rows and needs no atomics; a later segment
adds (ACCUM) into the rows an earlier one wrote. As in the forward, full tiles run unmasked, partial ones masked
(in one loop or two: common.one_loop).
Rows with LSE = -inf (no key) contribute nothing. Delta is computed by the first segment's dQ kernel (FA2's
preprocessing step, fused: one launch fewer).
With FUSE_DQ (segments after the first whose kind has a `fused` tiling in TUNING, when torch's deterministic mode is
off) a segment has no dQ kernel: its dK/dV kernel also computes dS K for each tile and adds it to an fp32 dQ with
atomics (FlashAttention-2's dQaccum), so S and dO V^T are computed once per entry, not twice (10 d flops per entry,
not 14 d). Segments the block kernel takes (block_backward.py: a block-causal band first, transposed chunks later)
never come here.
"""
import triton
import triton.language as tl

from . import forward as _forward
from .common import (ONE_LOOP_ENV, _key_positions, _program_head, _program_tile, _query_positions, _rule_on_partial,
                     one_loop)
from .forward import _dot
from .grid import program_grid
from .launcher import launch as launch_kernel

# the dQ and dK/dV kernels' full and partial tiles in one loop, as forward.ONE_LOOP (same rule and switch,
# common.one_loop; separate attributes, so that a bench can time each)
ONE_LOOP = ONE_LOOP_ENV


@triton.jit
def _dq_tile(q, do, lse, delta, dq, e, i, p_q, k_base, v_base, stride_kn, stride_vn, offs_d, prm, lo, qk_scale,
             N, NK, SEG_L, SEG_C, partial, MASKED: tl.constexpr, KIND: tl.constexpr, IEEE: tl.constexpr,
             HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr,
             HAS_SUM: tl.constexpr, BLOCK_N: tl.constexpr, ONE_LOOP: tl.constexpr):
    p_k = e * BLOCK_N + tl.arange(0, BLOCK_N)
    j, k_ok = _key_positions(p_k, N, NK, SEG_L, SEG_C, lo, KIND)
    if MASKED or ONE_LOOP:
        k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :])
    p = tl.math.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
    p = _rule_on_partial(p, 0.0, i[:, None], j[None, :], p_q[:, None], p_k[None, :], k_ok[None, :], prm, SEG_C,
                         partial, MASKED, ONE_LOOP, KIND, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _dkdv_tile(k, v, dk, dv, e, j, p_k, k_ok, q_base, do_base, dq_base, lse_base, delta_base, stride_qn, stride_on,
               offs_d, prm, qk_scale, sm_scale, N, NQ, SEG_L, SEG_C, partial, MASKED: tl.constexpr,
               KIND: tl.constexpr, IEEE: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr,
               HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr, HAS_SUM: tl.constexpr, FUSE_DQ: tl.constexpr,
               BLOCK_M: tl.constexpr, ONE_LOOP: tl.constexpr):
    p_q = e * BLOCK_M + tl.arange(0, BLOCK_M)
    i, q_ok = _query_positions(p_q, N, NQ, SEG_L, SEG_C, KIND)
    if MASKED or ONE_LOOP:
        q = tl.load(q_base + i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        do = tl.load(do_base + i.to(tl.int64)[:, None] * stride_on + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        lse = tl.load(lse_base + i, mask=q_ok, other=float("-inf")) * 1.4426950408889634
        delta = tl.load(delta_base + i, mask=q_ok, other=0.0)
    else:  # a full tile's queries are all valid
        q = tl.load(q_base + i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :])
        do = tl.load(do_base + i.to(tl.int64)[:, None] * stride_on + offs_d[None, :])
        lse = tl.load(lse_base + i) * 1.4426950408889634
        delta = tl.load(delta_base + i)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
    pt = tl.math.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])  # (BN, BM)
    # queries past the segment need no mask here: their LSE reads as +inf, so P = 0 (and dO = 0) on their columns
    pt = _rule_on_partial(pt, 0.0, i[None, :], j[:, None], p_q[None, :], p_k[:, None], k_ok[:, None], prm, SEG_C,
                          partial, MASKED, ONE_LOOP, KIND, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM, True)
    dv += _dot(pt.to(do.dtype), do, IEEE)
    dst = pt * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, IEEE)
    if FUSE_DQ:  # this tile's share of dQ = scale * dS K, added in fp32 to rows other key tiles add to as well
        dq = _dot(tl.trans(dst.to(k.dtype)), k, IEEE) * sm_scale
        dq_ptrs = dq_base + i.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
        if MASKED or ONE_LOOP:
            tl.atomic_add(dq_ptrs, dq, mask=q_ok[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, row_ptr, mid_ptr, idx_ptr, prm_ptr,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,  # shared by o, do and dq
    H, N, NQ, NK, TH, NQB, SEG_L, SEG_C, GROUP,
    KIND: tl.constexpr, T_ON_X: tl.constexpr, ACCUM: tl.constexpr, DELTA: tl.constexpr, IEEE: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr,
    HAS_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ONE_LOOP: tl.constexpr,
):
    t, bh = _program_tile(GROUP, T_ON_X)
    qb = NQB - 1 - t
    b, h, th, prm, lo = _program_head(bh, H, TH, prm_ptr)
    offs_d = tl.arange(0, HEAD_DIM)
    p_q = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    i, q_ok = _query_positions(p_q, N, NQ, SEG_L, SEG_C, KIND)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    g_off = b * stride_ob + h * stride_oh + i.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    do = tl.load(do_ptr + g_off, mask=q_ok[:, None], other=0.0)
    lse_off = bh.to(tl.int64) * N + i  # 64-bit: B * H * N may pass 2^31
    lse = tl.load(lse_ptr + lse_off, mask=q_ok, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = 0
    if DELTA:  # the first segment computes Delta = rowsum(dO * O) for its rows (every row) and stores it for the rest
        o = tl.load(o_ptr + g_off, mask=q_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + lse_off, delta, mask=q_ok)
    else:
        delta = tl.load(delta_ptr + lse_off, mask=q_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = th * NQB + qb
    mid = tl.load(mid_ptr + row)
    for t in range(tl.load(row_ptr + row), tl.load(row_ptr + row + 1) if ONE_LOOP else mid):  # as the forward's
        dq = _dq_tile(q, do, lse, delta, dq, tl.load(idx_ptr + t), i, p_q, k_base, v_base, stride_kn, stride_vn,
                      offs_d, prm, lo, qk_scale, N, NK, SEG_L, SEG_C, t >= mid, False, KIND, IEEE, HAS_DENSE, HAS_WIN,
                      HAS_BLK, HAS_STR, HAS_SUM, BLOCK_N, ONE_LOOP)
    if not ONE_LOOP:
        for t in range(mid, tl.load(row_ptr + row + 1)):
            dq = _dq_tile(q, do, lse, delta, dq, tl.load(idx_ptr + t), i, p_q, k_base, v_base, stride_kn, stride_vn,
                          offs_d, prm, lo, qk_scale, N, NK, SEG_L, SEG_C, True, True, KIND, IEEE, HAS_DENSE, HAS_WIN,
                          HAS_BLK, HAS_STR, HAS_SUM, BLOCK_N, False)
    dq = dq * sm_scale
    dq_ptrs = dq_ptr + g_off
    if ACCUM:
        dq += tl.load(dq_ptrs, mask=q_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, col_ptr, mid_ptr, idx_ptr, prm_ptr,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,  # o's strides: do and (FUSE_DQ) the fp32 dq
    stride_gb, stride_gh, stride_gn,  # dk's and dv's (contiguous) strides
    H, N, NQ, NK, TH, NKB, SEG_L, SEG_C, GROUP,
    KIND: tl.constexpr, T_ON_X: tl.constexpr, ACCUM: tl.constexpr, FUSE_DQ: tl.constexpr, IEEE: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr,
    HAS_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ONE_LOOP: tl.constexpr,
):
    kb, bh = _program_tile(GROUP, T_ON_X)
    b, h, th, prm, lo = _program_head(bh, H, TH, prm_ptr)
    offs_d = tl.arange(0, HEAD_DIM)
    p_k = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    j, k_ok = _key_positions(p_k, N, NK, SEG_L, SEG_C, lo, KIND)
    k_off = b * stride_kb + h * stride_kh + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :]
    k = tl.load(k_ptr + k_off, mask=k_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_ob + h * stride_oh
    dq_base = dq_ptr + b * stride_ob + h * stride_oh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    col = th * NKB + kb
    mid = tl.load(mid_ptr + col)
    lse_row = lse_ptr + bh.to(tl.int64) * N  # 64-bit: B * H * N may pass 2^31
    delta_row = delta_ptr + bh.to(tl.int64) * N
    for t in range(tl.load(col_ptr + col), tl.load(col_ptr + col + 1) if ONE_LOOP else mid):  # as the forward's
        dk, dv = _dkdv_tile(k, v, dk, dv, tl.load(idx_ptr + t), j, p_k, k_ok, q_base, do_base, dq_base, lse_row,
                            delta_row, stride_qn, stride_on, offs_d, prm, qk_scale, sm_scale, N, NQ, SEG_L, SEG_C,
                            t >= mid, False, KIND, IEEE, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM, FUSE_DQ,
                            BLOCK_M, ONE_LOOP)
    if not ONE_LOOP:
        for t in range(mid, tl.load(col_ptr + col + 1)):
            dk, dv = _dkdv_tile(k, v, dk, dv, tl.load(idx_ptr + t), j, p_k, k_ok, q_base, do_base, dq_base, lse_row,
                                delta_row, stride_qn, stride_on, offs_d, prm, qk_scale, sm_scale, N, NQ, SEG_L,
                                SEG_C, True, True, KIND, IEEE, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM,
                                FUSE_DQ, BLOCK_M, False)
    dk = dk * sm_scale
    g_off = b * stride_gb + h * stride_gh + j.to(tl.int64)[:, None] * stride_gn + offs_d[None, :]
    if ACCUM:
        dk += tl.load(dk_ptr + g_off, mask=k_ok[:, None], other=0.0).to(tl.float32)
        dv += tl.load(dv_ptr + g_off, mask=k_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dk_ptr + g_off, dk.to(dk_ptr.dtype.element_ty), mask=k_ok[:, None])
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None])


def attn_backward(q, k, v, o, do, dq, dk, dv, lse, delta, launch, scale, fuse_dq, first, accum, accum_kv, gluon=False):
    """Launch one segment's backward: dQ and dK/dV, or (fuse_dq) one dK/dV kernel on launch.fused's tiles that also
    adds its dQ share with fp32 atomics (never the first segment: its dQ kernel stores every row). q, k, v, o, do:
    [B, H, N, D]; o, do and dq share strides, dk and dv share theirs; dq is fp32 when any segment fuses; lse: fp32
    [B, H, N] of the whole layout; delta: fp32 [B, H, N], written by the first segment's dQ kernel (first), read by
    the rest; accum / accum_kv: add to what an earlier segment wrote; gluon: the Gluon kernels took this segment's
    forward (for these q, k, v: gluon_gather.eligible)."""
    B, H, N, D = q.shape
    seg = launch.seg
    assert dq.stride() == do.stride() == o.stride() and dk.stride() == dv.stride()
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    qk_scale = scale * 1.4426950408889634
    dq_kernel = not fuse_dq
    kv_kernel = True
    gg = _forward.gluon_module() if gluon and not (first or fuse_dq) else None
    if gg is not None and gg.backward_fits(seg, q.device, (do, dq, dk, dv)):
        # the gathered part's dQ and dK / dV in Gluon (Hopper); dK / dV add to the band's
        kv_kernel = not (accum_kv and gg.DKDV)
        gg.backward(q, k, v, do, dq, dk, dv, lse, delta, seg, scale, dq_kernel, not kv_kernel)
        dq_kernel = False
    if dq_kernel:
        tab = launch.dq.tab
        grid, group, t_on_x = program_grid(tab.nqb, B * H)
        launch_kernel(_attn_bwd_dq_kernel, grid, (
            q, k, v, o, do, dq, lse, delta, tab.q_ptr, tab.q_mid, tab.q_idx, launch.prm), (qk_scale, scale, *strides,
            H, N, seg.nq, seg.nk, launch.prm.shape[0], tab.nqb, seg.L, seg.C, group),
            launch.constexprs(q, launch.dq, T_ON_X=t_on_x, ACCUM=accum, DELTA=first,
                              ONE_LOOP=one_loop(ONE_LOOP, launch.dq.one_loop)))
    if not kv_kernel:
        return
    kv_pass = launch.fused if fuse_dq else launch.dkdv
    tab = kv_pass.tab
    # its programs stream their head's Q and dO
    grid, group, t_on_x = program_grid(tab.nkb, B * H, 2 * N * D * q.element_size(), q.device)
    launch_kernel(_attn_bwd_dkdv_kernel, grid, (
        q, k, v, do, dq, dk, dv, lse, delta, tab.k_ptr, tab.k_mid, tab.k_idx, launch.prm), (qk_scale, scale, *strides,
        *dk.stride()[:3], H, N, seg.nq, seg.nk, launch.prm.shape[0], tab.nkb, seg.L, seg.C, group),
        launch.constexprs(q, kv_pass, T_ON_X=t_on_x, ACCUM=accum_kv, FUSE_DQ=fuse_dq,
                          ONE_LOOP=one_loop(ONE_LOOP, kv_pass.one_loop)))
