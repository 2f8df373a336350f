"""The Gluon kernels of the fixed pattern's summary part (sparse_transformer/attention/triton/gluon_gather.py) on their
own: `python bench/gluon_gather.py compile [fwd dq dkdv] [c=32] [heads]` compiles each setting for sm_90 without a
GPU and reports registers, spills and shared memory (Triton 3.6 is the device's version); on a GPU, `check` (`check-all`: every
setting) compares them with a float32 torch reference on small shapes, gradients against autograd, and `time` sets
their kernel times beside our Triton kernels' (profiler medians) at the fixed-12k and fixed-64k shapes."""
import math
import os
import sys

import torch
import triton

from sparse_transformer.attention.triton.gluon_gather import DKDV_SETTINGS as LIBRARY_KV, DQ_SETTINGS as LIBRARY_DQ, \
    SETTINGS as LIBRARY, _gather_dkdv_kernel, _gather_dq_kernel, _gather_fwd_kernel, _layout, gather_dkdv, \
    gather_dq, gather_forward, summary_box


def reference(q, k, v, L, lo, c, scale):
    """float32 torch: each query over the summary keys (rows lo .. lo + c of each block; lo an int or one per head)
    of earlier blocks."""
    n = q.shape[2]
    i = torch.arange(n, device=q.device)[:, None]
    j = torch.arange(n, device=q.device)[None, :]
    lo = torch.as_tensor(lo, device=q.device).reshape(-1, 1, 1)  # (heads or 1, 1, 1)
    vis = (j // L < i // L) & (j % L >= lo) & (j % L < lo + c)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.clamp_min(-1e30)[..., None]).nan_to_num(0.0)
    return p @ v.float(), lse


SETTINGS = [dict(BM=128, BN=64, stages=st, warps=w, pipe=p) for (st, w, p) in
            ((3, 4, 0), (2, 4, 0), (4, 4, 0), (3, 8, 0), (3, 4, 1), (3, 4, 2), (4, 4, 2))] + \
    [dict(BM=64, BN=64, stages=4, warps=4, pipe=0), dict(BM=128, BN=128, stages=3, warps=8, pipe=0)]
DKDV_SWEEP = [dict(BM=bm, BN=bn, stages=st, warps=w) for (bm, bn, st, w) in
              ((64, 64, 3, 4), (64, 64, 2, 4), (128, 64, 2, 4), (64, 128, 3, 8), (128, 128, 2, 8), (32, 64, 3, 4),
               (32, 64, 4, 4), (32, 64, 2, 4))]
DKDV_SWEEP_128 = [LIBRARY_KV[128]] + [s for s in (dict(BM=64, BN=64, stages=2, warps=4), dict(BM=64, BN=128, stages=2,
                  warps=8), dict(BM=32, BN=64, stages=2, warps=4), dict(BM=32, BN=64, stages=3, warps=4))
                                     if s != LIBRARY_KV[128]]
DQ_SWEEP = [dict(BM=bm, BN=64, stages=st, warps=w) for (bm, st, w) in
            ((128, 3, 8), (128, 2, 8), (128, 4, 8), (64, 3, 4), (64, 2, 4), (64, 4, 4))]


def check(full=False):
    """The library's settings (full: every forward and dQ setting too) and every dK / dV setting against the float32
    reference of the gathered part alone, gradients against autograd; K and V contiguous, or views of one [B, n, 2,
    H, D] projection (as the model's), the summary read in place either way; exits non-zero past the bounds."""
    torch.manual_seed(0)
    worst = []
    cases = [(1, 2, 1024, 64, 128, 32, torch.bfloat16, False), (2, 3, 1000, 64, 256, 32, torch.bfloat16, True),
             (1, 1, 512, 64, 128, 16, torch.float16, False), (1, 2, 4096, 64, 128, 64, torch.bfloat16, False),
             (1, 2, 1000, 128, 256, 32, torch.bfloat16, False), (2, 2, 2100, 64, 256, 128, torch.bfloat16, True),
             (1, 3, 1536, 128, 128, 8, torch.float16, True)]
    # per-head summary offsets (gluon_gather.HEAD_OFFSETS; the last field: num_verts, head h's offset L - c (h % v + 1))
    cases = [(1, 4, 1024, 64, 128, 32, torch.bfloat16, True, 4), (2, 4, 2100, 64, 256, 64, torch.bfloat16, False, 2),
             (1, 2, 1000, 128, 256, 32, torch.float16, True, 2), (1, 4, 1100, 64, 256, 128, torch.bfloat16, True, 2),
             (1, 4, 1536, 64, 128, 8, torch.bfloat16, False, 4)] + [case + (1,) for case in cases]  # per-head first
    for (B, H, n, D, L, c, dt, views, verts) in cases:
        los = [L - c * (h % verts + 1) for h in range(H)]
        lo = los[0] if verts == 1 else torch.tensor(los, dtype=torch.int32, device="cuda")
        scale = 1 / math.sqrt(D)
        q = torch.randn(B, H, n, D, device="cuda", dtype=dt)
        if views:  # strided K and V, as the model's projections
            kv = torch.randn(B, n, 2, H, D, device="cuda", dtype=dt)
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        else:
            k, v = (torch.randn(B, H, n, D, device="cuda", dtype=dt) for _ in range(2))
        qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
        ref, ref_lse = reference(qf, kf, vf, L, los, c, scale)
        seen = ref_lse > float("-inf")
        tag = f"{dt} D={D} n={n} L={L} c={c}{' (K, V views)' if views else ''}" + \
            (f" (offsets {los})" if verts > 1 else "")
        for st in (SETTINGS if full else [LIBRARY[64]]) if D == 64 else [LIBRARY[128]]:
            if L % st["BM"]:
                continue
            o, lse = torch.empty_like(q), torch.empty(B, H, n, device="cuda", dtype=torch.float32)
            gather_forward(q, k, v, o, lse, L, lo, c, scale, False, **st)
            err = ((o.float() - ref.detach())[seen].abs().max() / ref.detach()[seen].abs().max()).item()
            empty_ok = bool(torch.equal(seen, lse > float("-inf"))) and bool((o[~seen] == 0).all())
            lse_err = (lse[seen] - ref_lse.detach()[seen]).abs().max().item()
            worst.append(("fwd", err < 2e-2 and lse_err < 2e-2 and empty_ok))
            print(f"{tag} fwd {st}: max rel err {err:.2e}, lse err {lse_err:.2e}, "
                  f"empty rows ok {empty_ok}", flush=True)
        # dQ alone, added to a random dq already in memory (fp32 and the input dtype): Delta and the LSE from the
        # float32 reference, against autograd
        do = torch.randn_like(q)
        ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (qf, kf, vf), do.float())
        delta = (do.float() * ref.detach()).sum(-1).contiguous()
        for st in (DQ_SWEEP if full else [LIBRARY_DQ[64]]) if D == 64 else [LIBRARY_DQ[128]]:
            for dq_dtype in (torch.float32, dt):
                if L % st["BM"]:
                    continue
                dq0 = torch.randn(B, H, n, D, device="cuda").to(dq_dtype)
                dq = dq0.clone()
                gather_dq(q, do, k, v, ref_lse.detach().contiguous(), delta, dq, L, lo, c, scale, **st)
                got = dq.float() - dq0.float()
                err = ((got - ref_dq).abs().max() / ref_dq.abs().max()).item()
                bound = 3e-2 if dq_dtype == torch.float32 else 6e-2  # a 16-bit dq rounds dq0 + dQ once more
                worst.append(("dq", err < bound))
                print(f"{tag} dq ({dq_dtype}) {st}: max rel err {err:.2e}", flush=True)
        # dK / dV, added to random values at the summary rows; every other row must stay as it was
        rows = torch.arange(n, device="cuda")
        lo_h = torch.tensor(los, device="cuda")[:, None]
        summary = (rows % L >= lo_h) & (rows % L < lo_h + c) & (rows < n // L * L)  # (H, n)
        for st in DKDV_SWEEP + [LIBRARY_KV[64]] if D == 64 else DKDV_SWEEP_128:
            dk0 = (torch.randn_like(q).float() * ref_dk.abs().max()).to(dt)
            dv0 = (torch.randn_like(q).float() * ref_dv.abs().max()).to(dt)
            dk, dv = dk0.clone(), dv0.clone()
            gather_dkdv(q, do, k, v, ref_lse.detach().contiguous(), delta, dk, dv, L, lo, c, scale, **st)
            errs = [((got.float() - t0.float() - ref).abs().max() / ref.abs().max()).item()
                    for got, t0, ref in ((dk, dk0, ref_dk), (dv, dv0, ref_dv))]
            kept = torch.equal(dk[:, ~summary], dk0[:, ~summary]) and torch.equal(dv[:, ~summary], dv0[:, ~summary])
            worst.append(("dkdv", max(errs) < 6e-2 and kept))  # 16-bit dk / dv round dk0 + dK once more
            print(f"{tag} dkdv {st}: max rel err dk {errs[0]:.2e} dv {errs[1]:.2e}, other "
                  f"rows kept {kept}", flush=True)
    bad = [w for w in worst if not w[1]]
    print(f"{len(worst) - len(bad)} of {len(worst)} within bounds", flush=True)
    if bad:
        raise SystemExit(1)


def _gluon(on, f, dkdv=True):
    """Run f with the library's Gluon dispatch on or off (dkdv: its dK / dV kernel too)."""
    from sparse_transformer.attention.triton import forward, gluon_gather

    was = forward.GLUON_GATHER, gluon_gather.DKDV
    forward.GLUON_GATHER, gluon_gather.DKDV = on, dkdv
    try:
        return f()
    finally:
        forward.GLUON_GATHER, gluon_gather.DKDV = was


def _profile(label, f):
    """Print the CUDA kernels f launches with their profiler medians of 5 (after one warm-up call)."""
    from sparse_transformer.bench import kernel_times

    try:
        print(f"{label:84s} " + "  ".join(f"{a} {b:.0f} us" for a, b in kernel_times(f)), flush=True)
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
        o, lse = torch.empty_like(q), torch.empty(B, H, n, device="cuda", dtype=torch.float32)
        qg = q.detach().requires_grad_()
        go = torch.randn_like(q)
        runs = {}
        for on, dkdv, what in ((False, False, "Triton only"), (True, False, "Gluon gathered fwd and dQ"),
                               (True, True, "Gluon gathered fwd, dQ and dK/dV")):
            runs[f"ours fwd+bwd, {what}"] = \
                lambda on=on, dkdv=dkdv: _gluon(on, lambda: sparse_attention(qg, k, v, lay).backward(go), dkdv)
        runs["ours fwd, Gluon"] = lambda: _gluon(True, lambda: sparse_attention(q, k, v, lay))
        for st in [LIBRARY[D]] if D == 64 else [LIBRARY[128]]:
            runs[f"gluon fwd {st}"] = lambda st=st: gather_forward(q, k, v, o, lse, L, L - c, c, D ** -0.5, False,
                                                                   **st)
        gather_forward(q, k, v, o, lse, L, L - c, c, D ** -0.5, False, **LIBRARY[D])
        lse_ok = torch.where(lse > float("-inf"), lse, 0.0)  # rows that see no summary key: any finite value
        delta = torch.randn_like(lse)
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        for st in [LIBRARY_DQ[D]]:
            runs[f"gluon dq {st}"] = lambda st=st: gather_dq(q, go, k, v, lse_ok, delta, dq, L, L - c, c, D ** -0.5,
                                                             **st)
        dk, dv = torch.zeros_like(q), torch.zeros_like(q)
        for st in DKDV_SWEEP if D == 64 else DKDV_SWEEP_128:
            runs[f"gluon dkdv {st}"] = lambda st=st: gather_dkdv(q, go, k, v, lse_ok, delta, dk, dv, L, L - c, c,
                                                                 D ** -0.5, **st)
        for label, f in runs.items():
            _profile(f"{name:14s} {label}", f)


def compile_only(which=("fwd", "dq", "dkdv"), c=32, head_lo=False):
    """Compile every setting (d=64) and the library's settings for sm_90 without a GPU and report registers / spills
    (ptxas -v), shared memory, and whether ptxas serialized the asynchronous wgmma (which undoes the pipelining);
    c: the summary width the key / value descriptors' boxes are cut for; head_lo: the per-head offset variant."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    print(f"triton {triton.__version__}, target sm_90, summary width c={c}{', per-head offsets' if head_lo else ''}")

    def descs(st, D):
        box = (1, 1, *summary_box(c, st["BN"]), D)
        return (f"tensordesc<bf16[{st['BM']}, {D}],{_layout((st['BM'], D), torch.bfloat16)!r}>",
                f"tensordesc<bf16[{', '.join(map(str, box))}],{_layout(box, torch.bfloat16)!r}>")

    def build(kernel, label, st, sig, cex):
        try:
            k = triton.compile(GluonASTSource(kernel, sig, dict(cex, num_warps=st["warps"])),
                               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=st["warps"]))
        except Exception as e:
            print(f"{label}: failed: {type(e).__name__}: {str(e)[-1500:]}", flush=True)
            return
        _report(label, k)

    scalars = dict(N="i32", H="i32", TH="i32")
    for st in [dict(s, D=64) for s in SETTINGS if "fwd" in which] + \
            [dict(s, D=d, library=True) for d, s in LIBRARY.items() if "fwd" in which]:
        D = st["D"]
        qd, kd = descs(st, D)
        rb, rc = summary_box(c, st["BN"])
        sig = dict(q_desc=qd, k_desc=kd, v_desc=kd, o_ptr="*bf16", lse_ptr="*fp32", lo_ptr="*i32", qk_scale="fp32",
                   **scalars, G="i32", NQB="i32", SEG_L="i32", SEG_C="i32", BM="constexpr", BN="constexpr",
                   D="constexpr", RB="constexpr", RC="constexpr", STAGES="constexpr", PIPE="constexpr",
                   MERGE="constexpr", HEAD_LO="constexpr", num_warps="constexpr")
        build(_gather_fwd_kernel, f"fwd {st}", st, sig, dict(BM=st["BM"], BN=st["BN"], D=D, RB=rb, RC=rc,
                                                             STAGES=st["stages"], PIPE=st["pipe"], MERGE=True,
                                                             HEAD_LO=head_lo))
    for st in [dict(s, D=64) for s in DQ_SWEEP if "dq" in which] + \
            [dict(s, D=d, library=True) for d, s in LIBRARY_DQ.items() if "dq" in which]:
        D = st["D"]
        qd, kd = descs(st, D)
        rb, rc = summary_box(c, st["BN"])
        sig = dict(q_desc=qd, do_desc=qd, k_desc=kd, v_desc=kd, dq_ptr="*fp32", lse_ptr="*fp32", delta_ptr="*fp32",
                   lo_ptr="*i32", qk_scale="fp32", sm_scale="fp32", **scalars, G="i32", NQB="i32", SEG_L="i32",
                   SEG_C="i32", BM="constexpr", BN="constexpr", D="constexpr", RB="constexpr", RC="constexpr",
                   STAGES="constexpr", HEAD_LO="constexpr", num_warps="constexpr")
        build(_gather_dq_kernel, f"dq {st}", st, sig, dict(BM=st["BM"], BN=st["BN"], D=D, RB=rb, RC=rc,
                                                           STAGES=st["stages"], HEAD_LO=head_lo))
    for st in [s for s in DKDV_SWEEP if "dkdv" in which] + \
            [dict(s, D=128) for s in DKDV_SWEEP_128[1:] if "dkdv" in which] + \
            [dict(s, D=d, library=True) for d, s in LIBRARY_KV.items() if "dkdv" in which]:
        st = dict(st, D=st.get("D", 64))
        D = st["D"]
        qd, kd = descs(st, D)
        rb, rc = summary_box(c, st["BN"])
        sig = dict(q_desc=qd, do_desc=qd, k_desc=kd, v_desc=kd, dk_ptr="*bf16", dv_ptr="*bf16", lse_ptr="*fp32",
                   delta_ptr="*fp32", lo_ptr="*i32", qk_scale="fp32", sm_scale="fp32", **scalars, NB="i32",
                   SEG_L="i32", SEG_LO="i32", SEG_C="i32", BM="constexpr", BN="constexpr", D="constexpr",
                   RB="constexpr", RC="constexpr", STAGES="constexpr", HEAD_LO="constexpr", num_warps="constexpr")
        build(_gather_dkdv_kernel, f"dkdv {st}", st, sig, dict(BM=st["BM"], BN=st["BN"], D=D, RB=rb, RC=rc,
                                                               STAGES=st["stages"], HEAD_LO=head_lo))


def _report(label, k):
    sys.path.insert(0, os.path.dirname(__file__))
    from compile_probe import ptxas_report

    ptx = k.asm["ptx"]
    regs, spills = ptxas_report(ptx)
    print(f"{label}: regs {regs}, spill st/ld {spills}, smem {k.metadata.shared // 1024} KiB, "
          f"wgmma {ptx.count('wgmma.mma_async')}, tma loads {ptx.count('cp.async.bulk.tensor')}", flush=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "compile"
    if what == "compile":  # optionally: which kernels (fwd, dq, dkdv), c=WIDTH, heads (the per-head offset variant)
        args = [a for a in sys.argv[2:] if not a.startswith("c=") and a != "heads"]
        widths = [int(a[2:]) for a in sys.argv[2:] if a.startswith("c=")] or [32]
        for width in widths:
            compile_only(tuple(args) or ("fwd", "dq", "dkdv"), width, "heads" in sys.argv[2:])
    else:
        {"check": check, "check-all": lambda: check(True), "time": time_against_triton}[what]()
