"""Forward kernel: flash-style attention over the active tiles of one segment.

Legend: B batch, H heads, N sequence, D head dim, BM/BN query/key tile, TH heads in the table (1 = shared).

Algorithm (FlashAttention-2, section 3.1, restricted to a tile list): one program per (query tile, batch x head). It
loads its BM queries once (through the segment's index map, so the transposed strided part costs no copy), walks the
key tiles listed for its row of the CSR table, computes S = Q K^T, applies the element rule only on tiles flagged
partial, and keeps a running max / sum (online softmax, exp2 domain). It writes O and the log-sum-exp (natural log)
at the queries' sequence positions. With MERGE it folds its result into the O / LSE already written by an earlier
segment (a softmax over disjoint key sets merges exactly through the log-sum-exp).
Supports: fp16 / bf16 (fp32 accumulation) and fp32 (IEEE dot), head dims 16..256 (power of two), any N.
Rows that see no key get O = 0 and LSE = -inf.
"""
import triton
import triton.language as tl

from .common import NUM_SEG_PARAMS, P_SUM_LO, _key_positions, _query_positions, _visible


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, row_ptr, idx_ptr, prm_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N, NQ, NK, TH, NQB, SEG_L, SEG_C,
    KIND: tl.constexpr, MERGE: tl.constexpr, IEEE: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_WIN: tl.constexpr, HAS_BLK: tl.constexpr, HAS_STR: tl.constexpr,
    HAS_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    qb = NQB - 1 - tl.program_id(0)  # long rows (late query tiles) first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    th = h % TH
    prm = prm_ptr + th * NUM_SEG_PARAMS
    lo = tl.load(prm + P_SUM_LO)
    offs_d = tl.arange(0, HEAD_DIM)
    p_q = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    i, q_ok = _query_positions(p_q, N, NQ, SEG_L, SEG_C, KIND)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + i[:, None] * stride_qn + offs_d[None, :],
                mask=q_ok[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = th * NQB + qb
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    # invariant: after each tile, acc / l_i is the softmax-weighted mean of V over the keys seen so far, with scores
    # measured from the running row max m_i (log2 units); m_i = -inf while a row has seen no key.
    for t in range(start, end):
        e = tl.load(idx_ptr + t)
        p_k = (e >> 1) * BLOCK_N + tl.arange(0, BLOCK_N)
        j, k_ok = _key_positions(p_k, N, NK, SEG_L, SEG_C, lo, KIND)
        k = tl.load(k_base + j[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + j[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        if (e & 1) != 0:
            vis = _visible(i[:, None], j[None, :], prm, HAS_DENSE, HAS_WIN, HAS_BLK, HAS_STR, HAS_SUM)
            s = tl.where(vis & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + i[:, None] * stride_on + offs_d[None, :]
    lse_ptrs = lse_ptr + bh * N + i
    if MERGE:  # fold into the earlier segments' result for the same rows
        lse_prev = tl.load(lse_ptrs, mask=q_ok, other=float("-inf"))
        o_prev = tl.load(o_ptrs, mask=q_ok[:, None], other=0.0).to(tl.float32)
        mx = tl.maximum(lse_prev, lse)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w_prev = tl.exp(lse_prev - mx)
        w_new = tl.exp(lse - mx)
        tot = w_prev + w_new
        tot_safe = tl.where(tot > 0, tot, 1.0)
        o = (o_prev * w_prev[:, None] + o * w_new[:, None]) / tot_safe[:, None]
        lse = tl.where(tot > 0, mx + tl.log(tot_safe), float("-inf"))
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=q_ok[:, None])
    tl.store(lse_ptrs, lse, mask=q_ok)


def attn_forward(q, k, v, o, lse, seg, tab, prm, scale, merge, num_warps=4, num_stages=2):
    """Launch the forward kernel for one segment. q, k, v, o: [B, H, N, D] (last dim contiguous); lse: fp32 [B, H, N]
    contiguous; prm: int32 [TH, NUM_SEG_PARAMS] on the device; merge: fold into o / lse written by an earlier segment."""
    B, H, N, D = q.shape
    flags = _rule_flags(seg)
    grid = (tab.nqb, B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, tab.q_ptr, tab.q_idx, prm, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, N, seg.nq, seg.nk, prm.shape[0], tab.nqb, seg.L, seg.C,
        KIND=_KINDS[seg.kind], MERGE=merge, IEEE=q.dtype == _fp32(), **flags,
        BLOCK_M=tab.bm, BLOCK_N=tab.bn, HEAD_DIM=D, num_warps=num_warps, num_stages=num_stages,
    )


_KINDS = {"natural": 0, "transposed": 1, "gather": 2}


def _fp32():
    import torch

    return torch.float32


def _rule_flags(seg):
    from ..plan import P_ALL, P_BLK, P_CUSTOM, P_STR, P_SUM_L, P_WIN

    p = seg.params
    on = lambda *cols: bool((p[:, list(cols)] > 0).any())  # noqa: E731
    return dict(HAS_DENSE=on(P_ALL, P_CUSTOM), HAS_WIN=on(P_WIN), HAS_BLK=on(P_BLK), HAS_STR=on(P_STR),
                HAS_SUM=on(P_SUM_L))
