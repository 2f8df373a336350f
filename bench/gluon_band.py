"""Experiment: the strided pattern's band (query i sees keys i - W < j <= i) as a persistent, streaming Gluon forward
kernel for Hopper, against the library's Triton forward on the same band.

Why: the band's Triton forward moves about the minimum bytes but at a third of the copy rate (BENCHMARKS.md, Nsight
Compute): each program walks only 3 key tiles, so the latency of its first loads is never hidden. Here each CTA owns
a strided list of query tiles and walks one flat sequence of steps (query tile, key tile) through a ring of TMA
loads that runs STAGES steps ahead across query tiles, with two Q buffers; every query tile has the same number of
steps (S, from W, BM and BN), key tiles before the sequence's start or past its end read as zeros (the 3-D
descriptors' bounds) and are masked.

Usage: `python bench/gluon_band.py compile` (sm_90, no GPU: registers, spills, shared memory), on a GPU `check`
(against a float32 torch reference, odd n, W not a multiple of the tile, d=64 and 128) and `time` (graph-replayed
forward of the library's Triton kernel and of each setting, at the strided setups' shapes; JSON under $OUT or
bench/results/)."""
import json
import math
import os
import sys
import time

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_wait

from sparse_transformer.attention.triton.gluon_gather import _ring

_GL = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _step(g, pid, P, NQB, S, KT0, BM: gl.constexpr, BN: gl.constexpr):
    """Step g of this CTA: (its query tile's ordinal, batch x head, first query row, key tile, step within the tile)."""
    it = g // S
    s = g % S
    t = pid + it * P
    q0 = (t % NQB) * BM
    return it, t // NQB, q0, q0 // BN + KT0 + s, s


@gluon.jit
def _issue(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_bar, g, total, pid, P, NQB, S, KT0,
           BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr):
    """TMA-load step g's key / value tile into ring slot g % STAGES and, on a query tile's first step, its Q into
    buffer (ordinal % 2); nothing when g >= total."""
    it, bh, q0, kt, s = _step(g, pid, P, NQB, S, KT0, BM, BN)
    ok = g < total
    slot = g % STAGES
    mbarrier.expect(kv_bar.index(slot), 2 * BN * D * 2, pred=ok)
    kbox: gl.constexpr = [1, BN, D]
    tma.async_copy_global_to_shared(k_desc, [bh, kt * BN, 0], kv_bar.index(slot),
                                    k_smem.index(slot)._reinterpret(k_desc.dtype, kbox, k_desc.layout), pred=ok)
    tma.async_copy_global_to_shared(v_desc, [bh, kt * BN, 0], kv_bar.index(slot),
                                    v_smem.index(slot)._reinterpret(v_desc.dtype, kbox, v_desc.layout), pred=ok)
    first = ok & (s == 0)
    qs = it % 2
    mbarrier.expect(q_bar.index(qs), BM * D * 2, pred=first)
    qbox: gl.constexpr = [1, BM, D]
    tma.async_copy_global_to_shared(q_desc, [bh, q0, 0], q_bar.index(qs),
                                    q_smem.index(qs)._reinterpret(q_desc.dtype, qbox, q_desc.layout), pred=first)


