"""Experiment (not used by the library): the fixed pattern's gathered summary part, forward only, as a Gluon kernel for
Hopper - TMA loads into a ring of shared-memory stages, asynchronous wgmma, and (PIPE) the next tile's Q K^T issued
before this tile's softmax and this tile's P V left running into the next softmax, so that the tensor cores and the
exponentials can work at the same time (the intra-warpgroup overlap of FlashAttention-3). The Triton forward of that part runs its units one after another
(BENCHMARKS.md, "What limits the fixed pattern"); this is the first step towards a kernel that does not.

The summary keys of every block (rows lo .. lo + c of each L-row block) are first copied into a contiguous
[B, H, n / L * c, D] tensor (1/8 of K and V at L = 256, c = 32), so that every key tile is one TMA box. A query tile of
block b sees the summary keys of blocks 0 .. b - 1: key slots [0, b * c) - a column limit, no per-element rule.

Status: written and compiled for sm_90 on a CPU machine (Triton 3.6, `python bench/gluon_gather.py compile`); Gluon has
no interpreter, so correctness and speed are for a GPU: `python bench/gluon_gather.py check` (against a float32 torch
reference on small shapes), `python bench/gluon_gather.py time` (against our Triton gathered forward, from the profiler,
at the fixed-12k and fixed-64k shapes)."""
import math
import os
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, \
    warpgroup_mma_init, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _gather_fwd_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, qk_scale, N, G, NQB, SEG_L, SEG_C,
                       BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
                       PIPE: gl.constexpr, num_warps: gl.constexpr):
    """PIPE 0: each tile's Q K^T, softmax and P V one after another; 1: the next tile's Q K^T issued before this tile's
    softmax; 2: also this tile's P V left running into the next tile's softmax (3 stages or more: tiles j - 1, j and
    j + 1 are in use at once)."""
    gl.static_assert(PIPE < 2 or STAGES >= 3)
    bh = gl.program_id(0)  # every head's longest query tile first
    qb = NQB - 1 - gl.program_id(1)
    q0 = qb * BM
    kv_len = gl.minimum((q0 // SEG_L) * SEG_C, G)  # the summary keys of the earlier blocks (BM divides SEG_L)
    n_tiles = gl.cdiv(kv_len, BN)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(s), count=1)
    fence_async_shared()

    kv_bytes: gl.constexpr = 2 * BN * D * 2
    mbarrier.expect(q_bar, BM * D * 2)
    tma.async_copy_global_to_shared(q_desc, [bh * N + q0, 0], q_bar, q_smem)
    for s in gl.static_range(STAGES):  # the first STAGES key / value tiles
        ok = s < n_tiles
        mbarrier.expect(kv_bar.index(s), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [bh * G + s * BN, 0], kv_bar.index(s), k_smem.index(s), pred=ok)
        tma.async_copy_global_to_shared(v_desc, [bh * G + s * BN, 0], kv_bar.index(s), v_smem.index(s), pred=ok)

    m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([BM], gl.float32, row_s)
    acc = gl.zeros([BM, D], gl.float32, o_layout)
    if PIPE == 2:  # the loop carries acc as a still-running wgmma's accumulator
        acc = warpgroup_mma_init(acc)
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    mbarrier.wait(q_bar, 0)

    # S of the first tile (when there is none the loop below does not run and this result is never read)
    mbarrier.wait(kv_bar.index(0), 0, pred=n_tiles > 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_layout),
                          use_acc=False, is_async=True)
    s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
    for j in range(n_tiles):
        stage = j % STAGES
        if PIPE >= 1:  # issue the next tile's Q K^T now: it runs while this tile's softmax does (the last tile
            # redoes its own, unread)
            nxt = gl.minimum(j + 1, n_tiles - 1)
            mbarrier.wait(kv_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
            s_next = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)),
                                   gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
        sc = gl.where(gl.expand_dims(j * BN + cols < kv_len, 0), s_cur, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)  # kv_len > 0 here: every row sees a key in tile 0
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(sc * qk_scale - gl.expand_dims(m_new, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        if PIPE == 2:  # the previous tile's P V (older than the Q K^T just issued) must be done before the rescale
            acc = warpgroup_mma_wait(1, deps=(acc,))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(stage), acc, is_async=True)
        if PIPE == 2:  # wait for the next Q K^T only: this P V runs on into the next softmax
            s_cur = warpgroup_mma_wait(1, deps=(s_next,))
            free = j - 1  # tile j - 1's stage is done with (its P V finished above): load tile j - 1 + STAGES
            refill = (j >= 1) & (free + STAGES < n_tiles)
            fs = (j + STAGES - 1) % STAGES
        else:
            if PIPE == 1:
                acc, s_next = warpgroup_mma_wait(0, deps=(acc, s_next))
                s_cur = s_next
            else:
                acc = warpgroup_mma_wait(0, deps=(acc,))
            free = j
            refill = j + STAGES < n_tiles
            fs = stage
        mbarrier.expect(kv_bar.index(fs), kv_bytes, pred=refill)
        tma.async_copy_global_to_shared(k_desc, [bh * G + (free + STAGES) * BN, 0], kv_bar.index(fs),
                                        k_smem.index(fs), pred=refill)
        tma.async_copy_global_to_shared(v_desc, [bh * G + (free + STAGES) * BN, 0], kv_bar.index(fs),
                                        v_smem.index(fs), pred=refill)
        if PIPE == 0:
            nxt = gl.minimum(j + 1, n_tiles - 1)
            mbarrier.wait(kv_bar.index(nxt % STAGES), (nxt // STAGES) & 1)
            s_cur = warpgroup_mma(q_smem, k_smem.index(nxt % STAGES).permute((1, 0)),
                                  gl.zeros([BM, BN], gl.float32, s_layout), use_acc=False, is_async=True)
            s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
    if PIPE == 2:
        acc = warpgroup_mma_wait(0, deps=(acc,))

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
    gl.store(o_ptrs, o.to(gl.bfloat16), mask=gl.expand_dims(rows_o < N, 1))
    rows_s = q0 + gl.arange(0, BM, layout=row_s)
    gl.store(lse_ptr + bh.to(gl.int64) * N + rows_s, lse, mask=rows_s < N)


def summary_kv(x, L, lo, c):
    """The summary rows (lo .. lo + c of every L-row block) of x [B, H, n, D], contiguous: [B, H, n // L * c, D]."""
    B, H, n, D = x.shape
    return x[:, :, : n // L * L].reshape(B, H, n // L, L, D)[:, :, :, lo:lo + c].reshape(B, H, -1, D).contiguous()


def _layouts(BM, BN, D):
    return (gl.NVMMASharedLayout.get_default_for([BM, D], gl.bfloat16),
            gl.NVMMASharedLayout.get_default_for([BN, D], gl.bfloat16))


def gather_forward(q, k_sum, v_sum, L, c, scale, BM=128, BN=64, stages=3, warps=4, pipe=2):
    """Attention of each query over the summary keys of the blocks before its own: (out [B, H, n, D] bf16, lse fp32)."""
    B, H, n, D = q.shape
    G = k_sum.shape[2]
    assert q.dtype == torch.bfloat16 and L % BM == 0 and q.is_contiguous() and k_sum.is_contiguous()
    q_layout, kv_layout = _layouts(BM, BN, D)
    q2, k2, v2 = q.view(B * H * n, D), k_sum.view(B * H * G, D), v_sum.view(B * H * G, D)
    q_desc = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BM, D], q_layout)
    k_desc = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BN, D], kv_layout)
    v_desc = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BN, D], kv_layout)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    nqb = triton.cdiv(n, BM)
    _gather_fwd_kernel[(B * H, nqb)](q_desc, k_desc, v_desc, o, lse, scale * 1.4426950408889634, n, G, nqb, L, c,
                                     BM=BM, BN=BN, D=D, STAGES=stages, PIPE=pipe, num_warps=warps)
    return o, lse


