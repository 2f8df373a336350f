"""Where the time of our attention goes, per setup: eager fwd / fwd+bwd with Triton's own launch path and with the
direct launcher (launcher.FAST), host time per call, CUDA-graph replay (GPU time), cuDNN beside it, and each kernel's
GPU time within one fwd+bwd (torch.profiler, in launch order). Usage on the device:
python bench/dev_probe.py [setup ...]  (prints a table, writes $OUT/dev_probe.json or bench/results/);
python bench/dev_probe.py micro  (host time of one launch and of tiny whole calls, each launch path);
python bench/dev_probe.py sweep [setup ...]  (per-kernel GPU time for each tile config in CONFIGS);
python bench/dev_probe.py passes [setup ...]  (per-pass tile settings in PASSES against TUNING: per-kernel GPU time,
graph fwd and fwd+bwd; also the setup fixed-12k-d128);
python bench/dev_probe.py order [setup ...]  (program order: heads interleaved or one after another);
python bench/dev_probe.py oneloop [setup ...]  (forward / backward.ONE_LOOP by the default rule, off and on: per-kernel
GPU time, graph fwd and fwd+bwd);
python bench/dev_probe.py maxnreg [setup ...]  (register caps per pass, TUNING's "maxnreg": per-kernel GPU time,
graph; MAXNREG_BWD=1: also the band's dQ and dK/dV capped);
python bench/dev_probe.py winmask [setup ...]  (the window-only rule as one unsigned compare, function.WIN_ALONE, on
and off);
python bench/dev_probe.py fuse [setup ...]  (dQ fused into dK/dV with atomics, per segment kind and dK/dV tile config in
FUSE_CONFIGS: per-kernel GPU time and graph-replayed fwd+bwd, against no fusion and the current TUNING)."""
import json
import os
import re
import sys
import time

import torch
import triton.testing as tt
from torch.profiler import ProfilerActivity, profile

from sparse_transformer import layouts, sparse_attention
from sparse_transformer.attention.triton import launcher
from sparse_transformer.bench import SETUPS, _versions, graph_ms


def med(f):
    return tt.do_bench(f, warmup=25, rep=200, return_mode="median")


def host_us(f, reps=100):
    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return t


def kernel_times(f):
    f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        f()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ev.sort(key=lambda e: e.time_range.start)
    return [(e.name[:40], round(e.time_range.elapsed_us(), 1)) for e in ev]


