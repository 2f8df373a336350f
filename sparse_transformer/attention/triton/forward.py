"""Forward kernel: flash-style attention over the active tiles of one segment.

Legend: B batch, H heads, N sequence, D head dim, BM/BN query/key tile, TH heads in the table (1 = shared).

Algorithm (FlashAttention-2, section 3.1, restricted to a tile list): one program per (query tile, batch x head). It
loads its BM queries once (through the segment's index map, so the transposed strided part costs no copy), walks the
key tiles listed for its row of the CSR table - the full tiles with no masking at all, the partial ones with the
element rule (in one loop, behind a runtime branch, where the pass pipelines its loads: common.one_loop; else the
full tiles, then the partial ones) - and keeps a running max / sum (online softmax, exp2 domain). It writes O and the
log-sum-exp (natural log) at the queries' sequence positions. With MERGE it folds its result into the O / LSE already
written by an earlier segment (softmaxes over disjoint key sets merge exactly through the log-sum-exp).
Supports: fp16 / bf16 (fp32 accumulation) and fp32 (IEEE dot), head dims 16..256 (power of two), any N.
Rows that see no key get O = 0 and LSE = -inf.
"""
import os

import triton
import triton.language as tl

from ..plan import GATHER
from .common import (ONE_LOOP_ENV, _key_positions, _program_head, _program_tile, _query_positions, _rule_on_partial,
                     one_loop)
from .grid import program_grid
from .launcher import launch as launch_kernel, triton_version as _triton_version


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_tile(q, acc, m_i, l_i, e, i, p_q, k_base, v_base, stride_kn, stride_vn, offs_d, prm, lo, qk_scale,
              N, NK, SEG_L, SEG_C, partial, MASKED: tl.constexpr, KIND: tl.constexpr, IEEE: tl.constexpr,
              HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr,
              HAS_SUM: tl.constexpr, FOLD: tl.constexpr, BLOCK_N: tl.constexpr, ONE_LOOP: tl.constexpr):
    """One key tile e of a query tile's row: MASKED (constexpr) applies the element rule, or with ONE_LOOP the runtime
    flag `partial` does (keys past the segment always masked on loading)."""
    p_k = e * BLOCK_N + tl.arange(0, BLOCK_N)
    j, k_ok = _key_positions(p_k, N, NK, SEG_L, SEG_C, lo, KIND)
    if MASKED or ONE_LOOP:
        k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    else:  # a full tile: every key is valid and visible
        k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :])
    s = _dot(q, tl.trans(k), IEEE)
    if not FOLD:
        s = s * qk_scale
    s = _rule_on_partial(s, float("-inf"), i[:, None], j[None, :], p_q[:, None], p_k[None, :], k_ok[None, :], prm,
                         SEG_C, partial, MASKED, ONE_LOOP, KIND, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM)
    if FOLD:  # qk_scale > 0: the max of the raw scores, scaled; the scale goes into the exponent's FMA below
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    if FOLD:
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, row_ptr, mid_ptr, idx_ptr, prm_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, NQ, NK, TH, NQB, SEG_L, SEG_C, GROUP,
    KIND: tl.constexpr, T_ON_X: tl.constexpr, MERGE: tl.constexpr, IEEE: tl.constexpr, FOLD: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr,
    HAS_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, ONE_LOOP: tl.constexpr,
):
    t, bh = _program_tile(GROUP, T_ON_X)
    qb = NQB - 1 - t  # long rows (late query tiles) first
    b, h, th, prm, lo = _program_head(bh, H, TH, prm_ptr)
    offs_d = tl.arange(0, HEAD_DIM)
    p_q = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    i, q_ok = _query_positions(p_q, N, NQ, SEG_L, SEG_C, KIND)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = th * NQB + qb
    start = tl.load(row_ptr + row)
    mid = tl.load(mid_ptr + row)
    end = tl.load(row_ptr + row + 1)
    # invariant: after each tile, acc / l_i is the softmax-weighted mean of V over the keys seen so far, with scores
    # measured from the running row max m_i (log2 units); m_i = -inf while a row has seen no key.
    # ONE_LOOP: every tile in the first loop, the element rule behind a branch (two loops in a row make ptxas
    # serialize the wgmma); else the full tiles unmasked, then the partial ones masked
    for t in range(start, end if ONE_LOOP else mid):
        acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, tl.load(idx_ptr + t), i, p_q, k_base, v_base, stride_kn,
                                  stride_vn, offs_d, prm, lo, qk_scale, N, NK, SEG_L, SEG_C, t >= mid, False, KIND,
                                  IEEE, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM, FOLD, BLOCK_N, ONE_LOOP)
    if not ONE_LOOP:
        for t in range(mid, end):
            acc, m_i, l_i = _fwd_tile(q, acc, m_i, l_i, tl.load(idx_ptr + t), i, p_q, k_base, v_base, stride_kn,
                                      stride_vn, offs_d, prm, lo, qk_scale, N, NK, SEG_L, SEG_C, True, True, KIND,
                                      IEEE, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM, FOLD, BLOCK_N, False)
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + i.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    lse_ptrs = lse_ptr + bh.to(tl.int64) * N + i  # 64-bit: B * H * N may pass 2^31
    # per row a reciprocal, per element one multiply (and one FMA merging): a division per element costs ptxas four
    # instructions or more (range checks around the reciprocal). H200, bench/dev_probe.py rcp at commit f47906e
    # (2026-12-01, dev-rcp-20261201.json; division -> reciprocal, us): band forward 50.5 -> 49.6 (strided-12k), 173.9
    # -> 171.5 (strided-64k); the merging transposed forward 61.3 -> 59.5, 171.4 -> 166.4
    w_acc = 1.0 / l_safe  # O = acc * w_acc [+ O_prev * w_prev]
    if MERGE:  # fold into the earlier segments' result for the same rows
        lse_prev = tl.load(lse_ptrs, mask=q_ok, other=float("-inf"))
        o_prev = tl.load(o_ptrs, mask=q_ok[:, None], other=0.0).to(tl.float32)
        mx = tl.maximum(lse_prev, lse)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w_prev = tl.exp(lse_prev - mx)
        w_new = tl.exp(lse - mx)
        tot = w_prev + w_new
        tot_safe = tl.where(tot > 0, tot, 1.0)
        inv_tot = 1.0 / tot_safe
        o = o_prev * (w_prev * inv_tot)[:, None] + acc * (w_new * inv_tot * w_acc)[:, None]
        lse = tl.where(tot > 0, mx + tl.log(tot_safe), float("-inf"))
    else:
        o = acc * w_acc[:, None]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=q_ok[:, None])
    tl.store(lse_ptrs, lse, mask=q_ok)