@gluon.jit
def _band_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, N, W, T, NQB, S, KT0,
                     BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
    """O and LSE of the band for the query tiles pid, pid + P, ... (T tiles in all, NQB per batch x head)."""
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    total = ((T - pid + P - 1) // P) * S

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], q_desc.dtype)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BM, D], q_layout)
    k_smem, v_smem, kv_bar = _ring(k_desc, STAGES, BN, D)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    fence_async_shared()
    for i in gl.static_range(STAGES):  # STAGES <= S: these steps all belong to the first query tile
        _issue(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_bar, i, total, pid, P, NQB, S, KT0, BM, BN,
               D, STAGES)

    rows_base = gl.arange(0, BM, layout=row_s)
    cols_base = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    acc = gl.zeros([BM, D], gl.float32, o_layout)
    m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BM], gl.float32, row_s)
    for g in range(total):
        it, bh, q0, kt, s = _step(g, pid, P, NQB, S, KT0, BM, BN)
        qs = it % 2
        slot = g % STAGES
        mbarrier.wait(q_bar.index(qs), (it // 2) & 1)
        mbarrier.wait(kv_bar.index(slot), (g // STAGES) & 1)
        sc = warpgroup_mma(q_smem.index(qs), k_smem.index(slot).permute((1, 0)),
                           gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
        sc = warpgroup_mma_wait(0, deps=(sc,))
        k0 = kt * BN
        # a tile is full when every key is in the sequence and in every row's window
        if (k0 < q0 + BM - W + 1) | (k0 + BN - 1 > q0) | (k0 < 0):
            qi = gl.expand_dims(q0 + rows_base, 1)
            kj = gl.expand_dims(k0 + cols_base, 0)
            sc = gl.where((kj >= 0) & (kj <= qi) & (qi - kj < W), sc, float("-inf"))
        # a query tile's first step: start the running max afresh (alpha = 0 clears acc and l_i below)
        m_i = gl.where(s == 0, gl.full([BM], float("-inf"), gl.float32, row_s), m_i)
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(sc * qk_scale - gl.expand_dims(m_use, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(v_desc.dtype), p_layout), v_smem.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        # slot g % STAGES is free again: the step STAGES ahead (maybe the next query tile's first, with its Q)
        _issue(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_bar, g + STAGES, total, pid, P, NQB, S, KT0,
               BM, BN, D, STAGES)
        if s == S - 1:  # the query tile's last step: write O and LSE
            has = l_i > 0
            l_safe = gl.where(has, l_i, 1.0)
            o = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
            lse = gl.where(has, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            rows_o = q0 + gl.arange(0, BM, layout=row_o)
            offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
            o_ptrs = o_ptr + (bh.to(gl.int64) * N + gl.expand_dims(rows_o, 1)) * D + gl.expand_dims(offs_d, 0)
            gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=gl.expand_dims(rows_o < N, 1))
            rows_l = q0 + rows_base
            gl.store(lse_ptr + bh.to(gl.int64) * N + rows_l, lse, mask=rows_l < N)
    for i in gl.static_range(2):
        mbarrier.invalidate(q_bar.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))


def steps(W, BM, BN):
    """(S, KT0): key tiles per query tile, and the first one's offset from q0 // BN (BN divides BM)."""
    kt0 = -((W - 1 + BN - 1) // BN)
    return (BM - 1) // BN - kt0 + 1, kt0


def _desc(x, rows):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    B, H, N, D = x.shape
    box = [1, rows, D]
    layout = gl.NVMMASharedLayout.get_default_for(box, _GL[x.dtype])
    return TensorDescriptor(x.view(B * H, N, D), [B * H, N, D], [N * D, D, 1], box, layout)


def band_forward(q, k, v, W, scale, BM=64, BN=64, stages=3, warps=4, ctas=3):
    """O, LSE (natural log) of the band i - W < j <= i; q, k, v contiguous [B, H, N, D], bf16 / fp16."""
    B, H, N, D = q.shape
    S, kt0 = steps(W, BM, BN)
    assert BM % BN == 0 and stages <= S
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    nqb = triton.cdiv(N, BM)
    T = B * H * nqb
    P = min(T, ctas * torch.cuda.get_device_properties(q.device).multi_processor_count)
    _band_fwd_kernel[(P,)](_desc(q, BM), _desc(k, BN), _desc(v, BN), o, lse, scale * 1.4426950408889634, N, W, T, nqb,
                           S, kt0, BM=BM, BN=BN, D=D, STAGES=stages, num_warps=warps)
    return o, lse


def reference(q, k, v, W, scale):
    n = q.shape[2]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    vis = (j <= i) & (i - j < W)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v.float(), lse


SETTINGS = [dict(BM=64, BN=64, stages=3, warps=4, ctas=3), dict(BM=64, BN=64, stages=2, warps=4, ctas=4),
            dict(BM=64, BN=64, stages=3, warps=4, ctas=2), dict(BM=128, BN=64, stages=3, warps=4, ctas=2),
            dict(BM=128, BN=64, stages=4, warps=8, ctas=2), dict(BM=64, BN=32, stages=4, warps=4, ctas=3),
            # more CTAs per SM (Nsight Compute: the band's kernels wait on instruction latency at 4 warps per
            # scheduler): 32 KiB of shared memory and 96 registers leave room for 5 (not yet timed)
            dict(BM=64, BN=32, stages=2, warps=4, ctas=5)]


def settings(D, W):
    """The SETTINGS that apply at head dim D and band width W (STAGES <= S; no 128-row tile on 4 warps at d=128)."""
    return [st for st in SETTINGS if not (D == 128 and st["BM"] == 128 and st["warps"] == 4)
            and st["stages"] <= steps(W, st["BM"], st["BN"])[0]]


def check():
    torch.manual_seed(0)
    worst = 0.0
    for (B, H, n, D, W, dt) in ((1, 2, 1000, 64, 128, torch.bfloat16), (2, 3, 777, 64, 96, torch.float16),
                                (1, 2, 4096, 64, 256, torch.bfloat16), (1, 2, 1000, 128, 96, torch.bfloat16),
                                (2, 2, 130, 64, 16, torch.float16), (1, 1, 64, 64, 128, torch.bfloat16)):
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dt) for _ in range(3))
        scale = 1 / math.sqrt(D)
        o_ref, lse_ref = reference(q, k, v, W, scale)
        for st in settings(D, W):
            o, lse = band_forward(q, k, v, W, scale, **st)
            err = ((o.float() - o_ref).abs().max() / o_ref.abs().max()).item()
            err_l = (lse - lse_ref).abs().max().item()
            worst = max(worst, err)
            ok = err < 2e-2 and err_l < 2e-2
            print(f"check B={B} H={H} n={n} D={D} W={W} {str(dt)[6:]:9s} {st}: O {err:.2e} LSE {err_l:.2e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                sys.exit(1)
    print(f"all within bounds (worst O error {worst:.2e})")


def time_against_triton():
    import triton.testing as tt

    from sparse_transformer import layouts
    from sparse_transformer.attention.triton.function import sparse_attention_triton
    from sparse_transformer.bench import capture_graph

    rows = []
    for name, (B, H, n, D, W) in {"strided-12k": (2, 8, 12288, 64, 128), "strided-64k": (1, 8, 65536, 64, 256),
                                  "strided-3k": (8, 2, 3072, 128, 96)}.items():
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = 1 / math.sqrt(D)
        lay = layouts.strided(n, W, "local")
        med = lambda f: tt.do_bench(capture_graph(f).replay, warmup=25, rep=200, return_mode="median") * 1e3  # noqa
        o_t, lse_t = sparse_attention_triton(q, k, v, lay)
        base = med(lambda: sparse_attention_triton(q, k, v, lay))
        mb = 4 * q.numel() * q.element_size() / 1e6
        print(f"{name:12s} triton (library)       {base:7.1f} us  {mb / base:5.2f} TB/s", flush=True)
        rows.append(dict(setup=name, method="triton", us=base))
        for st in settings(D, W):
            o, lse = band_forward(q, k, v, W, scale, **st)
            diff = (o.float() - o_t.float()).abs().max().item()
            us = med(lambda: band_forward(q, k, v, W, scale, **st))
            print(f"{name:12s} gluon {st}  {us:7.1f} us  {mb / us:5.2f} TB/s  x{base / us:.2f}  (max |O - triton| "
                  f"{diff:.1e})", flush=True)
            rows.append(dict(setup=name, method="gluon", **st, us=us, max_diff=diff))
    out = os.environ.get("OUT", "bench/results")
    path = os.path.join(out, f"gluon-band-{time.strftime('%Y%m%d-%H%M%S')}.json")
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
              open(path, "w"), indent=1)
    print("wrote", path)


def compile_only():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, os.path.dirname(__file__))
    from gluon_gather import _report

    for D in (64, 128):
        for st in settings(D, 128):
            def desc(rows):
                box = [1, rows, D]
                return f"tensordesc<bf16[1, {rows}, {D}],{gl.NVMMASharedLayout.get_default_for(box, gl.bfloat16)!r}>"

            sig = dict(q_desc=desc(st["BM"]), k_desc=desc(st["BN"]), v_desc=desc(st["BN"]), o_ptr="*bf16",
                       lse_ptr="*fp32", qk_scale="fp32", N="i32", W="i32", T="i32", NQB="i32", S="i32", KT0="i32",
                       BM="constexpr", BN="constexpr", D="constexpr", STAGES="constexpr", num_warps="constexpr")
            cex = dict(BM=st["BM"], BN=st["BN"], D=D, STAGES=st["stages"], num_warps=st["warps"])
            try:
                k = triton.compile(GluonASTSource(_band_fwd_kernel, sig, cex), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=st["warps"]))
            except Exception as e:
                print(f"D={D} {st}: failed: {type(e).__name__}: {str(e)[-2500:]}", flush=True)
                continue
            _report(f"D={D} {st}", k)


if __name__ == "__main__":
    {"compile": compile_only, "check": check, "time": time_against_triton}[sys.argv[1] if len(sys.argv) > 1
                                                                          else "compile"]()
