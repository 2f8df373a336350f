"""The fixed pattern's gathered summary part (forward, dQ, dK / dV) as Gluon kernels for Hopper; on by default where
they apply (`eligible`, Triton 3.6), SPARSE_TRANSFORMER_GLUON=0 turns them off.

TMA loads into a ring of shared-memory stages and asynchronous wgmma. The summary keys of every block (rows lo .. lo + c
of each L-row block) are first copied into a contiguous [B, H, n / L * c, D] tensor, so that every key tile is one TMA
box; a query tile of block b sees the summary keys of blocks 0 .. b - 1: key slots [0, b * c), a column limit.
- Forward (`_gather_fwd_kernel`): online softmax over the summary tiles, merged into the band's O / LSE. PIPE 1 / 2
  issue the next tile's Q K^T before this tile's softmax (2: FlashAttention-3's order, this tile's P V running into the
  next softmax); measured slower than PIPE 0 on an H200 (BENCHMARKS.md), which the library runs.
- dQ (`_gather_dq_kernel`): per key tile S = Q K^T and dP = dO V^T, the next tile's two products issued before this
  tile's element-wise work, dQ += dS K waited within the iteration; added to the band's dQ.
- dK / dV (`_gather_dkdv_kernel`): per tile of summary keys, the query and dO tiles of the later blocks stream through
  the ring (the mirror of dQ); added to the band's dK / dV at the summary rows.
- Experimental, off by default (FUSE_BAND, SPARSE_TRANSFORMER_GLUON_BAND=1; not yet run on a GPU): BAND folds the
  band (the own block, causal) into the forward and dQ kernels, so the fixed pattern's forward and dQ are one launch
  each (`forward_fixed`, `backward_fixed_dq`).

Gluon has no interpreter: `python bench/gluon_gather.py compile` compiles every setting for sm_90 on a CPU machine,
`check` compares them with a float32 reference on a GPU and `time` times them beside the Triton kernels; the GPU tests
(test_gpu_gluon_*) check the library path (outputs and gradients) against the float64 reference. On an H200 at
fixed-64k: forward 1215 us against the Triton kernel's 1738, dQ 1300 against 2086, dK / dV 2429 against 2660
(BENCHMARKS.md).
"""
import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ...layouts import P_ALL, P_BLK, P_CUSTOM, P_WIN
from ..plan import GATHER, NATURAL, P_SUM_EXCL, P_SUM_L, P_SUM_LO
from .launcher import launch as launch_kernel

# per head dim, measured on an H200 (bench/gluon_gather.py time, BENCHMARKS.md): the forward without the in-loop
# overlap (PIPE 0: 180 registers, 1218 us at fixed-64k) beat PIPE 1 (1298) and PIPE 2 (1338-1372); d=128 on 8 warps
# (compiled for sm_90: 128 registers, no spills, 128 KiB of shared memory)
SETTINGS = {64: dict(BM=128, BN=64, stages=3, warps=4, pipe=0), 128: dict(BM=128, BN=64, stages=3, warps=8, pipe=0)}
# dQ: 64x64 on 4 warps took 1318 us at fixed-64k against 1798 for 128x64 on 8 warps; d=128 the other way round
# (230 us against 266 at fixed-12k-d128)
DQ_SETTINGS = {64: dict(BM=64, BN=64, stages=3, warps=4), 128: dict(BM=128, BN=64, stages=3, warps=8)}
# dK / dV (the summary keys' tiles, BN, against streamed query tiles, BM)
DKDV_SETTINGS = {64: dict(BM=64, BN=64, stages=3, warps=4), 128: dict(BM=64, BN=64, stages=2, warps=4)}
# the dK / dV kernel too (SPARSE_TRANSFORMER_GLUON_DKDV=0 leaves dK / dV to the Triton kernel)
DKDV = os.environ.get("SPARSE_TRANSFORMER_GLUON_DKDV", "1") != "0"
# experimental, off until checked on a GPU: the band's forward folded into the summary kernel (forward_fixed)
FUSE_BAND = os.environ.get("SPARSE_TRANSFORMER_GLUON_BAND", "0") == "1"
LAUNCHES = 0  # kernels launched through this path (tests check that it ran)


