"""Backward of a block-diagonal segment in one kernel: dQ, dK, dV (and, first, Delta = rowsum(dO * O)) for every row.
Two segments are block-causal in their own order: the fixed pattern's own-block band (query i sees keys j of its own
L-row block with j <= i), and the strided pattern's transposed part (chunk c holds positions c, c + L, c + 2L, ...;
a query sees the earlier slots of its chunk, itself too unless the band holds the diagonal).

Legend: B batch, H heads, N sequence, D head dim, L block (or chunk length C), T tile, NT = ceil(L / T) tiles per
block.

No key outside a block reaches its queries, so one program per (block, batch x head) owns every gradient row of its
block: no atomics, nothing added across programs. It walks the block's key tiles kt, and for each the query tiles
qt >= kt (the diagonal tile masked causally): P = exp2(S - LSE) from the saved log-sum-exp of the whole layout,
dV += P^T dO, dS = P * (dO V^T - Delta), dK += dS^T Q in registers, stored once per key tile; dQ += dS K goes to
memory (stored at kt = 0, added to after), and a barrier after each key tile makes the program's own dQ stores
visible to its next loads. As the first segment (the band) it computes Delta from O and dO at each visit and stores
it at kt = 0 for the later segments' kernels; as a later one (the transposed chunks) it reads that Delta and adds its
dQ, dK, dV to what the band's kernels stored. Against the generic pair (a dQ kernel, then a dK/dV kernel) it reads
Q, K, V and dO once per tile pair instead of twice and launches once; against the fused dK/dV kernel of the transposed
part it needs no fp32 dQ (atomics) and no cast after. The price: dQ of a query tile after a block's first goes
through memory in the input's dtype once per key tile before it (up to NT - 1 extra roundings for 16-bit inputs; the
generic path rounds once per segment).
Where it runs: function.backward, for a first segment that is exactly block-causal with one block length L for every
head, or a later transposed segment (Launch.block), where block_tile has a tile; SPARSE_TRANSFORMER_BLOCK_BWD=0 turns
it off.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .common import NUM_SEG_PARAMS, P_STR, P_STR_MIN
from .forward import _dot
from .launcher import cdiv, launch as launch_kernel

BLOCK_BWD = os.environ.get("SPARSE_TRANSFORMER_BLOCK_BWD", "1") != "0"
# The largest tile: compiled for sm_90 (Triton 3.6, bench/compile_probe.py-style), 64-row tiles do not spill (d=64 on
# 4 warps: 247 registers; d=128 on 8 warps: 255), 128-row tiles do (d=64 on 8 warps: 176 bytes; d=128: 928 bytes).
MAX_TILE = 64
MAX_TILES = 4  # tiles of MAX_TILE per block (L <= 256): one program walks nt (nt + 1) / 2 tile pairs in a row, so
# longer blocks leave the GPU with few, long programs; they take the generic kernels (measured up to L = 256)
# Software pipelining of the query-tile loop, on 64-row tiles of 16-bit inputs with head dims up to 64 (d=128 always
# 1: 2 stages need 112 KiB of shared memory there, more than sm_86 / sm_89 give a block, and spill; 32-row tiles
# measured slower on 2; fp32 was not timed).
# H200, bench/block_bwd.py (block-bwd-20261130-174905.json, block kernel us, 1 -> 2 stages): fixed-12k 87 -> 83,
# fixed-64k 317 -> 303, strided-64k 361 -> 351, strided-12k on 32-row tiles 138 -> 164 (on cut 64-row tiles 133 ->
# 130). 8 warps were slower everywhere (fixed-12k 153 us, strided-12k 296, strided-64k 628).
STAGES = 2
# Transposed chunks longer than a tile go on cut 64-row tiles even where 32-row tiles divide them: strided-12k (C =
# 96) 138 us on three 32-row tiles, 130 on two 64-row tiles (2 stages; graph fwd+bwd 0.487 -> 0.477 ms), same run.
RAGGED = True
# A transposed segment that comes first (the strided-only layers of the presets' interleaved arrangement), every head
# with the strided part, stores its rows and Delta (SPARSE_TRANSFORMER_BLOCK_FIRST=0 gives them the generic dQ and
# dK/dV pair). H200, python bench/block_bwd.py (block-bwd-20261130-193929.json), graph fwd+bwd: strided-only-12k 0.309
# -> 0.232 ms (dQ 72 + dK/dV 111 us -> 105), strided-only-3k (d=128) 0.126 -> 0.101 (29 + 35 -> 38); gradients 1.6e-3
# relative from the generic pair's (bf16).
# A one-kernel backward for the merged pattern's causal-window band (each program a span of tiles, recomputing the
# pairs at its edges) measured slower than the generic pair there (strided-12k 169 us at its best span against 65 +
# 98, strided-64k 715 against 208 + 340; block-bwd-20261130-193904.json) and was removed (window_backward.py, last
# in commit 5695b9a).
FIRST_CHUNKS = os.environ.get("SPARSE_TRANSFORMER_BLOCK_FIRST", "1") != "0"
# Query tiles shorter than the key tiles (_tile_pair_keys: the keys are the rows of every product but dQ): on Hopper
# with Triton 3.6 (the compiler they were measured with) and 16-bit inputs, 32-row query tiles beside 64-row key tiles
# at d=64, capped at 168 registers: 237 -> 168 with no spill (204 uncapped; Triton 3.6, sm_90), 3 programs per SM
# instead of 2. Only on blocks of at most SHORT_Q_TILES key tiles. H200, ONLY="query tile;defaults" python
# bench/block_bwd.py (block-bwd-20261201-055114.json), block kernel us (graph fwd+bwd ms), defaults before -> this:
# strided-12k (C = 96, 2 key tiles) 128 -> 112 (0.441 -> 0.424), fixed-12k (L = 128) even: 83 -> 82 (0.977 ->
# 0.973); on longer blocks it lost: strided-64k (C = 256) 346 -> 387 (1.315 -> 1.354), fixed-64k (L = 256) 303 -> 341.
# Uncapped 32-row tiles lost everywhere (strided-12k 132), 16-row ones too, capped at 168 or 144 (strided-12k 135,
# 141). The rule also takes first chunks (strided-only layers), fp16, L = 64 and chunks of up to 64 on a cut tile,
# which that run did not time.
QUERY_TILES = {(64, 64): 32}  # (head dim, key tile) -> query tile
MAXNREG = {(64, 64, 32): 168}  # (head dim, key tile, query tile) -> registers per thread
SHORT_Q_TILES = 2
QUERY_TILE = None  # an int forces query tiles of that length wherever they divide the key tile (tests, benchmarks)
WARPS = None  # None: 8 where a tile holds more than 64 x 64 elements (d=128), else 4


def block_tile(L: int, head_dim: int, transposed: bool = False) -> int | None:
    """The tile T of the block kernel for block length L (None: the generic kernels take it), for head dims up to
    128 (the tested ones): the largest power of two from 16 to MAX_TILE that divides L, for L up to MAX_TILES *
    MAX_TILE. Transposed chunks (slots past C fall past the sequence, so the kernel masks them) longer than the
    largest tile with RAGGED, or with no tile that divides them, take cut tiles: the largest tile, or for chunks
    shorter than it the smallest power of two that holds them (C = 10 -> 16). With head dims over 64 they stop at
    32-row tiles (64-row ones spill there: 136 bytes at d=128 on 8 warps, Triton 3.6, sm_90)."""
    top = min(MAX_TILE, 32) if transposed and head_dim > 64 else MAX_TILE
    if head_dim > 128 or L > MAX_TILES * top:
        return None
    if transposed and RAGGED and L > top:
        return top
    t = top
    while t >= 16:
        if L % t == 0:
            return t
        t //= 2
    if transposed:  # cut tiles: one of the smallest power of two >= L, or the largest
        return min(top, max(16, 1 << (L - 1).bit_length()))
    return None


@triton.jit
def _head_bases(bh, H, q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, stride_qb, stride_qh, stride_kb, stride_kh,
                stride_vb, stride_vh, stride_ob, stride_oh):
    """Batch and head of a (batch x head) index (64-bit: B * H * N * D may pass 2^31), and the start of its rows in
    q, k, v, o, do and dq (o, do and dq share strides)."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return (b, h, q_ptr + b * stride_qb + h * stride_qh, k_ptr + b * stride_kb + h * stride_kh,
            v_ptr + b * stride_vb + h * stride_vh, o_ptr + b * stride_ob + h * stride_oh,
            do_ptr + b * stride_ob + h * stride_oh, dq_ptr + b * stride_ob + h * stride_oh)


