"""The Gluon gathered forward (sparse_transformer/attention/triton/gluon_gather.py, experimental, off by default) on its
own: `python bench/gluon_gather.py compile` compiles each setting for sm_90 without a GPU and reports registers,
spills and shared memory (Triton 3.6 is the device's version); on a GPU, `check` compares each setting with a float32
torch reference on small shapes and `time` sets its kernel time beside our Triton forward's kernels (profiler medians)
at the fixed-12k and fixed-64k shapes."""
import math
import os
import sys

import torch
import triton

from sparse_transformer.attention.triton.gluon_gather import DQ_SETTINGS as LIBRARY_DQ, SETTINGS as LIBRARY, \
    _GL_DTYPES, _gather_dq_kernel, _gather_fwd_kernel, _layouts, gather_dq, gather_forward, summary_kv


def reference(q, k, v, L, lo, c, scale):
    """float32 torch: each query over the summary keys (rows lo .. lo + c of each block) of earlier blocks."""
    n = q.shape[2]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    vis = (j // L < i // L) & (j % L >= lo) & (j % L < lo + c)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.clamp_min(-1e30)[..., None]).nan_to_num(0.0)
    return p @ v.float(), lse


SETTINGS = [dict(BM=128, BN=64, stages=st, warps=w, pipe=p) for (st, w, p) in
            ((3, 4, 0), (2, 4, 0), (4, 4, 0), (3, 8, 0), (3, 4, 1), (3, 4, 2), (4, 4, 2))] + \
    [dict(BM=64, BN=64, stages=4, warps=4, pipe=0), dict(BM=128, BN=128, stages=3, warps=8, pipe=0)]
DQ_SWEEP = [dict(BM=bm, BN=64, stages=st, warps=w) for (bm, st, w) in
            ((128, 3, 8), (128, 2, 8), (128, 4, 8), (64, 3, 4), (64, 2, 4), (64, 4, 4))]


def check():
    """Every setting against the float32 reference of the gathered part alone; exits non-zero past the bounds."""
    torch.manual_seed(0)
    worst = []
    cases = [(1, 2, 1024, 64, 128, 32, torch.bfloat16), (2, 3, 1000, 64, 256, 32, torch.bfloat16),
             (1, 1, 512, 64, 128, 16, torch.float16), (1, 2, 4096, 64, 128, 64, torch.bfloat16),
             (1, 2, 1000, 128, 256, 32, torch.bfloat16)]
    for (B, H, n, D, L, c, dt) in cases:
        lo = L - c
        scale = 1 / math.sqrt(D)
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dt) for _ in range(3))
        qf = q.float().requires_grad_()
        ref, ref_lse = reference(qf, k, v, L, lo, c, scale)
        ks, vs = summary_kv(k, L, lo, c), summary_kv(v, L, lo, c)
        seen = ref_lse > float("-inf")
        for st in SETTINGS if D == 64 else [LIBRARY[128], dict(BM=128, BN=64, stages=4, warps=8, pipe=2)]:
            if L % st["BM"]:
                continue
            o, lse = torch.empty_like(q), torch.empty(B, H, n, device="cuda", dtype=torch.float32)
            gather_forward(q, ks, vs, o, lse, L, c, scale, False, **st)
            err = ((o.float() - ref.detach())[seen].abs().max() / ref.detach()[seen].abs().max()).item()
            empty_ok = bool(torch.equal(seen, lse > float("-inf"))) and bool((o[~seen] == 0).all())
            lse_err = (lse[seen] - ref_lse.detach()[seen]).abs().max().item()
            worst.append(("fwd", err < 2e-2 and lse_err < 2e-2 and empty_ok))
            print(f"{dt} D={D} n={n} L={L} c={c} fwd {st}: max rel err {err:.2e}, lse err {lse_err:.2e}, "
                  f"empty rows ok {empty_ok}", flush=True)
        # dQ alone, added to a random dq already in memory (fp32 and the input dtype): Delta and the LSE from the
        # float32 reference, against autograd
        do = torch.randn_like(q)
        (ref_dq,) = torch.autograd.grad(ref, qf, do.float())
        delta = (do.float() * ref.detach()).sum(-1).contiguous()
        for st in DQ_SWEEP if D == 64 else [LIBRARY_DQ[128]]:
            for dq_dtype in (torch.float32, dt):
                if L % st["BM"]:
                    continue
                dq0 = torch.randn(B, H, n, D, device="cuda").to(dq_dtype)
                dq = dq0.clone()
                gather_dq(q, do, ks, vs, ref_lse.detach().contiguous(), delta, dq, L, c, scale, **st)
                got = dq.float() - dq0.float()
                err = ((got - ref_dq).abs().max() / ref_dq.abs().max()).item()
                bound = 3e-2 if dq_dtype == torch.float32 else 6e-2  # a 16-bit dq rounds dq0 + dQ once more
                worst.append(("dq", err < bound))
                print(f"{dt} D={D} n={n} L={L} c={c} dq ({dq_dtype}) {st}: max rel err {err:.2e}", flush=True)
    bad = [w for w in worst if not w[1]]
    print(f"{len(worst) - len(bad)} of {len(worst)} within bounds", flush=True)
    if bad:
        raise SystemExit(1)