@gluon.jit
def _query_tile(NQB, G, SEG_L, SEG_C, BM: gl.constexpr, BN: gl.constexpr, BAND: gl.constexpr):
    """(batch x head, first query row, visible summary keys, first key of its own block, band key tiles, key tiles) of
    this program: every head's longest query tile first; a tile of block b sees the summary keys of blocks 0 .. b - 1
    (BM divides SEG_L) and, with BAND, first its own block's keys up to its last row (BN divides BM)."""
    bh = gl.program_id(0)
    q0 = (NQB - 1 - gl.program_id(1)) * BM
    kv_len = gl.minimum((q0 // SEG_L) * SEG_C, G)
    blk0 = (q0 // SEG_L) * SEG_L
    if BAND:
        n_band = (q0 + BM - blk0) // BN
    else:
        n_band = 0
    return bh, q0, kv_len, blk0, n_band, n_band + gl.cdiv(kv_len, BN)


@gluon.jit
def _kv_ring(k_desc, v_desc, STAGES: gl.constexpr, BN: gl.constexpr, D: gl.constexpr):
    """STAGES shared-memory slots for key / value tiles and one mbarrier per slot (initialised)."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(s), count=1)
    return k_smem, v_smem, kv_bar


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, tile, row0, pred, STAGES: gl.constexpr, BN: gl.constexpr,
             D: gl.constexpr):
    """TMA-load key / value tile `tile` (rows row0 + tile * BN ..) into its slot, tile % STAGES, when pred holds."""
    s = tile % STAGES
    mbarrier.expect(kv_bar.index(s), 2 * BN * D * 2, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row0 + tile * BN, 0], kv_bar.index(s), k_smem.index(s), pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row0 + tile * BN, 0], kv_bar.index(s), v_smem.index(s), pred=pred)


@gluon.jit
def _load_tile(kb_desc, vb_desc, k_desc, v_desc, k_smem, v_smem, kv_bar, tile, n_band, band_row0, sum_row0, pred,
               STAGES: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, BAND: gl.constexpr):
    """TMA-load key / value tile `tile` of a query tile's sequence into slot tile % STAGES, when pred holds: with BAND
    the band's tiles first (full K, V rows band_row0 + tile * BN ..), then the summary copies' (rows sum_row0 +
    (tile - n_band) * BN ..); without, the summary copies' alone."""
    if BAND:
        s = tile % STAGES
        in_band = tile < n_band
        mbarrier.expect(kv_bar.index(s), 2 * BN * D * 2, pred=pred)
        tma.async_copy_global_to_shared(kb_desc, [band_row0 + tile * BN, 0], kv_bar.index(s), k_smem.index(s),
                                        pred=pred & in_band)
        tma.async_copy_global_to_shared(vb_desc, [band_row0 + tile * BN, 0], kv_bar.index(s), v_smem.index(s),
                                        pred=pred & in_band)
        sum_row = sum_row0 + gl.maximum(tile - n_band, 0) * BN
        in_sum = tile >= n_band
        tma.async_copy_global_to_shared(k_desc, [sum_row, 0], kv_bar.index(s), k_smem.index(s), pred=pred & in_sum)
        tma.async_copy_global_to_shared(v_desc, [sum_row, 0], kv_bar.index(s), v_smem.index(s), pred=pred & in_sum)
    else:
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, tile, sum_row0, pred, STAGES, BN, D)


@gluon.jit
def _visible(j, cols, rows, blk0, n_band, kv_len, BN: gl.constexpr, BAND: gl.constexpr):
    """Which entries of key tile j a query tile sees (rows: its query rows, cols: arange(BN)): the summary slots before
    its block; with BAND, band tiles (j < n_band) causal from the block's first key blk0."""
    if BAND:
        band_ok = (gl.expand_dims(blk0 + j * BN + cols, 0) <= gl.expand_dims(rows, 1)) & (j < n_band)
        vis = band_ok | (gl.expand_dims((j - n_band) * BN + cols < kv_len, 0) & (j >= n_band))
    else:
        vis = gl.expand_dims(j * BN + cols < kv_len, 0)
    return vis


@gluon.jit
def _gather_fwd_kernel(q_desc, k_desc, v_desc, kb_desc, vb_desc, o_ptr, lse_ptr, qk_scale, N, G, NQB, SEG_L, SEG_C,
                       BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                       PIPE: gl.constexpr, MERGE: gl.constexpr, BAND: gl.constexpr, num_warps: gl.constexpr):
    """PIPE 0: each tile's Q K^T, softmax and P V one after another; 1: the next tile's Q K^T issued before this tile's
    softmax; 2 (FlashAttention-3's order): each iteration issues the next tile's Q K^T and this tile's P V, then runs
    the next tile's softmax while the P V runs, and waits for it before the loop turns (an accumulator still being
    written across the loop's back edge makes ptxas serialize the wgmma).
    BAND (PIPE 0 only; experimental): the query's own block too, causal (keys from the block's start to the query),
    before the summary keys, from full K / V (kb_desc, vb_desc): the whole fixed pattern in one launch, no merge."""
    gl.static_assert(PIPE == 0 or STAGES >= 2)
    gl.static_assert(not BAND or (PIPE == 0 and not MERGE))
    bh, q0, kv_len, blk0, n_band, n_tiles = _query_tile(NQB, G, SEG_L, SEG_C, BM, BN, BAND)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    k_smem, v_smem, kv_bar = _kv_ring(k_desc, v_desc, STAGES, BN, D)
    fence_async_shared()

    mbarrier.expect(q_bar, BM * D * 2)
    tma.async_copy_global_to_shared(q_desc, [bh * N + q0, 0], q_bar, q_smem)
    for s in gl.static_range(STAGES):  # the first STAGES key / value tiles
        _load_tile(kb_desc, vb_desc, k_desc, v_desc, k_smem, v_smem, kv_bar, s, n_band, bh * N + blk0, bh * G,
                   s < n_tiles, STAGES, BN, D, BAND)

    acc = gl.zeros([BM, D], gl.float32, o_layout)
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    mbarrier.wait(q_bar, 0)
    # S of the first tile (when there is none the loop below does not run and this result is masked out or unread)
    mbarrier.wait(kv_bar.index(0), 0, pred=n_tiles > 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
    if PIPE == 2:
        # the softmax of tile 0 before the loop; each iteration then does tile j's P V and tile j + 1's softmax (the
        # last one redoes its own tile's Q K^T with every column masked: p = 0, alpha = 1)
        sc = gl.where(gl.expand_dims(cols < kv_len, 0), s_cur, float("-inf"))
        m_i = gl.max(sc, 1) * qk_scale
        p = gl.exp2(sc * qk_scale - gl.expand_dims(gl.where(m_i == float("-inf"), 0.0, m_i), 1))
        l_i = gl.sum(p, 1)
        alpha = gl.zeros([BM], gl.float32, row_s)
        p_op = gl.convert_layout(p.to(v_desc.dtype), p_layout)
        for j in range(n_tiles):
            stage = j % STAGES
            nxt = gl.minimum(j + 1, n_tiles - 1)
            mbarrier.wait(kv_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)),
                                   gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
            s_next = warpgroup_mma_wait(1, deps=(s_next,))  # the Q K^T (issued first) is done; P V runs on
            sc = gl.where(gl.expand_dims((j + 1) * BN + cols < kv_len, 0), s_next, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            p_op = gl.convert_layout(p.to(v_desc.dtype), p_layout)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            # tile j's stage is free: load tile j + STAGES into it
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, j + STAGES, bh * G, j + STAGES < n_tiles, STAGES, BN, D)
    else:
        m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BM], gl.float32, row_s)
        for j in range(n_tiles):
            stage = j % STAGES
            if PIPE == 1:  # issue the next tile's Q K^T now: it runs while this tile's softmax does (the last tile
                # redoes its own, unread)
                nxt = gl.minimum(j + 1, n_tiles - 1)
                mbarrier.wait(kv_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
                s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)),
                                       gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            vis = _visible(j, cols, q0 + gl.arange(0, BM, layout=row_s), blk0, n_band, kv_len, BN, BAND)
            sc = gl.where(vis, s_cur, float("-inf"))
            # every row sees a key in tile 0 (kv_len > 0 without BAND; its own block's first key with BAND)
            m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            acc = warpgroup_mma(gl.convert_layout(p.to(v_desc.dtype), p_layout), v_smem.index(stage), acc,
                                is_async=True)
            if PIPE == 1:
                acc, s_next = warpgroup_mma_wait(0, deps=(acc, s_next))
                s_cur = s_next
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            # tile j's stage is free: load tile j + STAGES into it
            _load_tile(kb_desc, vb_desc, k_desc, v_desc, k_smem, v_smem, kv_bar, j + STAGES, n_band, bh * N + blk0,
                       bh * G, j + STAGES < n_tiles, STAGES, BN, D, BAND)
            if PIPE == 0:
                nxt = gl.minimum(j + 1, n_tiles - 1)
                mbarrier.wait(kv_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
                s_cur = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)),
                                      gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
                s_cur = warpgroup_mma_wait(0, deps=(s_cur,))

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(s))
    has = l_i > 0
    l_safe = gl.where(has, l_i, 1.0)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
    lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    rows_o = q0 + gl.arange(0, BM, layout=row_o)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = o_ptr + (bh.to(gl.int64) * N + gl.expand_dims(rows_o, 1)) * D + gl.expand_dims(offs_d, 0)
    o_ok = gl.expand_dims(rows_o < N, 1)
    rows_s = q0 + gl.arange(0, BM, layout=row_s)
    lse_ptrs = lse_ptr + bh.to(gl.int64) * N + rows_s
    if MERGE:  # fold into the earlier segments' O / LSE (softmaxes over disjoint keys merge through the LSE)
        lse_prev = gl.load(lse_ptrs, mask=rows_s < N, other=float("-inf"))
        mx = gl.maximum(lse_prev, lse)
        mx = gl.where(mx == float("-inf"), 0.0, mx)
        w_prev = gl.exp(lse_prev - mx)
        w_new = gl.exp(lse - mx)
        tot = w_prev + w_new
        tot_safe = gl.where(tot > 0, tot, 1.0)
        o_prev = gl.load(o_ptrs, mask=o_ok, other=0.0).to(gl.float32)
        o = (o_prev * gl.expand_dims(gl.convert_layout(w_prev / tot_safe, row_o), 1)
             + o * gl.expand_dims(gl.convert_layout(w_new / tot_safe, row_o), 1))
        lse = gl.where(tot > 0, mx + gl.log(tot_safe), float("-inf"))
    gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_ok)
    gl.store(lse_ptrs, lse, mask=rows_s < N)


