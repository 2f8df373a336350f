"""The fixed pattern's gathered summary part (forward, dQ, dK / dV) as Gluon kernels for Hopper; on by default where
they apply (`eligible`, Triton 3.6), SPARSE_TRANSFORMER_GLUON=0 turns them off.

TMA loads into a ring of shared-memory stages and asynchronous wgmma. The summary keys (rows lo .. lo + c of each
L-row block) are read in place, without a copy: a 5-D TMA descriptor sees K (and V) as [B, H, n / L, c, D] with the
block stride (`summary_desc`), and one box of BN summary slots (whole blocks when c divides BN, part of one when BN
divides c) lands in shared memory as the [BN, D] tile the wgmma reads. Slot s is row (s // c) * L + lo + s % c; a
query tile of block b sees slots [0, b * c), a column limit.
- Forward (`_gather_fwd_kernel`): online softmax over the summary tiles, merged into the band's O / LSE. PIPE 1 / 2
  issue the next tile's Q K^T before this tile's softmax (2: FlashAttention-3's order, this tile's P V running into the
  next softmax); measured slower than PIPE 0 on an H200 (BENCHMARKS.md), which the library runs.
- dQ (`_gather_dq_kernel`): per key tile S = Q K^T and dP = dO V^T, the next tile's two products issued before this
  tile's element-wise work, dQ += dS K waited within the iteration; added to the band's dQ.
- dK / dV (`_gather_dkdv_kernel`): per tile of summary keys, the query and dO tiles of the later blocks stream through
  the ring (the mirror of dQ); added to the band's dK / dV at the summary rows.
- Heads with different summary offsets (num_verts > 1; HEAD_OFFSETS, SPARSE_TRANSFORMER_GLUON_HEADS=0 turns it off)
  through the same kernels: the descriptors see whole blocks and each head's offset (from a small int32 table) is
  added to the row coordinate. With it off the kernels compile to the same machine code as before it (PTX for sm_90
  compared, parameter numbering aside).
- Tried and removed (2026-11-30, H200): the band folded into the forward and dQ kernels (the fixed pattern in one
  launch each) was correct but slower: forward 2021 us against 1209 + 139 apart at fixed-64k, fwd+bwd 1.192 ms
  against 1.039 at fixed-12k (BENCHMARKS.md).

Gluon has no interpreter: `python bench/gluon_gather.py compile` compiles every setting for sm_90 on a CPU machine,
`check` compares them with a float32 reference on a GPU and `time` times them beside the Triton kernels; the GPU tests
(test_gpu_gluon_*) check the library path (outputs and gradients) against the float64 reference. On an H200 at
fixed-64k: forward 1212 us against the Triton kernel's 1628, dQ 1309 against 1900, dK / dV 1960 against 2667
(BENCHMARKS.md, 2026-12-01, ninth session).
"""
import functools
import os
import weakref

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

from ..plan import GATHER, P_SUM_EXCL, P_SUM_L, P_SUM_LO
from .launcher import Tma, capability, cdiv, launch as launch_kernel