def _gluon(on, f):
    """Run f with the library's Gluon dispatch on or off."""
    from sparse_transformer.attention.triton import forward

    was, forward.GLUON_GATHER = forward.GLUON_GATHER, on
    try:
        return f()
    finally:
        forward.GLUON_GATHER = was


def _profile(label, f):
    """Print the CUDA kernels f launches with their profiler medians of 5 (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

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
        print(f"{label:84s} " + "  ".join(f"{a} {b:.0f} us" for a, b in zip(names, med)), flush=True)
    except Exception as e:  # an experiment: report and go on
        print(f"{label:84s} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)


def time_against_triton():
    """Kernel times (profiler medians of 5) of these kernels, alone and in the library, beside our Triton kernels at
    the fixed setups (d=64), and the library settings at d=128."""
    from sparse_transformer import layouts, sparse_attention

    setups = {"fixed-12k": (2, 8, 12288, 128, 32, 64), "fixed-64k": (1, 8, 65536, 256, 32, 64),
              "fixed-12k-d128": (2, 4, 12288, 128, 32, 128)}
    for name, (B, H, n, L, c, D) in setups.items():
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lay = layouts.fixed(n, L, c)
        ks, vs = summary_kv(k, L, L - c, c), summary_kv(v, L, L - c, c)
        o, lse = torch.empty_like(q), torch.empty(B, H, n, device="cuda", dtype=torch.float32)
        qg = q.detach().requires_grad_()
        go = torch.randn_like(q)
        runs = {"the summary copy (K and V)": lambda: (summary_kv(k, L, L - c, c), summary_kv(v, L, L - c, c))}
        for on in (False, True):
            what = "gathered fwd and dQ through Gluon" if on else "Triton only"
            runs[f"ours fwd, {what}"] = lambda on=on: _gluon(on, lambda: sparse_attention(q, k, v, lay))
            runs[f"ours fwd+bwd, {what}"] = \
                lambda on=on: _gluon(on, lambda: sparse_attention(qg, k, v, lay).backward(go))
        for st in SETTINGS if D == 64 else [LIBRARY[128]]:
            runs[f"gluon fwd {st}"] = lambda st=st: gather_forward(q, ks, vs, o, lse, L, c, D ** -0.5, False, **st)
        gather_forward(q, ks, vs, o, lse, L, c, D ** -0.5, False, **LIBRARY[D])
        lse_ok = torch.where(lse > float("-inf"), lse, 0.0)  # rows that see no summary key: any finite value
        delta = torch.randn_like(lse)
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        for st in DQ_SWEEP if D == 64 else [LIBRARY_DQ[128], dict(BM=128, BN=64, stages=3, warps=8)]:
            runs[f"gluon dq {st}"] = lambda st=st: gather_dq(q, go, ks, vs, lse_ok, delta, dq, L, c, D ** -0.5, **st)
        for label, f in runs.items():
            _profile(f"{name:14s} {label}", f)


def compile_only():
    """Compile every setting (d=64) and the library's settings for sm_90 without a GPU and report registers / spills
    (ptxas -v), shared memory, and whether ptxas serialized the asynchronous wgmma (which undoes the pipelining)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    print(f"triton {triton.__version__}, target sm_90")
    for st in [dict(s, D=64) for s in SETTINGS] + [dict(s, D=d, library=True) for d, s in LIBRARY.items()]:
        D = st["D"]
        q_layout, kv_layout = _layouts(st["BM"], st["BN"], D, _GL_DTYPES[torch.bfloat16])
        sig = dict(q_desc=f"tensordesc<bf16[{st['BM']}, {D}],{q_layout!r}>",
                   k_desc=f"tensordesc<bf16[{st['BN']}, {D}],{kv_layout!r}>",
                   v_desc=f"tensordesc<bf16[{st['BN']}, {D}],{kv_layout!r}>",
                   o_ptr="*bf16", lse_ptr="*fp32", qk_scale="fp32", N="i32", G="i32", NQB="i32", SEG_L="i32",
                   SEG_C="i32", BM="constexpr", BN="constexpr", D="constexpr", STAGES="constexpr",
                   PIPE="constexpr", MERGE="constexpr", num_warps="constexpr")
        cex = dict(BM=st["BM"], BN=st["BN"], D=D, STAGES=st["stages"], PIPE=st["pipe"], MERGE=True,
                   num_warps=st["warps"])
        try:
            src = GluonASTSource(_gather_fwd_kernel, sig, cex)
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=st["warps"]))
        except Exception as e:
            print(f"{st}: failed: {type(e).__name__}: {str(e)[-900:]}", flush=True)
            continue
        _report(st, k)
    for st in [dict(BM=64, BN=64, stages=3, warps=4, D=64), dict(BM=128, BN=64, stages=3, warps=4, D=64)] + \
            [dict(s, D=d, library=True) for d, s in LIBRARY_DQ.items()]:
        D = st["D"]
        q_layout, kv_layout = _layouts(st["BM"], st["BN"], D, _GL_DTYPES[torch.bfloat16])
        qd = f"tensordesc<bf16[{st['BM']}, {D}],{q_layout!r}>"
        kd = f"tensordesc<bf16[{st['BN']}, {D}],{kv_layout!r}>"
        sig = dict(q_desc=qd, do_desc=qd, k_desc=kd, v_desc=kd, dq_ptr="*fp32", lse_ptr="*fp32", delta_ptr="*fp32",
                   qk_scale="fp32", sm_scale="fp32", N="i32", G="i32", NQB="i32", SEG_L="i32", SEG_C="i32",
                   BM="constexpr", BN="constexpr", D="constexpr", STAGES="constexpr", num_warps="constexpr")
        cex = dict(BM=st["BM"], BN=st["BN"], D=D, STAGES=st["stages"], num_warps=st["warps"])
        try:
            k = triton.compile(GluonASTSource(_gather_dq_kernel, sig, cex), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=st["warps"]))
        except Exception as e:
            print(f"dq {st}: failed: {type(e).__name__}: {str(e)[-900:]}", flush=True)
            continue
        _report(f"dq {st}", k)


def _report(label, k):
    sys.path.insert(0, os.path.dirname(__file__))
    from compile_probe import ptxas_report

    ptx = k.asm["ptx"]
    regs, spills = ptxas_report(ptx)
    print(f"{label}: regs {regs}, spill st/ld {spills}, smem {k.metadata.shared // 1024} KiB, "
          f"wgmma {ptx.count('wgmma.mma_async')}, tma loads {ptx.count('cp.async.bulk.tensor')}", flush=True)


if __name__ == "__main__":
    {"compile": compile_only, "check": check, "time": time_against_triton}[sys.argv[1] if len(sys.argv) > 1 else
                                                                          "compile"]()