def median_kernel_times(f, runs):
    """Kernel names (launch order) and each kernel's median GPU time (us) over `runs` profiled calls of f."""
    times = [kernel_times(f) for _ in range(runs)]
    return [x[0] for x in times[0]], [sorted(t[i][1] for t in times)[runs // 2] for i in range(len(times[0]))]


# setups beyond the benchmark's, for the probes only: the fixed pattern at d = 128 (its block band takes the natural
# kind's forward at d = 128, as strided-3k's band does)
EXTRA = {"fixed-12k-d128": (2, 4, 12288, 128, lambda: layouts.fixed(12288, 128, 32), "fixed-l128-c32")}


def write_rows(rows, filename):
    with open(os.path.join(os.environ.get("OUT", "bench/results"), filename), "w") as f:
        json.dump(rows, f, indent=1)


def run_setups(names, run_setup, label):
    """run_setup(name, rows) for each setup, the GPU's cache freed after each; then the rows with the device and
    versions as JSON under $OUT (or bench/results/), label-<date>.json. Returns the rows."""
    dev, tv, trv = _versions()
    print(dev, tv, trv, flush=True)
    rows = []
    for name in names:
        run_setup(name, rows)
        torch.cuda.empty_cache()
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(out, f"{label}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(device=dev, torch=tv, triton=trv, rows=rows), f, indent=1)
    print("wrote", path)
    return rows


def inputs(name):
    """The setup's layout and fresh random bf16 q, k, v (requiring grad) and output gradient."""
    B, H, n, D, make, _ = SETUPS[name] if name in SETUPS else EXTRA[name]
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return make(), q, k, v, torch.randn_like(q)


def main(names):
    dev, tv, trv = _versions()
    rows = []
    for name in names:
        lay, q, k, v, go = inputs(name)
        fwd = lambda: sparse_attention(q, k, v, lay, backend="triton")  # noqa: E731
        fb = lambda: fwd().backward(go)  # noqa: E731
        row = dict(setup=name, device=dev, torch=tv, triton=trv)
        for fast in (False, True):
            launcher.FAST = fast
            tag = "fast" if fast else "triton"
            fb()
            row[f"fwd_ms_{tag}"] = med(fwd)
            row[f"fwdbwd_ms_{tag}"] = med(fb)
            row[f"host_fwdbwd_us_{tag}"] = host_us(fb)
        q.grad = k.grad = v.grad = None
        row["graph_fwdbwd_ms"] = graph_ms(fb)
        with torch.no_grad():
            row["graph_fwd_ms"] = graph_ms(fwd)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        row["cudnn_fwd_ms"] = med(dense)
        row["cudnn_fwdbwd_ms"] = med(lambda: dense().backward(go))
        row["kernels_us"] = kernel_times(fb)
        q.grad = k.grad = v.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
        q = k = v = go = None  # free before the next setup allocates
        torch.cuda.empty_cache()
    write_rows(rows, "dev_probe.json")
    print(f"{'setup':12s} {'fb triton':>9s} {'fb fast':>8s} {'host tr':>8s} {'host fast':>9s} {'graph fb':>8s} "
          f"{'graph f':>8s} {'cudnn fb':>8s}")
    for r in rows:
        print(f"{r['setup']:12s} {r['fwdbwd_ms_triton']:9.3f} {r['fwdbwd_ms_fast']:8.3f} "
              f"{r['host_fwdbwd_us_triton']:8.0f} {r['host_fwdbwd_us_fast']:9.0f} {r['graph_fwdbwd_ms']:8.3f} "
              f"{r['graph_fwd_ms']:8.3f} {r['cudnn_fwdbwd_ms']:8.3f}")
        print("   ", " ".join(f"{us}" for _, us in r["kernels_us"]))


def micro():
    """Host time of one forward launch (tiny problem, so the GPU never holds the host back): Triton's path vs ours,
    and the host time of whole fwd+bwd calls of ours and of SDPA at the same tiny size."""
    from sparse_transformer import layouts
    from sparse_transformer.attention.triton import function as fn_mod
    from sparse_transformer.attention.triton.forward import attn_forward

    lay = layouts.strided(256, 16)
    q, k, v = (torch.randn(1, 1, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    o, lse = torch.empty_like(q), torch.empty(1, 1, 256, device="cuda")
    L = fn_mod.get_launches(lay, 64, q.device)[0]
    res = {}
    for fast in (False, True):
        launcher.FAST = fast
        res[f"one_launch_us_{fast}"] = host_us(lambda: attn_forward(q, k, v, o, lse, L, 0.1, False), 1000)
        res[f"fwdbwd_us_{fast}"] = host_us(lambda: sparse_attention(q, k, v, lay, backend="triton").backward(go), 300)
        with torch.no_grad():
            res[f"fwd_nograd_us_{fast}"] = host_us(lambda: sparse_attention(q, k, v, lay, backend="triton"), 300)
    res["sdpa_fwdbwd_us"] = host_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True).backward(go), 300)
    res["empty_like_us"] = host_us(lambda: torch.empty_like(q), 1000)
    from triton import knobs
    res["launch_hook"] = repr(knobs.runtime.launch_enter_hook)
    print("micro", json.dumps(res), flush=True)
    f = lambda: sparse_attention(q, k, v, lay, backend="triton").backward(go)  # noqa: E731
    f()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            f()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return res


# 32x32 (swept 2026-11-30, bench/results/dev-sweep-20261130-tiles.json): the strided setups' tiles compute 1.3x fewer
# entries at 32x32 (bench/tile_efficiency.py).
# CONFIGS="32x128/8/3 128x32/4/3" (BMxBN/warps/stages, as bench/compile_probe.py takes them) replaces the list.
CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2),
           (32, 32, 4, 2), (32, 32, 2, 3)]
if os.environ.get("CONFIGS"):
    CONFIGS = [tuple(int(x) for x in re.split("[x/]", c)) for c in os.environ["CONFIGS"].split()]


def sweep(names):
    """Per-kernel GPU time (median of 5 profiled fwd+bwd, launch order) with every kind and pass on one config."""
    from sparse_transformer.attention.triton import function as fn_mod

    base = {kk: dict(vv) for kk, vv in fn_mod.TUNING.items()}
    rows = []
    for name in names:
        lay, q, k, v, go = inputs(name)
        for cfg in [None] + CONFIGS:
            fn_mod.TUNING.update({kk: dict(vv) for kk, vv in base.items()})
            if cfg is not None:
                for kk in fn_mod.TUNING:
                    # (the rest kept: "split", "fused", and "maxnreg", whose caps hold for their own tile only)
                    fn_mod.TUNING[kk] = dict(base[kk], fwd=cfg, dq=cfg, dkdv=cfg)
            fn_mod.clear_cache()
            try:
                fb = lambda: sparse_attention(q, k, v, lay, backend="triton").backward(go)  # noqa: E731
                names_k, ks = median_kernel_times(fb, 5)
            except Exception as e:
                print(name, cfg, "ERROR", type(e).__name__, str(e)[:200], flush=True)
                continue
            q.grad = k.grad = v.grad = None
            rows.append(dict(setup=name, config=cfg or "current", kernels=names_k, us=ks))
            print(f"{name:12s} {str(cfg or 'current'):18s} " + " ".join(f"{x:7.1f}" for x in ks), flush=True)
        q = k = v = go = None  # free before the next setup allocates
        torch.cuda.empty_cache()
    fn_mod.TUNING.update(base)
    fn_mod.clear_cache()
    write_rows(rows, "dev_sweep.json")


FUSE_CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2),
                (32, 32, 4, 2)]