# per head dim, measured on an H200 (bench/gluon_gather.py time, BENCHMARKS.md): the forward without the in-loop
# overlap (PIPE 0: 180 registers, 1218 us at fixed-64k) beat PIPE 1 (1298) and PIPE 2 (1338-1372); d=128 on 8 warps
# (compiled for sm_90: 128 registers, no spills, 128 KiB of shared memory)
SETTINGS = {64: dict(BM=128, BN=64, stages=3, warps=4, pipe=0), 128: dict(BM=128, BN=64, stages=3, warps=8, pipe=0)}
# dQ: 64x64 on 4 warps took 1318 us at fixed-64k against 1798 for 128x64 on 8 warps; d=128 the other way round
# (230 us against 266 at fixed-12k-d128)
DQ_SETTINGS = {64: dict(BM=64, BN=64, stages=3, warps=4), 128: dict(BM=128, BN=64, stages=3, warps=8)}
# dK / dV (the summary keys' tiles, BN, against streamed query tiles, BM). d=128 on 32-query tiles, 3 stages: compiled
# for sm_90 (Triton 3.6, python bench/gluon_gather.py compile dkdv) 255 registers and no spills, where 64x64 on 2
# stages spills 48 bytes; H200, python bench/gluon_gather.py time (gluon-time-dkdv32-20261201.log): 390 -> 362 us at
# fixed-12k-d128 (B = 2, H = 4). At d=64 32-query tiles need 168 registers (3 programs per SM) but ran slower: 2423
# -> 2566-2953 us (fixed-64k), 379 -> 397-427 (fixed-12k).
DKDV_SETTINGS = {64: dict(BM=64, BN=64, stages=3, warps=4), 128: dict(BM=32, BN=64, stages=3, warps=4)}
KV_TILE = 64  # every kernel's key tile (BN above): summary_fits checks the summary width against it
assert all(s["BN"] == KV_TILE for t in (SETTINGS, DQ_SETTINGS, DKDV_SETTINGS) for s in t.values())
# the dK / dV kernel too (SPARSE_TRANSFORMER_GLUON_DKDV=0 leaves dK / dV to the Triton kernel)
DKDV = os.environ.get("SPARSE_TRANSFORMER_GLUON_DKDV", "1") != "0"
# Layouts whose heads have different summary offsets (the fixed pattern with num_verts > 1, as the enwik8 preset)
# through the same kernels, the head's offset added to the row coordinate of descriptors that see whole blocks;
# SPARSE_TRANSFORMER_GLUON_HEADS=0: the Triton kernels take them. Checked on an H200 on 2026-11-30 (late):
# bench/gluon_gather.py check 96 of 96 within bounds, its 16 GPU tests passed; the enwik8 preset's training step
# (python bench/profile_model.py enwik8) 56.8 ms of GPU kernels against 59.8 with it off, wall within noise (host-bound
# step: 67.4 / 66.4 ms against 74.3 / 64.4, bench model --preset enwik8, alternating).
HEAD_OFFSETS = os.environ.get("SPARSE_TRANSFORMER_GLUON_HEADS", "1") != "0"
LAUNCHES = 0  # kernels launched through this path (tests check that it ran)