@triton.jit
def _tile_pair(q, k, v, do, delta, lse_ptrs, q_ok, i, j, lo, dk, dv, qk_scale, sm_scale, IEEE: tl.constexpr):
    """One (query tile, key tile) pair of a backward that owns its rows: P = exp2(S - LSE) from the saved log-sum-exp
    of the whole layout, kept where i >= j + lo (one compare per element, j + lo per key). Keys past the sequence need
    no mask of their own: they come after every stored query (in a transposed chunk, j = r' L + c >= N > i = r L + c
    means r' > r), and queries past it have P = 0 (their LSE reads as +inf). dV += P^T dO, dS = P * (dO V^T - Delta),
    dK += dS^T Q. Returns dK, dV and this pair's share of dQ (dS K, scaled)."""
    lse = tl.load(lse_ptrs, mask=q_ok, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
    p = tl.math.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])  # (TILE queries, TILE keys)
    p = tl.where(i[:, None] >= (j + lo)[None, :], p, 0.0)
    dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    return dk, dv, _dot(ds.to(k.dtype), k, IEEE) * sm_scale


@triton.jit
def _tile_pair_keys(q, k, v, do, delta, lse_ptrs, q_ok, i, j, lo, dk, dv, qk_scale, sm_scale, IEEE: tl.constexpr):
    """_tile_pair with keys as the rows of every product (query tiles shorter than key tiles, QUERY_TILE): S^T = K
    Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q all have the key tile's rows (64, what one warpgroup's wgmma
    takes), and only dQ = dS K has the query tile's. Returns dK, dV and this pair's dQ."""
    lse = tl.load(lse_ptrs, mask=q_ok, other=float("-inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
    pt = tl.math.exp2(_dot(k, tl.trans(q), IEEE) * qk_scale - lse[None, :])  # (key tile, query tile)
    pt = tl.where(i[None, :] >= (j + lo)[:, None], pt, 0.0)  # (the mask of _tile_pair)
    dv += _dot(pt.to(do.dtype), do, IEEE)
    dst = pt * (_dot(v, tl.trans(do), IEEE) - delta[None, :])
    dk += _dot(dst.to(q.dtype), q, IEEE)
    return dk, dv, _dot(tl.trans(dst.to(k.dtype)), k, IEEE) * sm_scale


@triton.jit
def _attn_bwd_block_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, prm_ptr,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,  # shared by o, do and dq
    stride_gb, stride_gh, stride_gn,  # dk's and dv's
    BH, H, N, BLK, TH, SEG_L,
    IEEE: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr, KIND: tl.constexpr, DELTA: tl.constexpr,
    ACCUM: tl.constexpr, TQ: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid % BH
    blk = pid // BH
    b, h, q_base, k_base, v_base, o_base, do_base, dq_base = _head_bases(
        bh, H, q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb,
        stride_vh, stride_ob, stride_oh)
    row = bh.to(tl.int64) * N  # lse / delta rows (64-bit: B * H * N may pass 2^31)
    offs = tl.arange(0, TILE)
    offs_q = tl.arange(0, TQ)  # query tiles: TILE, or a divisor of it (QUERY_TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    if KIND == 1:  # transposed strided part: block blk is column blk of the [C, L] view, slot r at r * L + blk
        prm = prm_ptr + (h % TH) * NUM_SEG_PARAMS
        start = 0
        step = SEG_L
        first = blk
        dmin = tl.load(prm + P_STR_MIN)  # keys with i - j >= dmin: L when the band holds the diagonal, else 0
        # slots past C in a cut last tile sit at r * L + blk >= C * L >= N: masked as past the sequence
        nt = tl.where(tl.load(prm + P_STR) > 0, tl.cdiv(BLK, TILE), 0)  # heads without the strided part: nothing
        nqt = tl.cdiv(BLK, TQ)
    else:  # natural block-causal band: block blk is rows blk * L ..
        start = blk * BLK
        step = 1
        first = 0
        dmin = 0
        nt = tl.cdiv(tl.minimum(BLK, N - start), TILE)  # the last block may be cut by N
        nqt = tl.cdiv(tl.minimum(BLK, N - start), TQ)
    for kt in range(0, nt):
        j = (start + kt * TILE + offs) * step + first
        k_ok = j < N
        k = tl.load(k_base + j.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        dk = tl.zeros([TILE, HEAD_DIM], tl.float32)
        dv = tl.zeros([TILE, HEAD_DIM], tl.float32)
        for qt in range(kt * (TILE // TQ), nqt):
            i = (start + qt * TQ + offs_q) * step + first
            q_ok = i < N
            g_off = i.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
            q = tl.load(q_base + i.to(tl.int64)[:, None] * stride_qn + offs_d[None, :], mask=q_ok[:, None],
                        other=0.0)
            do = tl.load(do_base + g_off, mask=q_ok[:, None], other=0.0)
            # the dQ rows this pair adds to (the earlier key tiles' and segments' share: this program's own stores),
            # loaded before its products, so that their latency hides under them (H200, bench/ab_rev.py, 2026-12-01,
            # ab-rev-20261201-152018-block.json: block kernel us, loaded after -> before, strided-64k 345.4 -> 335.1,
            # strided-3k 47.1 -> 46.3; strided-12k even)
            dq_ok = q_ok if ACCUM else q_ok & (kt > 0)
            dq_prev = tl.load(dq_base + g_off, mask=dq_ok[:, None], other=0.0)
            if DELTA:
                o = tl.load(o_base + g_off, mask=q_ok[:, None], other=0.0)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
                tl.store(delta_ptr + row + i, delta, mask=q_ok & (kt == 0))
            else:  # an earlier segment's kernel stored it
                delta = tl.load(delta_ptr + row + i, mask=q_ok, other=0.0)
            # keys with i - j >= dmin: causal on the diagonal tile
            if TQ == TILE:
                dk, dv, dq = _tile_pair(q, k, v, do, delta, lse_ptr + row + i, q_ok, i, j, dmin, dk, dv, qk_scale,
                                        sm_scale, IEEE)
            else:
                dk, dv, dq = _tile_pair_keys(q, k, v, do, delta, lse_ptr + row + i, q_ok, i, j, dmin, dk, dv,
                                             qk_scale, sm_scale, IEEE)
            dq += dq_prev.to(tl.float32)
            tl.store(dq_base + g_off, dq.to(dq_ptr.dtype.element_ty), mask=q_ok[:, None])
        g = b * stride_gb + h * stride_gh + j.to(tl.int64)[:, None] * stride_gn + offs_d[None, :]
        dk = dk * sm_scale
        if ACCUM:  # add to the earlier segments' dK / dV of these keys
            dk += tl.load(dk_ptr + g, mask=k_ok[:, None], other=0.0).to(tl.float32)
            dv += tl.load(dv_ptr + g, mask=k_ok[:, None], other=0.0).to(tl.float32)
        tl.store(dk_ptr + g, dk.to(dk_ptr.dtype.element_ty), mask=k_ok[:, None])
        tl.store(dv_ptr + g, dv.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None])
        tl.debug_barrier()  # this key tile's dQ stores before the next one's loads


def block_backward(q, k, v, o, do, dq, dk, dv, lse, delta, L, scale, launch=None, *, first):
    """dQ, dK, dV of one segment that is block-causal in its own order, with block length L for every head. q, k, v,
    o, do: [B, H, N, D] (last dim contiguous); o, do and dq share strides, dk and dv share theirs; lse: fp32 [B, H, N]
    of the whole layout; delta: fp32 [B, H, N].
    launch None: the natural band, first segment: stores dQ, dK, dV and Delta (for the later segments).
    launch a transposed strided segment's function.Launch (L its chunk length C): adds to the dQ, dK, dV the earlier
    segments stored and reads their Delta; or, first (every head with the strided part: FIRST_CHUNKS), stores them (and
    Delta, which no later segment reads today: such a layout has no other segment)."""
    B, H, N, D = q.shape
    assert dq.stride() == do.stride() == o.stride() and dk.stride() == dv.stride()
    chunks = launch is not None
    tile = block_tile(L, D, transposed=chunks)
    warps = WARPS or (8 if tile * D > 64 * 64 else 4)
    blocks = launch.seg.L if chunks else cdiv(N, L)
    prm = launch.prm if chunks else lse  # natural: never read
    later = chunks and not first
    capped = _capped(q)
    tq = query_tile(tile, D, L, capped)
    opts = dict(num_warps=warps, num_stages=_stages(q.dtype, D, tile))
    cap = MAXNREG.get((D, tile, tq)) if capped else None
    if cap:
        opts["maxnreg"] = cap
    launch_kernel(_attn_bwd_block_kernel, (blocks * B * H,),
                  (q, k, v, o, do, dq, dk, dv, lse, delta, prm),
                  (scale * 1.4426950408889634, scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                   *do.stride()[:3], *dk.stride()[:3], B * H, H, N, L, prm.shape[0] if chunks else 1,
                   launch.seg.L if chunks else 1),
                  dict(IEEE=q.dtype == torch.float32, TILE=tile, HEAD_DIM=D, KIND=int(chunks), DELTA=not later,
                       ACCUM=later, TQ=tq, **opts))


def query_tile(tile: int, head_dim: int, L: int, capped: bool) -> int:
    """The query tile beside key tile `tile` for blocks of L: QUERY_TILE where set, else QUERY_TILES' where the caps
    apply (capped) and the block has at most SHORT_Q_TILES key tiles; kept only where it is at least 16 (the smallest
    tl.dot), smaller than the key tile and divides it; else the key tile."""
    if QUERY_TILE is not None:
        tq = QUERY_TILE
    else:
        tq = QUERY_TILES.get((head_dim, tile)) if capped and L <= SHORT_Q_TILES * tile else None
    return tq if tq and 16 <= tq < tile and tile % tq == 0 else tile


def _capped(q) -> bool:
    """Do the measured register caps (MAXNREG, and QUERY_TILES with them) apply to these inputs: 16-bit, on Hopper,
    with the Triton they were measured with (function.caps_measured_on, as the forwards' caps)?"""
    if q.dtype == torch.float32 or q.device.type != "cuda":
        return False
    return _hopper_triton(q.device.index)


@functools.lru_cache(maxsize=None)
def _hopper_triton(index) -> bool:
    """function.caps_measured_on for device `index`, cached (it runs on every backward)."""
    from .function import caps_measured_on  # function imports this module

    return caps_measured_on(torch.device("cuda", index))


def _stages(dtype, head_dim, tile) -> int:
    """STAGES on 64-row tiles of 16-bit inputs with head dims up to 64 (where 2 were measured faster), else 1."""
    return STAGES if dtype != torch.float32 and head_dim <= 64 and tile == 64 else 1