def reference(q, k, v, L, lo, c, scale):
    """float32 torch: each query over the summary keys (rows lo .. lo + c of each block) of the blocks before its own."""
    n = q.shape[2]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    vis = (j // L < i // L) & (j % L >= lo) & (j % L < lo + c)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.clamp_min(-1e30)[..., None]).nan_to_num(0.0)
    return p @ v.float(), lse


SETTINGS = [dict(BM=128, BN=64, stages=3, warps=4, pipe=p) for p in (0, 1, 2)] + \
    [dict(BM=128, BN=64, stages=3, warps=8, pipe=2), dict(BM=64, BN=64, stages=4, warps=4, pipe=2),
     dict(BM=128, BN=128, stages=3, warps=8, pipe=2)]


def check():
    torch.manual_seed(0)
    for (B, H, n, D, L, c) in [(1, 2, 1024, 64, 128, 32), (2, 3, 1000, 64, 256, 32), (1, 1, 512, 64, 128, 16)]:
        lo = L - c
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref, ref_lse = reference(q, k, v, L, lo, c, 1 / math.sqrt(D))
        ks, vs = summary_kv(k, L, lo, c), summary_kv(v, L, lo, c)
        for st in SETTINGS:
            if L % st["BM"]:
                continue
            o, lse = gather_forward(q, ks, vs, L, c, 1 / math.sqrt(D), **st)
            seen = ref_lse > float("-inf")
            err = ((o.float() - ref)[seen].abs().max() / ref[seen].abs().max()).item()
            ok = bool(torch.equal(seen, lse > float("-inf"))) and bool((o[~seen] == 0).all())
            lse_err = (lse[seen] - ref_lse[seen]).abs().max().item()
            print(f"n={n} L={L} c={c} {st}: max rel err {err:.2e}, lse err {lse_err:.2e}, empty rows ok {ok}",
                  flush=True)


def time_against_triton():
    """Kernel times (profiler medians of 5) of this kernel and of our Triton gathered forward at the fixed setups."""
    from torch.profiler import ProfilerActivity, profile

    from sparse_transformer import layouts, sparse_attention

    for name, (B, H, n, L, c) in {"fixed-12k": (2, 8, 12288, 128, 32), "fixed-64k": (1, 8, 65536, 256, 32)}.items():
        q, k, v = (torch.randn(B, H, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lay = layouts.fixed(n, L, c)
        runs = {"triton (ours, both segments' forward)": lambda: sparse_attention(q, k, v, lay, backend="triton"),
                "the summary copy (K and V)": lambda: (summary_kv(k, L, L - c, c), summary_kv(v, L, L - c, c))}
        ks, vs = summary_kv(k, L, L - c, c), summary_kv(v, L, L - c, c)
        for st in SETTINGS:
            runs[f"gluon {st}"] = lambda st=st: gather_forward(q, ks, vs, L, c, 0.125, **st)
        for label, f in runs.items():
            try:
                f()
                torch.cuda.synchronize()
                per = []
                for _ in range(5):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        f()
                        torch.cuda.synchronize()
                    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                                key=lambda e: e.time_range.start)
                    per.append([(e.name[:28], e.time_range.elapsed_us()) for e in ev])
                names = [x[0] for x in per[0]]
                med = [sorted(p[i][1] for p in per)[2] for i in range(len(names))]
                print(f"{name:10s} {label:70s} " + "  ".join(f"{a} {b:.0f} us" for a, b in zip(names, med)),
                      flush=True)
            except Exception as e:  # an experiment: report and go on
                print(f"{name:10s} {label:70s} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)


def compile_only():
    """Compile every setting for sm_90 without a GPU and report registers / spills (ptxas -v) and shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, os.path.dirname(__file__))
    from compile_probe import ptxas_report

    print(f"triton {triton.__version__}, target sm_90")
    for st in SETTINGS:
        q_layout, kv_layout = _layouts(st["BM"], st["BN"], 64)
        sig = dict(q_desc=f"tensordesc<bf16[{st['BM']}, 64],{q_layout!r}>",
                   k_desc=f"tensordesc<bf16[{st['BN']}, 64],{kv_layout!r}>",
                   v_desc=f"tensordesc<bf16[{st['BN']}, 64],{kv_layout!r}>",
                   o_ptr="*bf16", lse_ptr="*fp32", qk_scale="fp32", N="i32", G="i32", NQB="i32", SEG_L="i32",
                   SEG_C="i32", BM="constexpr", BN="constexpr", D="constexpr", STAGES="constexpr",
                   PIPE="constexpr", num_warps="constexpr")
        cex = dict(BM=st["BM"], BN=st["BN"], D=64, STAGES=st["stages"], PIPE=st["pipe"], num_warps=st["warps"])
        try:
            src = GluonASTSource(_gather_fwd_kernel, sig, cex)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=st["warps"]))
        except Exception as e:
            print(f"{st}: failed: {type(e).__name__}: {str(e)[-900:]}", flush=True)
            continue
        ptx = k.asm["ptx"]
        regs, spills = ptxas_report(ptx)
        print(f"{st}: regs {regs}, spill st/ld {spills}, smem {k.metadata.shared // 1024} KiB, "
              f"wgmma {ptx.count('wgmma.mma_async')}, tma loads {ptx.count('cp.async.bulk.tensor')}", flush=True)


if __name__ == "__main__":
    {"compile": compile_only, "check": check, "time": time_against_triton}[sys.argv[1] if len(sys.argv) > 1 else
                                                                          "compile"]()