@gluon.jit
def _query_tile(NQB, G, SEG_L, SEG_C, H, lo_ptr, TH, BM: gl.constexpr, BN: gl.constexpr, HEAD_LO: gl.constexpr):
    """(batch x head, batch, head, the head's summary row offset (_head_lo), first query row, visible summary slots,
    key tiles) of this program: every head's longest query tile first; a tile of block b sees the summary keys of
    blocks 0 .. b - 1 (BM divides SEG_L)."""
    bh = gl.program_id(0)
    q0 = (NQB - 1 - gl.program_id(1)) * BM
    kv_len = gl.minimum((q0 // SEG_L) * SEG_C, G)
    n_tiles = gl.cdiv(kv_len, BN)
    b = bh // H
    h = bh % H
    return bh, b, h, _head_lo(lo_ptr, h, TH, HEAD_LO), q0, kv_len, n_tiles


@gluon.jit
def _ring(desc, STAGES: gl.constexpr, ROWS: gl.constexpr, D: gl.constexpr):
    """STAGES shared-memory slots of ROWS x D tiles (the default layout, as _desc's) for two tensors of desc's dtype
    and one mbarrier per slot (initialised)."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, D], desc.dtype)
    a_smem = gl.allocate_shared_memory(desc.dtype, [STAGES, ROWS, D], layout)
    b_smem = gl.allocate_shared_memory(desc.dtype, [STAGES, ROWS, D], layout)
    bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bar.index(s), count=1)
    return a_smem, b_smem, bar


@gluon.jit
def _load_rows(a_desc, b_desc, a_smem, b_smem, bar, tile, row0, pred, STAGES: gl.constexpr, ROWS: gl.constexpr,
               D: gl.constexpr):
    """TMA-load tile `tile` (rows row0 + tile * ROWS ..) of two row descriptors into slot tile % STAGES, when pred
    holds."""
    s = tile % STAGES
    mbarrier.expect(bar.index(s), 2 * ROWS * D * 2, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [row0 + tile * ROWS, 0], bar.index(s), a_smem.index(s), pred=pred)
    tma.async_copy_global_to_shared(b_desc, [row0 + tile * ROWS, 0], bar.index(s), b_smem.index(s), pred=pred)


@gluon.jit
def _head_lo(lo_ptr, h, TH, HEAD_LO: gl.constexpr):
    """Head h's first summary row inside a block (HEAD_LO: from the per-head table lo_ptr, the descriptors seeing
    whole blocks), else 0 (the descriptors start at the one summary offset)."""
    if HEAD_LO:
        lo = gl.load(lo_ptr + h % TH)
    else:
        lo = 0
    return lo


@gluon.jit
def _load_summary(k_desc, v_desc, k_tile, v_tile, bar, tile, b, h, lo, SEG_C, pred, BN: gl.constexpr, D: gl.constexpr,
                  RB: gl.constexpr, RC: gl.constexpr):
    """TMA-load the keys / values of summary tile `tile` (slots tile * BN .. + BN; one box of the 5-D descriptors: RB
    blocks of RC rows, from row lo of each block on) into the [BN, D] tiles k_tile, v_tile (the box's rows in order,
    the same swizzle), when pred holds. Slots past the last block read as zeros."""
    mbarrier.expect(bar, 2 * BN * D * 2, pred=pred)
    box: gl.constexpr = [1, 1, RB, RC, D]
    if RB > 1:  # whole summaries (RC = SEG_C)
        coord = [b, h, tile * RB, lo, 0]
    else:  # part of one block's summary
        coord = [b, h, (tile * BN) // SEG_C, lo + (tile * BN) % SEG_C, 0]
    tma.async_copy_global_to_shared(k_desc, coord, bar, k_tile._reinterpret(k_desc.dtype, box, k_desc.layout),
                                    pred=pred)
    tma.async_copy_global_to_shared(v_desc, coord, bar, v_tile._reinterpret(v_desc.dtype, box, v_desc.layout),
                                    pred=pred)


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, tile, b, h, lo, SEG_C, pred, STAGES: gl.constexpr,
             BN: gl.constexpr, D: gl.constexpr, RB: gl.constexpr, RC: gl.constexpr):
    """Summary key / value tile `tile` (slots tile * BN ..) into ring slot tile % STAGES, when pred holds."""
    s = tile % STAGES
    _load_summary(k_desc, v_desc, k_smem.index(s), v_smem.index(s), kv_bar.index(s), tile, b, h, lo, SEG_C, pred, BN,
                  D, RB, RC)


@gluon.jit
def _gather_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, lo_ptr, qk_scale, N, H, TH, G, NQB, SEG_L, SEG_C,
                       BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, RB: gl.constexpr, RC: gl.constexpr,
                       STAGES: gl.constexpr, PIPE: gl.constexpr, MERGE: gl.constexpr, HEAD_LO: gl.constexpr,
                       num_warps: gl.constexpr):
    """PIPE 0: each tile's Q K^T, softmax and P V one after another; 1: the next tile's Q K^T issued before this tile's
    softmax; 2 (FlashAttention-3's order): each iteration issues the next tile's Q K^T and this tile's P V, then runs
    the next tile's softmax while the P V runs, and waits for it before the loop turns (an accumulator still being
    written across the loop's back edge makes ptxas serialize the wgmma)."""
    gl.static_assert(PIPE == 0 or STAGES >= 2)
    bh, b, h, lo, q0, kv_len, n_tiles = _query_tile(NQB, G, SEG_L, SEG_C, H, lo_ptr, TH, BM, BN, HEAD_LO)

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
    k_smem, v_smem, kv_bar = _ring(k_desc, STAGES, BN, D)
    fence_async_shared()

    mbarrier.expect(q_bar, BM * D * 2)
    tma.async_copy_global_to_shared(q_desc, [bh * N + q0, 0], q_bar, q_smem)
    for s in gl.static_range(STAGES):  # the first STAGES key / value tiles
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, s, b, h, lo, SEG_C, s < n_tiles, STAGES, BN, D, RB, RC)

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
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, j + STAGES, b, h, lo, SEG_C, j + STAGES < n_tiles, STAGES,
                     BN, D, RB, RC)
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
            # (on every tile: only a row's last can reach past kv_len, but with the rule behind a branch on that
            # this forward ran 1246-1268 -> 1316-1428 us at fixed-64k, dQ 1339-1342 -> 1538-1658: H200, bench/ab_rev.py,
            # 2026-12-01, ab-rev-20261201-152759-edges.json; with the last tile peeled off after a loop over the
            # others, dQ 1322-1325 -> 1506-1556 us and the forward even at fixed-64k, 199 -> 205-208 at fixed-12k,
            # ab-rev-20261201-154332-peel.json)
            sc = gl.where(gl.expand_dims(j * BN + cols < kv_len, 0), s_cur, float("-inf"))
            # every row sees a key in tile 0 (kv_len > 0)
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
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, j + STAGES, b, h, lo, SEG_C, j + STAGES < n_tiles, STAGES,
                     BN, D, RB, RC)
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
    w_acc = 1.0 / l_safe  # per row a reciprocal, per element a multiply (as forward._attn_fwd_kernel)
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
        inv_tot = 1.0 / tot_safe
        o_prev = gl.load(o_ptrs, mask=o_ok, other=0.0).to(gl.float32)
        o = (o_prev * gl.expand_dims(gl.convert_layout(w_prev * inv_tot, row_o), 1)
             + acc * gl.expand_dims(gl.convert_layout(w_new * inv_tot * w_acc, row_o), 1))
        lse = gl.where(tot > 0, mx + gl.log(tot_safe), float("-inf"))
    else:
        o = acc * gl.expand_dims(gl.convert_layout(w_acc, row_o), 1)
    gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=o_ok)
    gl.store(lse_ptrs, lse, mask=rows_s < N)


