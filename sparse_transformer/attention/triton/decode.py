"""Decode kernel: one new query per (batch, head) over a key/value cache, reading only the keys of its layout row.

Legend: B batch, H heads, T cache length, Dk / Dv widths, t the query position, BN keys per chunk, P head patterns.

One program per (batch, head). It reads t from device memory (so a CUDA graph replays the same launch at every step),
derives its row from six integers (attention/decode.py: a range [start, t] and a grid base + m L + r of keys outside
it), and walks both in chunks of BN keys: gather BN cache rows, q.k on the CUDA cores (one query: no matrix unit to
feed), online softmax in the exp2 domain, and p.v. A strided or fixed row holds O(sqrt(n)) keys, so the step reads
O(sqrt(n)) cache rows instead of the O(n) a dense KV-cache step reads. A row with no key writes zeros.
Limits: head widths up to 512 (any, padded to a power of two and masked); positions and the cache length in int32;
keys at or past the cache length T are never read, whatever position the device holds.
"""
import torch
import triton
import triton.language as tl

from .. import decode as rows

R_ALL, R_WINDOW, R_BLOCK = tl.constexpr(rows.R_ALL), tl.constexpr(rows.R_WINDOW), tl.constexpr(rows.R_BLOCK)
G_NONE, G_STRIDE = tl.constexpr(rows.G_NONE), tl.constexpr(rows.G_STRIDE)
NUM_PARAMS = tl.constexpr(rows.NUM_DECODE_PARAMS)


@triton.jit
def _decode_chunk(q, acc, m_i, l_i, j, ok, k_base, v_base, stride_kn, stride_vn, offs_dk, offs_dv, DK, DV):
    """Fold keys j (valid where ok) into the running max / sum / accumulator."""
    jj = j.to(tl.int64)[:, None]
    k = tl.load(k_base + jj * stride_kn + offs_dk[None, :], mask=ok[:, None] & (offs_dk[None, :] < DK),
                other=0.0).to(tl.float32)
    v = tl.load(v_base + jj * stride_vn + offs_dv[None, :], mask=ok[:, None] & (offs_dv[None, :] < DV),
                other=0.0).to(tl.float32)
    s = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))  # (BN,)
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use)
    return acc * alpha + tl.sum(p[:, None] * v, 0), m_new, l_i * alpha + tl.sum(p, 0)


@triton.jit
def _attn_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, prm_ptr, qk_scale,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                        stride_ob, stride_oh, H, P, T,
                        DK: tl.constexpr, DV: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    prm = prm_ptr + (h % P) * NUM_PARAMS
    rkind, width = tl.load(prm), tl.load(prm + 1)
    gkind, period, lo, run = tl.load(prm + 2), tl.load(prm + 3), tl.load(prm + 4), tl.load(prm + 5)
    t = tl.minimum(tl.load(pos_ptr).to(tl.int32), T - 1)  # never past the cache, whatever the device holds

    start = t + 1  # no range part
    start = tl.where(rkind == R_ALL, 0, start)
    start = tl.where(rkind == R_WINDOW, tl.maximum(t - width + 1, 0), start)
    start = tl.where(rkind == R_BLOCK, (t // tl.maximum(width, 1)) * width, start)

    offs_dk = tl.arange(0, DK_P)  # widths padded to a power of two, masked
    offs_dv = tl.arange(0, DV_P)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_dk, mask=offs_dk < DK, other=0.0).to(tl.float32)
    q = q * qk_scale
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    acc = tl.zeros([DV_P], dtype=tl.float32)
    m_i = -float("inf")
    l_i = 0.0

    # invariant: after each chunk, acc / l_i is the softmax-weighted mean of V over the keys seen so far, scores
    # measured from the running max m_i (log2 units); m_i = -inf while no key has been seen.
    for s0 in range(start, t + 1, BLOCK_N):  # the contiguous range [start, t]
        j = s0 + offs_n
        acc, m_i, l_i = _decode_chunk(q, acc, m_i, l_i, j, j <= t, k_base, v_base, stride_kn, stride_vn,
                                      offs_dk, offs_dv, DK, DV)

    # the grid: base + m * period + r for m in [0, t // period], r in [0, run); keys past t or inside the range drop
    per = tl.maximum(period, 1)
    base = tl.where(gkind == G_STRIDE, t % per, lo)
    count = tl.where(gkind == G_NONE, 0, (t // per + 1) * run)
    run1 = tl.maximum(run, 1)
    for e0 in range(0, count, BLOCK_N):
        e = e0 + offs_n
        j = base + (e // run1) * per + e % run1
        ok = (e < count) & (j <= t) & (j < start)
        acc, m_i, l_i = _decode_chunk(q, acc, m_i, l_i, j, ok, k_base, v_base, stride_kn, stride_vn,
                                      offs_dk, offs_dv, DK, DV)

    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_dv, out.to(o_ptr.dtype.element_ty), mask=offs_dv < DV)


def attn_decode(q, k_cache, v_cache, params, pos, scale: float, block_n: int | None = None, num_warps: int = 4):
    """q [B, H, Dk]; caches [B, H, T, Dk|Dv] (last dim contiguous); params int32 [P, NUM_DECODE_PARAMS] on the device
    (P = 1 or H); pos: int tensor [1] on the device (clamped to T - 1 in the kernel). Returns [B, H, Dv] in q's dtype.
    block_n: keys per chunk; default 8192 / padded width, at most 256 (a row of ~256 keys in one or two chunks: on an
    H100 a 65k-position row of 256 keys at width 32 took 4.4 us with 256 keys and 4 warps against 8.3 us with 64 keys
    and 2 warps, bench/dev_decode_kernel.py)."""
    B, H, Dk = q.shape
    Dv = v_cache.shape[-1]
    if max(Dk, Dv) > 512:
        raise ValueError(f"the decode kernel takes head widths up to 512, got {Dk} and {Dv}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last dimension")
    dk_p, dv_p = triton.next_power_of_2(Dk), triton.next_power_of_2(Dv)
    block_n = block_n or max(16, min(256, 8192 // max(dk_p, dv_p)))
    o = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    _attn_decode_kernel[(B * H,)](
        q, k_cache, v_cache, o, pos, params, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1), H, params.shape[0],
        k_cache.shape[2],
        DK=Dk, DV=Dv, DK_P=dk_p, DV_P=dv_p, BLOCK_N=block_n, num_warps=num_warps)
    return o