def fuse(names):
    """For each setup: no kind fused, the current TUNING, then each segment kind in turn fused with each config."""
    from sparse_transformer.attention.triton import function as fn_mod

    base = {kk: dict(vv) for kk, vv in fn_mod.TUNING.items()}
    rows = []
    for name in names:
        lay, q, k, v, go = inputs(name)
        kinds = sorted({seg.kind for seg in fn_mod.get_segments(lay)})
        trials = [("none", None), ("current", None)] + [(kind, cfg) for kind in kinds for cfg in FUSE_CONFIGS]
        for kind, cfg in trials:
            fn_mod.TUNING.update({kk: dict(vv) for kk, vv in base.items()})
            if kind != "current":
                for kk in fn_mod.TUNING:
                    fn_mod.TUNING[kk]["fused"] = None
            if cfg is not None:  # that tiling whatever the chunk length (no fused_ragged)
                fn_mod.TUNING[(kind, 64 if q.shape[-1] <= 64 else 128)].update(fused=cfg, fused_ragged=None)
            fn_mod.clear_cache()
            try:
                fb = lambda: sparse_attention(q, k, v, lay, backend="triton").backward(go)  # noqa: E731
                names_k, ks = median_kernel_times(fb, 3)
                q.grad = k.grad = v.grad = None
                g = graph_ms(fb)
            except Exception as e:
                print(name, kind, cfg, "ERROR", type(e).__name__, str(e)[:300], flush=True)
                continue
            q.grad = k.grad = v.grad = None
            rows.append(dict(setup=name, fused=kind, config=cfg, kernels=names_k, us=ks, graph_ms=g))
            print(f"{name:12s} {str(kind):10s} {str(cfg):18s} graph {g:7.3f} ms | " + " ".join(f"{x:.0f}" for x in ks),
                  flush=True)
        q = k = v = go = None
        torch.cuda.empty_cache()
    fn_mod.TUNING.update(base)
    fn_mod.clear_cache()
    write_rows(rows, "dev_fuse.json")


def order(names):
    """Program order: graph-replayed fwd+bwd and each kernel's GPU time with the default rule (None) and with heads in
    groups of 1 (one head's tiles after another), 2, 4 and all (every head's longest tile first) for every kernel
    (attention/triton/grid.HEAD_GROUP)."""
    from sparse_transformer.attention.triton import grid

    base = grid.HEAD_GROUP
    rows = []
    try:
        for name in names:
            lay, q, k, v, go = inputs(name)
            fb = lambda: sparse_attention(q, k, v, lay, backend="triton").backward(go)  # noqa: E731
            for group in (None, 1, 2, 4, 1 << 20, None):  # None: the default rule, again at the end (drift)
                grid.HEAD_GROUP = group
                names_k, ks = median_kernel_times(fb, 3)
                q.grad = k.grad = v.grad = None
                g = graph_ms(fb)
                q.grad = k.grad = v.grad = None
                rows.append(dict(setup=name, head_group=group and min(group, q.shape[0] * q.shape[1]),
                                 kernels=names_k, us=ks, graph_ms=g))
                print(f"{name:12s} group {str(rows[-1]['head_group']):4s} graph {g:7.3f} ms | "
                      + " ".join(f"{x:.0f}" for x in ks), flush=True)
            q = k = v = go = None
            torch.cuda.empty_cache()
    finally:
        grid.HEAD_GROUP = base
    write_rows(rows, "dev_order.json")