@gluon.jit
def _gather_dq_kernel(q_desc, do_desc, k_desc, v_desc, dq_ptr, lse_ptr, delta_ptr, lo_ptr, qk_scale, sm_scale, N, H,
                      TH, G, NQB, SEG_L, SEG_C, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, RB: gl.constexpr,
                      RC: gl.constexpr, STAGES: gl.constexpr, HEAD_LO: gl.constexpr, num_warps: gl.constexpr):
    """dQ of the gathered part, added to the dQ an earlier segment stored (which also stored Delta = rowsum(dO * O)):
    per key tile S = Q K^T and dP = dO V^T, then dS = P * (dP - Delta) and dQ += dS K. The next tile's two products
    are issued before this tile's element-wise work and run during it; dQ's product is waited within the iteration."""
    gl.static_assert(STAGES >= 2)
    bh, b, h, lo, q0, kv_len, n_tiles = _query_tile(NQB, G, SEG_L, SEG_C, H, lo_ptr, TH, BM, BN, HEAD_LO)

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
    k_smem, v_smem, kv_bar = _ring(k_desc, STAGES, BN, D)
    fence_async_shared()

    mbarrier.expect(q_bar, 2 * BM * D * 2)
    tma.async_copy_global_to_shared(q_desc, [bh * N + q0, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [bh * N + q0, 0], q_bar, do_smem)
    for s in gl.static_range(STAGES):
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, s, b, h, lo, SEG_C, s < n_tiles, STAGES, BN, D, RB, RC)

    rows_s = q0 + gl.arange(0, BM, layout=row_s)
    lse = gl.load(lse_ptr + bh.to(gl.int64) * N + rows_s, mask=rows_s < N, other=float("-inf")) * 1.4426950408889634
    lse = gl.where(lse == float("-inf"), float("inf"), lse)  # rows that see no key: P = 0
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
        p = gl.where(gl.expand_dims(j * BN + cols < kv_len, 0), p, 0.0)
        ds = p * (dp_cur - gl.expand_dims(delta, 1))
        dq = warpgroup_mma(gl.convert_layout(ds.to(k_desc.dtype), ds_layout), k_smem.index(stage), dq,
                           is_async=True)
        dq, s_cur, dp_cur = warpgroup_mma_wait(0, deps=(dq, s_next, dp_next))
        # tile j's stage is free: load tile j + STAGES into it
        _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bar, j + STAGES, b, h, lo, SEG_C, j + STAGES < n_tiles, STAGES, BN,
                 D, RB, RC)
    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(s))
    rows_o = q0 + gl.arange(0, BM, layout=row_o)
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    dq_ptrs = dq_ptr + (bh.to(gl.int64) * N + gl.expand_dims(rows_o, 1)) * D + gl.expand_dims(offs_d, 0)
    ok = gl.expand_dims(rows_o < N, 1)
    dq = dq * sm_scale + gl.load(dq_ptrs, mask=ok, other=0.0).to(gl.float32)  # added to the band's dQ
    gl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=ok)