@gluon.jit
def _gather_dq_kernel(q_desc, do_desc, k_desc, v_desc, kb_desc, vb_desc, dq_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr,
                      qk_scale, sm_scale, N, G, NQB, SEG_L, SEG_C, BM: gl.constexpr, BN: gl.constexpr,
                      D: gl.constexpr, STAGES: gl.constexpr, BAND: gl.constexpr, num_warps: gl.constexpr):
    """dQ of the gathered part, added to the dQ an earlier segment stored (which also stored Delta = rowsum(dO * O)):
    per key tile S = Q K^T and dP = dO V^T, then dS = P * (dP - Delta) and dQ += dS K. The next tile's two products
    are issued before this tile's element-wise work and run during it; dQ's product is waited within the iteration.
    BAND (experimental): the query's own block too (causal, from full K / V: kb_desc, vb_desc, before the summary
    keys), Delta computed here from O and dO (o_ptr, do_ptr) and stored for the dK / dV kernels, dQ stored, not
    added: the whole fixed pattern's dQ in one launch."""
    gl.static_assert(STAGES >= 2)
    bh, q0, kv_len, blk0, n_band, n_tiles = _query_tile(NQB, G, SEG_L, SEG_C, BM, BN, BAND)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, D, 16])
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [BM, D], do_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    k_smem, v_smem, kv_bar = _kv_ring(k_desc, v_desc, STAGES, BN, D)
    fence_async_shared()

    mbarrier.expect(q_bar, 2 * BM * D * 2)
    tma.async_copy_global_to_shared(q_desc, [bh * N + q0, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [bh * N + q0, 0], q_bar, do_smem)
    for s in gl.static_range(STAGES):
        _load_tile(kb_desc, vb_desc, k_desc, v_desc, k_smem, v_smem, kv_bar, s, n_band, bh * N + blk0, bh * G,
                   s < n_tiles, STAGES, BN, D, BAND)

    rows_s = q0 + gl.arange(0, BM, layout=row_s)
    lse = gl.load(lse_ptr + bh.to(gl.int64) * N + rows_s, mask=rows_s < N, other=float("-inf")) * 1.4426950408889634
    lse = gl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
    if BAND:  # Delta = rowsum(dO * O), for this kernel and the dK / dV kernels after it
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        rows_b = q0 + gl.arange(0, BM, layout=gl.SliceLayout(1, blk))
        cols_b = gl.arange(0, D, layout=gl.SliceLayout(0, blk))
        off = (bh.to(gl.int64) * N + gl.expand_dims(rows_b, 1)) * D + gl.expand_dims(cols_b, 0)
        ok_b = gl.expand_dims(rows_b < N, 1)
        delta_b = gl.sum(gl.load(o_ptr + off, mask=ok_b, other=0.0).to(gl.float32)
                         * gl.load(do_ptr + off, mask=ok_b, other=0.0).to(gl.float32), 1)
        gl.store(delta_ptr + bh.to(gl.int64) * N + rows_b, delta_b, mask=rows_b < N)
        delta = gl.convert_layout(delta_b, row_s)
    else:
        delta = gl.load(delta_ptr + bh.to(gl.int64) * N + rows_s, mask=rows_s < N, other=0.0)
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    dq = gl.zeros([BM, D], gl.float32, o_layout)
    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_bar.index(0), 0, pred=n_tiles > 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dp_cur = warpgroup_mma(do_smem, v_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_cur, dp_cur = warpgroup_mma_wait(0, deps=(s_cur, dp_cur))
    for j in range(n_tiles):
        stage = j % STAGES
        nxt = gl.minimum(j + 1, n_tiles - 1)  # the last iteration redoes its own tile, unread
        mbarrier.wait(kv_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)), zero_s, use_acc=False,
                               is_async=True)
        dp_next = warpgroup_mma(do_smem, v_smem.index(nxt % STAGES).permute((1, 0)), zero_s, use_acc=False,
                                is_async=True)
        p = gl.exp2(s_cur * qk_scale - gl.expand_dims(lse, 1))
        p = gl.where(_visible(j, cols, rows_s, blk0, n_band, kv_len, BN, BAND), p, 0.0)
        ds = p * (dp_cur - gl.expand_dims(delta, 1))
        dq = warpgroup_mma(gl.convert_layout(ds.to(k_desc.dtype), ds_layout), k_smem.index(stage), dq,
                           is_async=True)
        dq, s_cur, dp_cur = warpgroup_mma_wait(0, deps=(dq, s_next, dp_next))
        # tile j's stage is free: load tile j + STAGES into it
        _load_tile(kb_desc, vb_desc, k_desc, v_desc, k_smem, v_smem, kv_bar, j + STAGES, n_band, bh * N + blk0, bh * G,
                   j + STAGES < n_tiles, STAGES, BN, D, BAND)
    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(s))
    rows_o = q0 + gl.arange(0, BM, layout=row_o)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    dq_ptrs = dq_ptr + (bh.to(gl.int64) * N + gl.expand_dims(rows_o, 1)) * D + gl.expand_dims(offs_d, 0)
    ok = gl.expand_dims(rows_o < N, 1)
    dq = dq * sm_scale
    if not BAND:  # add to the band's dQ
        dq += gl.load(dq_ptrs, mask=ok, other=0.0).to(gl.float32)
    gl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=ok)