def _variant_times(names, variants, apply):
    """Per setup and variant (apply(variant) sets it up and returns the row's label fields and their text): per-kernel
    GPU time (median of 5 profiled fwd+bwd) and graph-replayed fwd and fwd+bwd, printed; the rows."""
    from sparse_transformer.attention.triton import function as fn_mod

    rows = []
    for name in names:
        lay, q, k, v, go = inputs(name)
        fwd = lambda: sparse_attention(q, k, v, lay, backend="triton")  # noqa: E731
        fb = lambda: fwd().backward(go)  # noqa: E731
        for variant in variants:
            label, text = apply(variant)
            fn_mod.clear_cache()
            names_k, ks = median_kernel_times(fb, 5)
            q.grad = k.grad = v.grad = None
            g_fwd, g_fb = graph_ms(fwd), graph_ms(fb)
            q.grad = k.grad = v.grad = None
            rows.append(dict(setup=name, **label, kernels=names_k, us=ks, graph_fwd_ms=g_fwd, graph_fwdbwd_ms=g_fb))
            print(f"{name:12s} {text} graph fwd {g_fwd:.3f} fwd+bwd {g_fb:.3f} ms | "
                  + " ".join(f"{x:7.1f}" for x in ks), flush=True)
        q = k = v = go = None
        torch.cuda.empty_cache()
    fn_mod.clear_cache()
    return rows


def oneloop(names):
    """forward.ONE_LOOP / backward.ONE_LOOP (full and partial tiles in one loop: ptxas keeps the wgmma asynchronous)
    against the two loops, per setup in the order: the default rule (None: one loop on 2+ stages, common.one_loop),
    split everywhere, forward only, backward only, both, then the default and split again."""
    from sparse_transformer.attention.triton import backward, forward

    def apply(variant):
        forward.ONE_LOOP, backward.ONE_LOOP = variant
        return dict(one_loop_fwd=variant[0], one_loop_bwd=variant[1]), \
            f"one loop fwd={variant[0]!s:5s} bwd={variant[1]!s:5s}"

    was = (forward.ONE_LOOP, backward.ONE_LOOP)
    try:
        rows = _variant_times(names, ((None, None), (False, False), (True, False), (False, True), (True, True),
                                      (None, None), (False, False)), apply)
    finally:
        forward.ONE_LOOP, backward.ONE_LOOP = was
    write_rows(rows, "dev_oneloop.json")


# register caps (registers, BM, BN: the tile they hold for) that compile without spills for sm_90 under Triton 3.6
# (MAXNREG=... python bench/compile_probe.py, 2026-12-01): the band's forward at 96 (from 121-126: 5 programs per SM
# instead of 4), the transposed 64x32 forward at 88 (from 95). "both" is TUNING's default since 2026-12-01.
BAND, TRANSPOSED = {"fwd": (96, 64, 64)}, {"fwd": (88, 64, 32)}
MAXNREG_VARIANTS = {"none": {}, "band fwd 96": {("natural", 64): BAND},
                    "transposed fwd 88": {("transposed", 64): TRANSPOSED},
                    "both": {("natural", 64): BAND, ("transposed", 64): TRANSPOSED}}
if os.environ.get("MAXNREG_BWD") == "1":  # the band's dQ / dK/dV at 96 too, although they spill (136 / 452 bytes)
    MAXNREG_VARIANTS = {"none": {}, "both": MAXNREG_VARIANTS["both"],
                        "both + band dq 96": {("natural", 64): dict(BAND, dq=(96, 64, 64)),
                                              ("transposed", 64): TRANSPOSED},
                        "both + band dkdv 96": {("natural", 64): dict(BAND, dkdv=(96, 32, 64)),
                                                ("transposed", 64): TRANSPOSED}}