@gluon.jit
def _gather_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, dk_ptr, dv_ptr, lse_ptr, delta_ptr, lo_ptr, qk_scale, sm_scale,
                        N, H, TH, NB, SEG_L, SEG_LO, SEG_C, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
                        RB: gl.constexpr, RC: gl.constexpr, STAGES: gl.constexpr, HEAD_LO: gl.constexpr,
                        num_warps: gl.constexpr):
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

    kv_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], k_desc.dtype)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BN, D], kv_smem_layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [BN, D], kv_smem_layout)
    k_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(k_bar, count=1)
    q_smem, do_smem, q_bar = _ring(q_desc, STAGES, BM, D)
    fence_async_shared()

    lo = _head_lo(lo_ptr, bh % H, TH, HEAD_LO)
    _load_summary(k_desc, v_desc, k_smem, v_smem, k_bar, gl.program_id(1), bh // H, bh % H, lo, SEG_C, True, BN, D, RB,
                  RC)
    row0 = bh * N + q_start
    for s in gl.static_range(STAGES):
        _load_rows(q_desc, do_desc, q_smem, do_smem, q_bar, s, row0, s < n_tiles, STAGES, BM, D)

    slots = k0 + gl.arange(0, BN, layout=row_st)
    first_row = (slots // SEG_C + 1) * SEG_L  # of the queries that see each slot
    cols = gl.arange(0, BM, layout=col_st)
    base = bh.to(gl.int64) * N
    zero_st = gl.zeros([BN, BM], gl.float32, st_layout)
    dk = gl.zeros([BN, D], gl.float32, kv_layout)
    dv = gl.zeros([BN, D], gl.float32, kv_layout)
    # LSE (log2) and Delta of the first tile; rows past N (the next head's, or TMA's zeros): LSE = +inf, so P = 0.
    # Every row from SEG_L on sees a summary key, so its stored LSE is finite: no fix-up of -inf per element.
    lse_row = lse_ptr + base + q_start
    delta_row = delta_ptr + base + q_start
    lse_cur = gl.load(lse_row + cols, mask=cols < N - q_start, other=float("inf")) * 1.4426950408889634
    delta_cur = gl.load(delta_row + cols, mask=cols < N - q_start, other=0.0)
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
        left = N - q_start - (j + 1) * BM  # rows of the next tile before the sequence's end
        lse_next = gl.load(lse_row + (j + 1) * BM + cols, mask=cols < left, other=float("inf")) * 1.4426950408889634
        delta_next = gl.load(delta_row + (j + 1) * BM + cols, mask=cols < left, other=0.0)
        # the tile's rows lie in one block (BM divides SEG_L), so a key slot sees all of them or none: the rule is
        # one compare per slot, not per element
        p = gl.exp2(s_cur * qk_scale - gl.expand_dims(lse_cur, 0))
        p = gl.where(gl.expand_dims(q_start + j * BM >= first_row, 1), p, 0.0)
        ds = p * (dp_cur - gl.expand_dims(delta_cur, 0))
        dv = warpgroup_mma(gl.convert_layout(p.to(q_desc.dtype), op_layout), do_smem.index(stage), dv, is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds.to(q_desc.dtype), op_layout), q_smem.index(stage), dk, is_async=True)
        dv, dk, s_cur, dp_cur = warpgroup_mma_wait(0, deps=(dv, dk, s_next, dp_next))
        lse_cur = lse_next
        delta_cur = delta_next
        # tile j's stage is free: load tile j + STAGES into it
        _load_rows(q_desc, do_desc, q_smem, do_smem, q_bar, j + STAGES, row0, j + STAGES < n_tiles, STAGES, BM, D)
    mbarrier.invalidate(k_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(q_bar.index(s))
    # slot s -> row (s // SEG_C) * SEG_L + lo + s % SEG_C (lo: SEG_LO, or the head's own with HEAD_LO); the padding
    # slots past NB * SEG_C are not stored
    slots_o = k0 + gl.arange(0, BN, layout=gl.SliceLayout(1, kv_layout))
    rows_o = (slots_o // SEG_C) * SEG_L + (lo + SEG_LO) + slots_o % SEG_C
    offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, kv_layout))
    off = (base + gl.expand_dims(rows_o, 1)) * D + gl.expand_dims(offs_d, 0)
    ok = gl.expand_dims(slots_o < NB * SEG_C, 1)
    dk = dk * sm_scale + gl.load(dk_ptr + off, mask=ok, other=0.0).to(gl.float32)
    dv = dv + gl.load(dv_ptr + off, mask=ok, other=0.0).to(gl.float32)
    gl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=ok)
    gl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=ok)