@gluon.jit
def _gather_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, qk_scale, sm_scale, N,
                        G, NB, SEG_L, SEG_LO, SEG_C, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                        STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dK / dV of the gathered part for BN summary keys (slots k0 .. k0 + BN), added to the dK / dV an earlier
    segment stored at their rows: per query tile S^T = K Q^T and dP^T = V dO^T, then P^T = exp(S^T - LSE), dV += P^T dO,
    dS^T = P^T * (dP^T - Delta), dK += dS^T Q. Summary slot s (block s // SEG_C) is seen by the queries of the later
    blocks: rows from (s // SEG_C + 1) * SEG_L on. Query / dO tiles stream through the ring; the next tile's two
    products are issued before this tile's element-wise work."""
    gl.static_assert(STAGES >= 2)
    bh = gl.program_id(0)
    k0 = gl.program_id(1) * BN  # tile 0 has the most queries: its programs start first
    q_start = (k0 // SEG_C + 1) * SEG_L  # the first query row that sees a key of this tile (BM divides SEG_L)
    n_tiles = gl.cdiv(gl.maximum(N - q_start, 0), BM)

    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BM, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, D, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    col_st: gl.constexpr = gl.SliceLayout(0, st_layout)  # along the query rows of a tile
    row_st: gl.constexpr = gl.SliceLayout(1, st_layout)  # along the key slots

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [BN, D], v_desc.layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(k_bar, count=1)
    q_smem, do_smem, q_bar = _kv_ring(q_desc, do_desc, STAGES, BM, D)
    fence_async_shared()

    mbarrier.expect(k_bar, 2 * BN * D * 2)
    tma.async_copy_global_to_shared(k_desc, [bh * G + k0, 0], k_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [bh * G + k0, 0], k_bar, v_smem)
    row0 = bh * N + q_start
    for s in gl.static_range(STAGES):
        _load_kv(q_desc, do_desc, q_smem, do_smem, q_bar, s, row0, s < n_tiles, STAGES, BM, D)

    slots = k0 + gl.arange(0, BN, layout=row_st)
    first_row = gl.expand_dims((slots // SEG_C + 1) * SEG_L, 1)  # of the queries that see each slot
    cols = gl.arange(0, BM, layout=col_st)
    base = bh.to(gl.int64) * N
    zero_st = gl.zeros([BN, BM], gl.float32, st_layout)
    dk = gl.zeros([BN, D], gl.float32, kv_layout)
    dv = gl.zeros([BN, D], gl.float32, kv_layout)
    # LSE (log2) and Delta of the first tile; rows past N (the next head's, or TMA's zeros): LSE = +inf, so P = 0
    rows = q_start + cols
    lse_cur = gl.load(lse_ptr + base + rows, mask=rows < N, other=float("-inf")) * 1.4426950408889634
    lse_cur = gl.where(lse_cur == float("-inf"), float("inf"), lse_cur)
    delta_cur = gl.load(delta_ptr + base + rows, mask=rows < N, other=0.0)
    mbarrier.wait(k_bar, 0)
    mbarrier.wait(q_bar.index(0), 0, pred=n_tiles > 0)
    s_cur = warpgroup_mma(k_smem, q_smem.index(0).permute((1, 0)), zero_st, use_acc=False, is_async=True)
    dp_cur = warpgroup_mma(v_smem, do_smem.index(0).permute((1, 0)), zero_st, use_acc=False, is_async=True)
    s_cur, dp_cur = warpgroup_mma_wait(0, deps=(s_cur, dp_cur))
    for j in range(n_tiles):
        stage = j % STAGES
        nxt = gl.minimum(j + 1, n_tiles - 1)  # the last iteration redoes its own tile, unread
        mbarrier.wait(q_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
        s_next = warpgroup_mma(k_smem, q_smem.index(nxt % STAGES).permute((1, 0)), zero_st, use_acc=False,
                               is_async=True)
        dp_next = warpgroup_mma(v_smem, do_smem.index(nxt % STAGES).permute((1, 0)), zero_st, use_acc=False,
                                is_async=True)
        rows_next = q_start + (j + 1) * BM + cols
        lse_next = gl.load(lse_ptr + base + rows_next, mask=rows_next < N, other=float("-inf")) * 1.4426950408889634
        delta_next = gl.load(delta_ptr + base + rows_next, mask=rows_next < N, other=0.0)
        rows = q_start + j * BM + cols
        p = gl.exp2(s_cur * qk_scale - gl.expand_dims(lse_cur, 0))
        p = gl.where(gl.expand_dims(rows, 0) >= first_row, p, 0.0)
        ds = p * (dp_cur - gl.expand_dims(delta_cur, 0))
        dv = warpgroup_mma(gl.convert_layout(p.to(q_desc.dtype), op_layout), do_smem.index(stage), dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds.to(q_desc.dtype), op_layout), q_smem.index(stage), dk, is_async=True)
        dv, dk, s_cur, dp_cur = warpgroup_mma_wait(0, deps=(dv, dk, s_next, dp_next))
        lse_cur = gl.where(lse_next == float("-inf"), float("inf"), lse_next)
        delta_cur = delta_next
        # tile j's stage is free: load tile j + STAGES into it
        _load_kv(q_desc, do_desc, q_smem, do_smem, q_bar, j + STAGES, row0, j + STAGES < n_tiles, STAGES, BM, D)
    mbarrier.invalidate(k_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(q_bar.index(s))
    # slot s -> row (s // SEG_C) * SEG_L + SEG_LO + s % SEG_C; the padding slots past NB * SEG_C are not stored
    slots_o = k0 + gl.arange(0, BN, layout=gl.SliceLayout(1, kv_layout))
    rows_o = (slots_o // SEG_C) * SEG_L + SEG_LO + slots_o % SEG_C
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, kv_layout))
    off = (base + gl.expand_dims(rows_o, 1)) * D + gl.expand_dims(offs_d, 0)
    ok = gl.expand_dims(slots_o < NB * SEG_C, 1)
    dk = dk * sm_scale + gl.load(dk_ptr + off, mask=ok, other=0.0).to(gl.float32)
    dv = dv + gl.load(dv_ptr + off, mask=ok, other=0.0).to(gl.float32)
    gl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=ok)
    gl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=ok)


def summary_kv(x, L, lo, c, multiple=128):
    """The summary rows (lo .. lo + c of every L-row block) of x [B, H, n, D], contiguous: [B, H, G, D] with
    G = n // L * c rounded up to `multiple` with zero rows, so that no key tile reaches into the next head's keys.
    One strided copy (and a fill of the padding rows where there are any)."""
    B, H, n, D = x.shape
    nb = n // L
    g = nb * c
    gp = max(-(-g // multiple), 1) * multiple  # never empty: a TMA descriptor needs a row
    sb, sh, sn, sd = x.stride()
    out = x.new_empty(B, H, gp, D)
    out.as_strided((B, H, nb, c, D), (H * gp * D, gp * D, c * D, D, 1)).copy_(
        x.as_strided((B, H, nb, c, D), (sb, sh, L * sn, sn, sd), x.storage_offset() + lo * sn))
    if gp > g:
        out[:, :, g:].zero_()
    return out


@functools.lru_cache(maxsize=None)
def _layout(rows, D, dtype):
    """The shared-memory layout of a rows x D tile of a torch dtype (built once: about 7 us each on the host)."""
    return gl.NVMMASharedLayout.get_default_for([rows, D], _GL_DTYPES[dtype])


def _layouts(BM, BN, D, dtype):
    return _layout(BM, D, dtype), _layout(BN, D, dtype)


def _desc(x, rows, memo=None):
    """A TMA descriptor over x [B, H, R, D] (contiguous) seen as B * H * R rows, in boxes of rows x D; memo (a dict)
    shares descriptors between the launches of one call."""
    if memo is not None and (id(x), rows) in memo:
        return memo[id(x), rows]
    assert x.is_contiguous(), "a TMA descriptor of rows needs a contiguous tensor"
    D = x.shape[-1]
    x2 = x.view(-1, D)
    d = TensorDescriptor(x2, list(x2.shape), [D, 1], [rows, D], _layout(rows, D, x.dtype))
    if memo is not None:
        memo[id(x), rows] = d
    return d


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def gather_forward(q, k_sum, v_sum, o, lse, L, c, scale, merge, BM=128, BN=64, stages=3, warps=4, pipe=2, k=None,
                   v=None):
    """Attention of each query over the summary keys of the blocks before its own (k_sum, v_sum from summary_kv),
    written to o [B, H, n, D] and lse fp32 [B, H, n] (contiguous), or merged into what they hold (merge). With k, v
    (contiguous, experimental): over its own block's keys too, causal (the whole fixed pattern; PIPE 0, no merge)."""
    global LAUNCHES
    B, H, n, D = q.shape
    G = k_sum.shape[2]
    assert L % BM == 0 and q.is_contiguous() and k_sum.is_contiguous() and v_sum.is_contiguous() and o.is_contiguous()
    band = k is not None
    q_desc, k_desc, v_desc = _desc(q, BM), _desc(k_sum, BN), _desc(v_sum, BN)
    kb_desc, vb_desc = (_desc(k, BN), _desc(v, BN)) if band else (k_desc, v_desc)
    nqb = triton.cdiv(n, BM)
    launch_kernel(_gather_fwd_kernel, (B * H, nqb), (q_desc, k_desc, v_desc, kb_desc, vb_desc, o, lse),
                  (scale * 1.4426950408889634, n, G, nqb, L, c),
                  dict(BM=BM, BN=BN, D=D, STAGES=stages, PIPE=pipe, MERGE=merge, BAND=band, num_warps=warps))
    LAUNCHES += 1


def gather_dq(q, do, k_sum, v_sum, lse, delta, dq, L, c, scale, BM=128, BN=64, stages=3, warps=8, memo=None, k=None,
              v=None, o=None):
    """Add the gathered part's dQ to dq [B, H, n, D] (fp32 or q's dtype, contiguous like do); lse and delta: fp32
    [B, H, n], delta already written by the first segment's dQ kernel. With k, v, o (contiguous, experimental): the
    own block's keys too (causal), Delta computed from o and do and stored, dQ stored (the whole fixed pattern)."""
    global LAUNCHES
    B, H, n, D = q.shape
    G = k_sum.shape[2]
    assert L % BM == 0 and do.is_contiguous() and dq.is_contiguous()
    band = k is not None
    q_desc, do_desc = _desc(q, BM, memo), _desc(do, BM, memo)
    k_desc, v_desc = _desc(k_sum, BN, memo), _desc(v_sum, BN, memo)
    kb_desc, vb_desc = (_desc(k, BN, memo), _desc(v, BN, memo)) if band else (k_desc, v_desc)
    nqb = triton.cdiv(n, BM)
    launch_kernel(_gather_dq_kernel, (B * H, nqb), (q_desc, do_desc, k_desc, v_desc, kb_desc, vb_desc, dq,
                  o if band else dq, do, lse, delta), (scale * 1.4426950408889634, scale, n, G, nqb, L, c),
                  dict(BM=BM, BN=BN, D=D, STAGES=stages, BAND=band, num_warps=warps))
    LAUNCHES += 1


def gather_dkdv(q, do, k_sum, v_sum, lse, delta, dk, dv, L, lo, c, scale, BM=64, BN=64, stages=3, warps=4,
                memo=None):
    """Add the gathered part's dK / dV to the summary rows of dk, dv [B, H, n, D] (contiguous); q, do contiguous;
    lse and delta: fp32 [B, H, n] of the whole layout."""
    global LAUNCHES
    B, H, n, D = q.shape
    G = k_sum.shape[2]
    assert q.is_contiguous() and do.is_contiguous() and dk.is_contiguous() and dv.is_contiguous() and G % BN == 0
    q_desc, do_desc = _desc(q, BM, memo), _desc(do, BM, memo)
    k_desc, v_desc = _desc(k_sum, BN, memo), _desc(v_sum, BN, memo)
    nb = n // L
    launch_kernel(_gather_dkdv_kernel, (B * H, triton.cdiv(nb * c, BN)), (q_desc, do_desc, k_desc, v_desc, dk, dv,
                  lse, delta), (scale * 1.4426950408889634, scale, n, G, nb, L, lo, c),
                  dict(BM=BM, BN=BN, D=D, STAGES=stages, num_warps=warps))
    LAUNCHES += 1


def eligible(q, seg, scale, merge, others=()) -> bool:
    """This path covers: a Hopper GPU, fp16 / bf16, head dim 64 or 128, q with fewer than 2^31 rows, 65535 query
    tiles per head (forward and dQ tiles) and 65535 summary-key tiles (dK / dV), `others` (the output, dO, dQ)
    contiguous and 16-byte aligned like a contiguous q (a strided q is copied), a positive scale (the kernel scales
    the row max of the raw scores), the gathered part of a layout whose every head has it, with one summary offset,
    after a band that holds each query's own block (merge)."""
    if not (merge and seg.kind == GATHER and q.is_cuda and q.dtype in _GL_DTYPES and q.shape[-1] in (64, 128)
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in others)
            and (not q.is_contiguous() or q.data_ptr() % 16 == 0)
            and q.numel() // q.shape[-1] < 2 ** 31
            and triton.cdiv(q.shape[2], min(SETTINGS[q.shape[-1]]["BM"], DQ_SETTINGS[q.shape[-1]]["BM"])) <= 65535
            and triton.cdiv(q.shape[2] // seg.L * seg.C, DKDV_SETTINGS[q.shape[-1]]["BN"]) <= 65535
            and scale * 1.4426950408889634 >= 2.0 ** -126 and seg.L % SETTINGS[q.shape[-1]]["BM"] == 0):
        return False
    return _capability(q.device)[0] == 9 and _summary_offset(seg) is not None


_SEG: dict = {}  # id(segment) -> (segment, its one summary offset or None); segments live in function's launch cache
_CAPABILITY: dict = {}


def _summary_offset(seg):
    """The summary offset lo shared by every head of a gathered segment that has summary keys before each block, else
    None (host-side, once per segment)."""
    hit = _SEG.get(id(seg))
    if hit is None or hit[0] is not seg:
        p = seg.params
        ok = bool((p[:, P_SUM_L] > 0).all()) and bool((p[:, P_SUM_EXCL] > 0).all()) and \
            len(set(p[:, P_SUM_LO].tolist())) == 1
        if len(_SEG) >= 4096:
            _SEG.clear()
        hit = _SEG[id(seg)] = (seg, int(p[0, P_SUM_LO]) if ok else None)
    return hit[1]


def _capability(device):
    if device.index not in _CAPABILITY:
        _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)
    return _CAPABILITY[device.index]


def backward(q, k, v, do, dq, dk, dv, lse, delta, seg, scale, with_dq, with_dkdv):
    """The gathered part's dQ (with_dq) and dK / dV (with_dkdv: added to what the band stored) for an eligible
    launch, over one summary copy."""
    if q.shape[2] < seg.L or not (with_dq or with_dkdv):
        return
    lo = _summary_offset(seg)
    q = q.contiguous()
    ks, vs = summary_kv(k, seg.L, lo, seg.C), summary_kv(v, seg.L, lo, seg.C)
    memo = {}  # descriptors of the same tensor and tile height, shared by the two kernels
    if with_dq:
        gather_dq(q, do, ks, vs, lse, delta, dq, seg.L, seg.C, scale, **DQ_SETTINGS[q.shape[-1]], memo=memo)
    if with_dkdv:
        gather_dkdv(q, do, ks, vs, lse, delta, dk, dv, seg.L, lo, seg.C, scale, **DKDV_SETTINGS[q.shape[-1]],
                    memo=memo)


def forward(q, k, v, o, lse, seg, scale, merge):
    """The gathered part's forward for an eligible launch: copy the summary keys, run the kernel, merge."""
    if q.shape[2] < seg.L:  # one block: no query sees a summary key, and merging nothing changes nothing
        return
    lo = _summary_offset(seg)
    gather_forward(q.contiguous(), summary_kv(k, seg.L, lo, seg.C), summary_kv(v, seg.L, lo, seg.C), o, lse, seg.L,
                   seg.C, scale, merge, **SETTINGS[q.shape[-1]])


def tma_rows(*xs) -> bool:
    """Can TMA read each of xs as rows of a [B * H * n, D] matrix (contiguous, 16-byte aligned)? The one-launch
    experiment reads full K and V so, and steps aside where they are views (a copy of K and V per pass would cost
    more than the band kernels it saves)."""
    return all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in xs)


def band_fusable(band, seg) -> bool:
    """Is `band` (the first segment) exactly the causal block part of the fixed pattern whose summary part is seg, for
    every head: nothing else (dense, window, custom tiles) in it?"""
    p = band.params
    return (band.kind == NATURAL and seg.kind == GATHER and bool((p[:, P_BLK] == seg.L).all())
            and not bool(p[:, [P_ALL, P_WIN, P_CUSTOM]].any()))


def forward_fixed(q, k, v, o, lse, seg, scale):
    """Experimental (FUSE_BAND): the whole fixed pattern's forward in one launch, the own block's keys (causal) and
    the summary keys of the blocks before, written to o / lse (no merge); the caller checked band_fusable, tma_rows
    (k, v) and eligible."""
    lo = _summary_offset(seg)
    st = dict(SETTINGS[q.shape[-1]], pipe=0)
    gather_forward(q.contiguous(), summary_kv(k, seg.L, lo, seg.C), summary_kv(v, seg.L, lo, seg.C), o, lse, seg.L,
                   seg.C, scale, False, **st, k=k, v=v)


def backward_fixed_dq(q, k, v, o, do, dq, lse, delta, seg, scale):
    """Experimental (FUSE_BAND): the whole fixed pattern's dQ in one launch, the own block's keys (causal) and the
    summary keys of the blocks before; it also computes Delta = rowsum(dO * O) and stores it (for the dK / dV kernels
    after it) and stores dQ. The caller checked band_fusable, tma_rows (k, v) and eligible (o, do, dq contiguous)."""
    lo = _summary_offset(seg)
    gather_dq(q.contiguous(), do, summary_kv(k, seg.L, lo, seg.C), summary_kv(v, seg.L, lo, seg.C), lse, delta, dq,
              seg.L, seg.C, scale, **DQ_SETTINGS[q.shape[-1]], k=k, v=v, o=o)