def passes(names):
    """Per-pass tile settings against TUNING, in turn and then the defaults again: PASSES="natural128.fwd=64x32/4/3
    natural128.dq=64x32/4/2+natural128.fwd=64x32/4/3 ..." (a variant is "+"-joined kind<d>.<pass>=BMxBN/warps/stages
    settings, "...=64x32/4/3@88" with a register cap of 88 on that tile; a pass set without one runs uncapped)."""
    from sparse_transformer.attention.triton import function as fn_mod

    base = {kk: dict(vv) for kk, vv in fn_mod.TUNING.items()}
    if not os.environ.get("PASSES"):
        sys.exit('passes: set PASSES, e.g. PASSES="natural128.fwd=64x32/4/3 transposed64.fwd=64x32/4/3@88"')
    variants = ["defaults"] + os.environ["PASSES"].split() + ["defaults"]

    def apply(variant):
        fn_mod.TUNING.update({kk: dict(vv) for kk, vv in base.items()})
        for setting in ([] if variant == "defaults" else variant.split("+")):
            where, cfg = setting.split("=")
            kind_d, pss = where.split(".")
            key = (kind_d.rstrip("0123456789"), int(kind_d[len(kind_d.rstrip("0123456789")):]))
            entry = fn_mod.TUNING[key]
            cfg, _, cap = cfg.partition("@")  # "@88": a register cap on that tile
            entry[pss] = tuple(int(x) for x in re.split("[x/]", cfg))
            entry["maxnreg"] = {p: c for p, c in entry.get("maxnreg", {}).items() if p != pss}
            if cap:
                entry["maxnreg"][pss] = (int(cap), *entry[pss][:2])
        return dict(variant=variant), f"{variant:48s}"

    try:
        rows = _variant_times(names, variants, apply)
    finally:
        fn_mod.TUNING.update(base)
        fn_mod.clear_cache()
    write_rows(rows, "dev_passes.json")


def _without_caps(fn_mod, base):
    """TUNING as `base` (a copy), with no register caps."""
    fn_mod.TUNING.update({kk: {p: x for p, x in vv.items() if p != "maxnreg"} for kk, vv in base.items()})


def maxnreg(names):
    """TUNING's per-pass register caps (more programs per SM): per setup, each variant of MAXNREG_VARIANTS, then none
    and both again."""
    from sparse_transformer.attention.triton import function as fn_mod

    base = {kk: dict(vv) for kk, vv in fn_mod.TUNING.items()}

    def apply(variant):  # TUNING without its caps, then the variant's
        _without_caps(fn_mod, base)
        for kk, caps in MAXNREG_VARIANTS[variant].items():
            fn_mod.TUNING[kk]["maxnreg"] = caps
        return dict(variant=variant), f"{variant:18s}"

    try:
        rows = _variant_times(names, list(MAXNREG_VARIANTS) + ["none", "both"], apply)
    finally:
        fn_mod.TUNING.update(base)
        fn_mod.clear_cache()
    write_rows(rows, "dev_maxnreg.json")


def winmask(names):
    """function.WIN_ALONE (a window-only segment's partial tiles as one unsigned compare) on and off, in turn twice,
    with no register caps (off, the band's forward would lose its cap too)."""
    from sparse_transformer.attention.triton import function as fn_mod

    base = {kk: dict(vv) for kk, vv in fn_mod.TUNING.items()}

    def apply(variant):
        fn_mod.WIN_ALONE = variant
        return dict(win_alone=variant), f"unsigned window {variant!s:5s}"

    was = fn_mod.WIN_ALONE
    try:
        _without_caps(fn_mod, base)
        rows = _variant_times(names, (True, False, True, False), apply)
    finally:
        fn_mod.WIN_ALONE = was
        fn_mod.TUNING.update(base)
        fn_mod.clear_cache()
    write_rows(rows, "dev_winmask.json")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["micro"]:
        micro()
    elif args[:1] == ["sweep"]:
        sweep(args[1:] or list(SETUPS))
    elif args[:1] == ["fuse"]:
        fuse(args[1:] or list(SETUPS))
    elif args[:1] == ["oneloop"]:
        oneloop(args[1:] or list(SETUPS))
    elif args[:1] == ["winmask"]:
        winmask(args[1:] or list(SETUPS))
    elif args[:1] == ["maxnreg"]:
        maxnreg(args[1:] or list(SETUPS))
    elif args[:1] == ["passes"]:
        passes(args[1:] or list(SETUPS))
    elif args[:1] == ["order"]:
        order(args[1:] or list(SETUPS))
    else:
        main(args or list(SETUPS))