def _summary_geometry(x, L, lo, c):
    """(shape, strides, element offset from x's start) of summary_view, without building it (the eligibility check
    runs on every call)."""
    B, H, n, D = x.shape
    shape = (B, H, n // L, c, D)
    sb, sh, sn, _ = x.stride()
    strides = [sb, sh, L * sn, sn, 1]
    dense = 1
    for i in range(4, -1, -1):
        if shape[i] == 1:
            strides[i] = dense
        dense *= shape[i]
    return shape, strides, lo * sn


def _view_geometry(x, L, lo, c):
    """_summary_geometry of the view a descriptor of x's summary rows reads: whole blocks for per-head offsets (lo a
    tensor: the kernels add each head's offset), else rows lo .. lo + c of each block."""
    return _summary_geometry(x, L, 0, L) if isinstance(lo, torch.Tensor) else _summary_geometry(x, L, lo, c)


def summary_view(x, L, lo, c):
    """Rows lo .. lo + c of every whole L-row block of x [B, H, n, D] (last dim contiguous), in place: a
    [B, H, n // L, c, D] view (with lo = 0 and c = L: whole blocks, for per-head offsets). A dimension of size one
    gets the stride a contiguous tensor would give it (TMA checks every stride; this one is never stepped)."""
    shape, strides, offset = _summary_geometry(x, L, lo, c)
    return x.as_strided(shape, strides, x.storage_offset() + offset)


def summary_box(c, BN):
    """(RB, RC): a tile of BN summary slots is RB blocks of RC rows (c divides BN, or BN divides c)."""
    assert BN % c == 0 or c % BN == 0, f"a {BN}-slot tile does not cut summaries of {c} rows evenly"
    rc = min(BN, c)
    return BN // rc, rc


def summary_fits(x, L, lo, c, BN) -> bool:
    """Can a TMA descriptor read BN-slot tiles of x's summary rows in place (summary_desc): c divides BN or BN
    divides c, and the view's start and strides are multiples of 16 bytes, no stride 0 (an expanded K / V)? lo: the
    one summary offset, or a tensor of per-head offsets (the view sees whole blocks)."""
    if not (BN % c == 0 or c % BN == 0) or x.stride(-1) != 1:
        return False
    _, strides, offset = _view_geometry(x, L, lo, c)
    es = x.element_size()
    return (x.data_ptr() + offset * es) % 16 == 0 and all(s > 0 and s * es % 16 == 0 for s in strides[:-1])


@functools.lru_cache(maxsize=None)
def _layout(shape, dtype):
    """The shared-memory layout of a tile (a tuple) of a torch dtype (built once: about 7 us each on the host)."""
    return gl.NVMMASharedLayout.get_default_for(list(shape), _GL_DTYPES[dtype])


def _desc(x, rows, memo=None):
    """A TMA descriptor over x [B, H, R, D] (contiguous) seen as B * H * R rows, in boxes of rows x D; memo (a dict)
    shares descriptors between the launches of one call."""
    if memo is not None and (id(x), rows) in memo:
        return memo[id(x), rows]
    assert x.is_contiguous(), "a TMA descriptor of rows needs a contiguous tensor"
    D = x.shape[-1]
    d = Tma(x, 0, (x.numel() // D, D), (D, 1), (rows, D), _layout((rows, D), x.dtype))
    if memo is not None:
        memo[id(x), rows] = d
    return d


def summary_desc(x, L, lo, c, BN, memo=None):
    """A 5-D TMA descriptor over x's summary rows in place, in boxes of BN slots (summary_box); slots past the last
    whole block read as zeros. lo: the one summary offset (the view starts there: summary_view), or a tensor of
    per-head offsets (the view sees whole blocks and the kernels add the head's offset to the row coordinate). x
    passed summary_fits."""
    per_head = isinstance(lo, torch.Tensor)
    key = (id(x), "summary", BN, per_head)
    if memo is not None and key in memo:
        return memo[key]
    shape, strides, offset = _view_geometry(x, L, lo, c)
    box = (1, 1, *summary_box(c, BN), x.shape[-1])
    d = Tma(x, offset, shape, tuple(strides), box, _layout(box, x.dtype))  # summary_view, without building it
    if memo is not None:
        memo[key] = d
    return d


def _offsets(lo, lse):
    """(lo_ptr, TH, HEAD_LO, SEG_LO) kernel arguments: a per-head offset table (lo a tensor), or the one offset (lo an
    int; lo_ptr then is any pointer, never read)."""
    if isinstance(lo, torch.Tensor):
        assert lo.dtype == torch.int32 and lo.device == lse.device, "per-head offsets: an int32 table on the device"
        return lo, lo.numel(), True, 0
    return lse, 1, False, lo


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def gather_forward(q, k, v, o, lse, L, lo, c, scale, merge, BM=128, BN=64, stages=3, warps=4, pipe=0):
    """Attention of each query over the summary keys (rows lo .. lo + c of each L-row block of k, v, read in place;
    lo an int, or an int32 tensor of per-head offsets, head h using lo[h % len(lo)]) of the blocks before its own,
    written to o [B, H, n, D] and lse fp32 [B, H, n] (contiguous, like q), or merged into what they hold (merge)."""
    global LAUNCHES
    B, H, n, D = q.shape
    assert L % BM == 0 and q.is_contiguous() and o.is_contiguous()
    rb, rc = summary_box(c, BN)
    nqb = cdiv(n, BM)
    lo_ptr, th, head_lo, _ = _offsets(lo, lse)
    launch_kernel(_gather_fwd_kernel, (B * H, nqb), (_desc(q, BM), summary_desc(k, L, lo, c, BN),
                  summary_desc(v, L, lo, c, BN), o, lse, lo_ptr),
                  (scale * 1.4426950408889634, n, H, th, n // L * c, nqb, L, c),
                  dict(BM=BM, BN=BN, D=D, RB=rb, RC=rc, STAGES=stages, PIPE=pipe, MERGE=merge, HEAD_LO=head_lo,
                       num_warps=warps))
    LAUNCHES += 1


def gather_dq(q, do, k, v, lse, delta, dq, L, lo, c, scale, BM=128, BN=64, stages=3, warps=8, memo=None):
    """Add the gathered part's dQ to dq [B, H, n, D] (fp32 or q's dtype, contiguous like q and do); lse and delta:
    fp32 [B, H, n], delta already written by the first segment's backward."""
    global LAUNCHES
    B, H, n, D = q.shape
    assert L % BM == 0 and do.is_contiguous() and dq.is_contiguous()
    rb, rc = summary_box(c, BN)
    nqb = cdiv(n, BM)
    lo_ptr, th, head_lo, _ = _offsets(lo, lse)
    launch_kernel(_gather_dq_kernel, (B * H, nqb), (_desc(q, BM, memo), _desc(do, BM, memo),
                  summary_desc(k, L, lo, c, BN, memo), summary_desc(v, L, lo, c, BN, memo), dq, lse, delta, lo_ptr),
                  (scale * 1.4426950408889634, scale, n, H, th, n // L * c, nqb, L, c),
                  dict(BM=BM, BN=BN, D=D, RB=rb, RC=rc, STAGES=stages, HEAD_LO=head_lo, num_warps=warps))
    LAUNCHES += 1


def gather_dkdv(q, do, k, v, lse, delta, dk, dv, L, lo, c, scale, BM=64, BN=64, stages=3, warps=4, memo=None):
    """Add the gathered part's dK / dV to the summary rows of dk, dv [B, H, n, D] (contiguous); q, do contiguous;
    lse and delta: fp32 [B, H, n] of the whole layout."""
    global LAUNCHES
    B, H, n, D = q.shape
    assert L % BM == 0 and q.is_contiguous() and do.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    rb, rc = summary_box(c, BN)
    nb = n // L
    lo_ptr, th, head_lo, seg_lo = _offsets(lo, lse)
    launch_kernel(_gather_dkdv_kernel, (B * H, cdiv(nb * c, BN)), (
        _desc(q, BM, memo), _desc(do, BM, memo), summary_desc(k, L, lo, c, BN, memo),
        summary_desc(v, L, lo, c, BN, memo), dk, dv, lse, delta, lo_ptr), (scale * 1.4426950408889634, scale, n, H,
        th, nb, L, seg_lo, c), dict(BM=BM, BN=BN, D=D, RB=rb, RC=rc, STAGES=stages, HEAD_LO=head_lo, num_warps=warps))
    LAUNCHES += 1


def eligible(q, k, v, seg, scale, merge, others=()) -> bool:
    """This path covers: a Hopper GPU, fp16 / bf16, head dim 64 or 128, q with fewer than 2^31 rows, 65535 query
    tiles per head (forward and dQ tiles) and 65535 summary-key tiles (dK / dV), `others` (the output, dO, dQ)
    contiguous and 16-byte aligned like a contiguous q (a strided q is copied), k and v whose summary rows TMA reads
    in place (summary_fits: any strides that are multiples of 16 bytes, a summary width c that divides the key tile or
    that it divides), a positive scale (the kernel scales the row max of the raw scores), the gathered part of a
    layout whose every head has it, with one summary offset (or, with HEAD_OFFSETS, one per head), after a band that
    holds each query's own block (merge)."""
    if not (merge and seg.kind == GATHER and runs_on(q) and rows_fit(others)
            and (not q.is_contiguous() or q.data_ptr() % 16 == 0)
            and q.numel() // q.shape[-1] < 2 ** 31
            and cdiv(q.shape[2], min(SETTINGS[q.shape[-1]]["BM"], DQ_SETTINGS[q.shape[-1]]["BM"])) <= 65535
            and cdiv(q.shape[2] // seg.L * seg.C, DKDV_SETTINGS[q.shape[-1]]["BN"]) <= 65535
            and scale * 1.4426950408889634 >= 2.0 ** -126 and seg.L % SETTINGS[q.shape[-1]]["BM"] == 0):
        return False
    lo = _offsets_of(seg, q.device)
    return lo is not None and all(summary_fits(x, seg.L, lo, seg.C, KV_TILE) for x in (k, v))


def runs_on(q) -> bool:
    """Can these kernels take q at all (a Hopper GPU, fp16 / bf16, head dim 64 or 128)? Part of `eligible`, and asked
    alone by the autograd wrapper before it copies a strided q for them (function._rows_q)."""
    return q.is_cuda and q.dtype in _GL_DTYPES and q.shape[-1] in (64, 128) and capability(q.device)[0] == 9


def rows_fit(tensors) -> bool:
    """Are these (the output; dO, dQ, dK, dV) contiguous and 16-byte aligned, as the kernels' row descriptors and
    stores take them?"""
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)


def backward_fits(seg, device, tensors) -> bool:
    """The backward's part of `eligible`, for a segment whose forward these kernels took (the backward reuses that
    decision for q, k, v): dO, dQ, dK, dV fit (rows_fit), and the segment still has its offsets here (HEAD_OFFSETS
    switched off between the two would leave per-head offsets to the Triton kernels)."""
    return rows_fit(tensors) and _offsets_of(seg, device) is not None


_SEG: dict = {}  # id(segment) -> (segment, one offset or None, per-head offsets or None); segments live in the launch
# segment -> {device: int32 tensor of its per-head offsets}: a table lives as long as its segment (in function's launch
# cache, like the segment's tile tables), so a kernel or a captured graph never reads a table freed under it
_HEAD_LO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _segment_offsets(seg):
    """(the summary offset lo every head shares, or None; the per-head offsets, or None) of a gathered segment whose
    every head has summary keys before each block (host-side, once per segment)."""
    hit = _SEG.get(id(seg))
    if hit is None or hit[0] is not seg:
        p = seg.params
        ok = bool((p[:, P_SUM_L] > 0).all()) and bool((p[:, P_SUM_EXCL] > 0).all())
        offsets = tuple(int(x) for x in p[:, P_SUM_LO].tolist()) if ok else None
        one = offsets[0] if offsets is not None and len(set(offsets)) == 1 else None
        if len(_SEG) >= 4096:
            _SEG.clear()
        hit = _SEG[id(seg)] = (seg, one, offsets)
    return hit[1], hit[2]


def _offsets_of(seg, device):
    """What the kernels take as lo for this segment: its one summary offset (an int), with HEAD_OFFSETS an int32
    tensor of its per-head offsets on `device` (cached) where they differ, else None (the Triton kernels take it)."""
    one, offsets = _segment_offsets(seg)
    if one is not None or not HEAD_OFFSETS or offsets is None:
        return one
    tables = _HEAD_LO.setdefault(seg, {})
    key = str(device)
    if key not in tables:
        tables[key] = torch.tensor(offsets, dtype=torch.int32, device=device)
    return tables[key]


def backward(q, k, v, do, dq, dk, dv, lse, delta, seg, scale, with_dq, with_dkdv):
    """The gathered part's dQ (with_dq) and dK / dV (with_dkdv: added to what the band stored) for an eligible
    launch; the summary keys are read in place."""
    if q.shape[2] < seg.L or not (with_dq or with_dkdv):
        return
    lo = _offsets_of(seg, q.device)
    q = q.contiguous()
    memo = {}  # descriptors of the same tensor and tile shape, shared by the two kernels
    if with_dq:
        gather_dq(q, do, k, v, lse, delta, dq, seg.L, lo, seg.C, scale, **DQ_SETTINGS[q.shape[-1]], memo=memo)
    if with_dkdv:
        gather_dkdv(q, do, k, v, lse, delta, dk, dv, seg.L, lo, seg.C, scale, **DKDV_SETTINGS[q.shape[-1]], memo=memo)


def forward(q, k, v, o, lse, seg, scale, merge):
    """The gathered part's forward for an eligible launch (the summary keys read in place), merged into o / lse."""
    if q.shape[2] < seg.L:  # one block: no query sees a summary key, and merging nothing changes nothing
        return
    gather_forward(q.contiguous(), k, v, o, lse, seg.L, _offsets_of(seg, q.device), seg.C, scale, merge,
                   **SETTINGS[q.shape[-1]])