# one loop for full and partial key tiles: None = each pass's default (common.one_loop), True / False forced
ONE_LOOP = ONE_LOOP_ENV
# segment kinds whose forward folds the softmax scale into the exponent's FMA (FOLD). On the window band too it took
# 30 of 516 instructions off a tile (sm_90, Triton 3.6) but did not pay: H200, bench/ab_rev.py (2026-12-01,
# ab-rev-20261201-151420-rulekeys-fold.json), band forward us, without -> with: strided-12k 48.8 -> 47.8,
# strided-3k 25.2 -> 25.6, strided-64k 168.4-175.6 -> 169.7-170.5; graph fwd+bwd even (0.4078 -> 0.4071 ms).
FOLD_KINDS = (GATHER,)

# the fixed pattern's gathered summary part (forward, dQ, dK/dV) as Gluon kernels on Hopper where they apply
# (gluon_gather.py, 1.2-1.8x faster than the Triton kernels for that part: BENCHMARKS.md, ninth session). Gluon's API
# changes between Triton releases (3.9 renamed the TMA load these kernels call), so by default they run only on the
# Triton versions they were checked on, on a GPU; SPARSE_TRANSFORMER_GLUON=0 turns them off, =1 tries them on any Triton
_GLUON_ENV = os.environ.get("SPARSE_TRANSFORMER_GLUON", "")
GLUON_GATHER = _GLUON_ENV != "0"
GLUON_TRITON = ((3, 6),)  # (major, minor) of the Triton versions the Gluon kernels were checked on
_GLUON = []  # the gluon_gather module once decided on, or None


def gluon_module():
    """The gluon_gather module where this Triton runs it (a checked version, or SPARSE_TRANSFORMER_GLUON=1, and
    Gluon's Hopper module importable), else None; decided once."""
    if not _GLUON:
        module = None
        if _GLUON_ENV == "1" or _triton_version() in GLUON_TRITON:
            try:
                from . import gluon_gather as module
            except ImportError:  # a Triton without triton.experimental.gluon's Hopper module
                module = None
        _GLUON.append(module)
    return _GLUON[0]


def gluon_for(q, seg):
    """The gluon_gather module if the gathered segment seg may run there for q (switched on, CUDA, a Triton that runs
    it), else None; gluon_gather.eligible decides the rest."""
    if not (GLUON_GATHER and seg.kind == GATHER and q.is_cuda):
        return None
    return gluon_module()


def attn_forward(q, k, v, o, lse, launch, scale, merge) -> bool:
    """Launch the forward kernel for one segment. q, k, v, o: [B, H, N, D] (last dim contiguous); lse: fp32 [B, H, N]
    contiguous; launch: a function.Launch (segment, tables, params, settings); merge: fold into the o / lse an
    earlier segment wrote. Returns whether the Gluon kernels took it (gluon_gather.eligible: the backward reuses
    that decision for these q, k, v)."""
    B, H, N, D = q.shape
    seg, tab = launch.seg, launch.fwd.tab
    gg = gluon_for(q, seg)
    if gg is not None and gg.eligible(q, k, v, seg, scale, merge, others=(o,)):
        gg.forward(q, k, v, o, lse, seg, scale, merge)
        return True
    qk_scale = scale * 1.4426950408889634
    # FOLD (the scale inside the exponent's FMA) measured faster on the gathered summary part only; it needs a positive
    # scale that stays nonzero in fp32 (else -inf * 0 = NaN on masked scores)
    grid, group, t_on_x = program_grid(tab.nqb, B * H)
    launch_kernel(_attn_fwd_kernel, grid, (q, k, v, o, lse, tab.q_ptr, tab.q_mid, tab.q_idx, launch.prm), (
        qk_scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, N, seg.nq, seg.nk, launch.prm.shape[0], tab.nqb, seg.L, seg.C, group),
        launch.constexprs(q, launch.fwd, T_ON_X=t_on_x, MERGE=merge,
                          FOLD=seg.kind in FOLD_KINDS and qk_scale >= 2.0 ** -126,
                          ONE_LOOP=one_loop(ONE_LOOP, launch.fwd.one_loop)))
    return False
