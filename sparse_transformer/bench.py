"""Benchmarks against dense attention (SDPA: cuDNN and flash) and FlexAttention, side by side in one process.

`sparse-transformer bench model [--preset enwik8] [--n N ...] [--recompute both|on|off]`: training-step time
(forward + backward + AdamW step, bf16 autocast), tokens/s and peak memory of a preset at each n, with our attention
and with dense SDPA; rows (preset, n, batch, attention, recompute, step_ms, tokens_per_s, peak_mem_gb, params, device)
to bench/results/model-<date>.json, and with several n a log-log plot of time and memory vs n (model-<date>.png).

`sparse-transformer bench max-length --preset NAME [--start N] [--max N] [--dense-scale]`: the longest sequence the
preset trains on (one step, batch 1, recomputation on) on this GPU: doubling from --start until out of memory, then
bisection; `--n N` times one length instead. Rows (preset, n, params, step_s, peak_mem_gb, device, and with
--dense-scale dense_step_s / dense_step_method: one layer's dense SDPA attention fwd+bwd x layers, a lower bound on
the dense step) to bench/results/max-length-<date>.json.

`sparse-transformer bench attention [--setups NAME ...] [--out DIR]`: for each setup of the paper's patterns, times
forward and forward+backward (median of triton.testing.do_bench, random bf16 inputs) of our Triton kernels, dense
causal SDPA (cuDNN, flash), FlexAttention (compiled, the layout's element rule, default 128 blocks) and our torch
backend; prints a table and writes JSON rows (setup, method, n, batch, heads, head_dim, pattern, fwd_ms, fwdbwd_ms,
density, device, torch, triton) to bench/results/attention-<date>.json. For ours and SDPA the rows also hold
fwd_graph_ms / fwdbwd_graph_ms: the same calls replayed from a CUDA graph, i.e. GPU time without the host's launch
cost (which decides the eager times of the short setups). Our rows say whether graph replay of our launches was on
(`graphs`: attention/triton/replay.py, on by default), and of the eager calls' directions how many took its path
(`attention_calls`) and how many replayed (`graph_replays`); every row has the GPU's SM clock and temperature read right
after its timings (`sm_mhz`, `temp_c`; where pynvml is installed): compute-bound setups run at a power-limited clock.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from . import layouts

# name: (batch, heads, n, head_dim, layout factory, pattern label)
SETUPS = {
    "fixed-12k": (2, 8, 12288, 64, lambda: layouts.fixed(12288, 128, 32), "fixed-l128-c32"),
    "strided-12k": (2, 8, 12288, 64, lambda: layouts.strided(12288, 128), "strided-l128-merged"),
    "strided-3k": (8, 2, 3072, 128, lambda: layouts.strided(3072, 96), "strided-l96-merged"),
    "fixed-64k": (1, 8, 65536, 64, lambda: layouts.fixed(65536, 256, 32), "fixed-l256-c32"),
    "strided-64k": (1, 8, 65536, 64, lambda: layouts.strided(65536, 256), "strided-l256-merged"),
}
METHODS = ("triton", "sdpa-cudnn", "sdpa-flash", "flex", "torch")


def _versions():
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return dev, torch.__version__, tv


def _gluon_launches() -> int:
    """Gluon kernels launched so far (0 where this Triton does not run them): which kernels a `triton` row ran."""
    from .attention.triton.forward import gluon_module

    module = gluon_module()
    return module.LAUNCHES if module is not None else 0


def _time(fn, go=None):
    import triton.testing as tt

    fwd = tt.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def fb():
        fn().backward(go)

    fwdbwd = tt.do_bench(fb, warmup=25, rep=200, return_mode="median")
    return fwd, fwdbwd


def kernel_times(f, reps=5, width=28):
    """[(kernel name cut to `width`, profiler median of `reps` in us)] of each CUDA kernel one f() launches, in launch
    order (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    f()
    torch.cuda.synchronize()
    runs = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f()
            torch.cuda.synchronize()
        ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
        runs.append([(e.name[:width], e.time_range.elapsed_us()) for e in ev])
    return [(name, sorted(r[i][1] for r in runs)[reps // 2]) for i, (name, _) in enumerate(runs[0])]


GRAPH_METHODS = ("triton", "sdpa-cudnn", "sdpa-flash")


def capture_graph(fn, mode="global"):
    """fn() captured in a CUDA graph, after 3 warm-up calls on a side stream (tables, compiled kernels and allocator
    pools are made outside the capture). mode: torch.cuda.graph's capture_error_mode."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode=mode):
        fn()
    return g


def graph_ms(fn) -> float:
    """Median ms of CUDA-graph replays of fn(): GPU time without the host's launch cost."""
    import triton.testing as tt

    return tt.do_bench(capture_graph(fn).replay, warmup=25, rep=200, return_mode="median")


def _time_graph(fn, go):
    """graph_ms of fn() and of fn().backward(go)."""
    return graph_ms(fn), graph_ms(lambda: fn().backward(go))


def _method_fn(method, q, k, v, lay, flex_cache):
    from .attention import sparse_attention

    if method == "triton":
        return lambda: sparse_attention(q, k, v, lay, backend="triton")
    if method == "torch":
        return lambda: sparse_attention(q, k, v, lay, backend="torch")
    if method.startswith("sdpa"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = SDPBackend.CUDNN_ATTENTION if method == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION

        def f():
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return f
    if method == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if "fn" not in flex_cache:
            flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
        bm = lay.to_block_mask(None, None if lay.num_heads == 1 else q.shape[1], device=q.device)
        return lambda: flex_cache["fn"](q, k, v, block_mask=bm)
    raise ValueError(method)


def replay_counts(before=None) -> dict:
    """The graph replay of our launches (attention/triton/replay.py): with before=None the counters now, else what
    happened since `before`: whether replay is on (`graphs`), the calls' directions that took its path
    (`attention_calls`) and those that replayed (`graph_replays`). {} without Triton."""
    try:
        from .attention.triton import replay
    except ImportError:
        return {}
    now = dict(attention_calls=replay.CALLS, graph_replays=replay.REPLAYS)
    if before is None:
        return now
    return dict(graphs=replay.ENABLED, **{k: now[k] - before.get(k, 0) for k in now})


def gpu_state() -> dict:
    """The GPU's SM clock (MHz) and temperature (C) now, through torch.cuda (pynvml); {} where it cannot say."""
    try:
        return dict(sm_mhz=torch.cuda.clock_rate(), temp_c=torch.cuda.temperature())
    except Exception:  # noqa: BLE001 (no pynvml, or a driver without these counters)
        return {}


def bench_attention(setups, methods=METHODS, out_dir="bench/results", torch_max_n=16384):
    dev, tv, trv = _versions()
    rows = []
    flex_cache: dict = {}
    for name in setups:
        B, H, n, D, make, pattern = SETUPS[name]
        lay = make()
        dens = lay.density()
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16)
        for method in methods:
            row = dict(setup=name, method=method, n=n, batch=B, heads=H, head_dim=D, pattern=pattern if method in
                       ("triton", "torch", "flex") else "causal-dense", density=dens if method in
                       ("triton", "torch", "flex") else 0.5 * (n + 1) / n, device=dev, torch=tv, triton=trv)
            if method == "torch" and n > torch_max_n:
                row["error"] = f"skipped: n > {torch_max_n} (the torch backend is the CPU fallback)"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            try:
                t0 = time.time()
                fn = _method_fn(method, q, k, v, lay, flex_cache)
                launched = _gluon_launches()
                fn().backward(go)  # compile / build tables outside the timing
                torch.cuda.synchronize()
                if method == "triton":  # the fixed pattern's summary part runs Gluon kernels on Hopper
                    row["gluon"] = _gluon_launches() > launched
                row["setup_s"] = round(time.time() - t0, 2)
                before = replay_counts()
                row["fwd_ms"], row["fwdbwd_ms"] = _time(fn, go)
                if method == "triton":  # our eager calls' launches replayed from graphs (replay.py), and how often
                    row.update(replay_counts(before))
                if method in GRAPH_METHODS:  # GPU time alone: the same calls replayed from a CUDA graph
                    row["fwd_graph_ms"], row["fwdbwd_graph_ms"] = _time_graph(fn, go)
                row.update(gpu_state())
            except Exception as e:  # a peer that fails to compile is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            q.grad = k.grad = v.grad = None
        del q, k, v, go
        torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(out_dir, f"attention-{stamp}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(format_table(rows))
    print(f"wrote {path}")
    return rows


def format_table(rows):
    lines = [f"{'setup':12s} {'method':11s} {'pattern':22s} {'dens':>6s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} "
             f"{'vs cuDNN':>8s} {'vs flex':>8s} {'graph fwd':>9s} {'graph f+b':>9s} {'vs cuDNN':>8s}"]
    ref = {(r["setup"], r["method"]): r for r in rows}
    for r in rows:
        if "fwdbwd_ms" not in r:
            lines.append(f"{r['setup']:12s} {r['method']:11s} {r['pattern']:22s} {'':>6s} {r.get('error', '')[:60]}")
            continue
        cud = ref.get((r["setup"], "sdpa-cudnn"), {}).get("fwdbwd_ms")
        flx = ref.get((r["setup"], "flex"), {}).get("fwdbwd_ms")
        ratio = lambda x: f"{x / r['fwdbwd_ms']:7.2f}x" if x else "      -"  # noqa: E731
        g = r.get("fwdbwd_graph_ms")
        gcud = ref.get((r["setup"], "sdpa-cudnn"), {}).get("fwdbwd_graph_ms")
        graph = f" {r['fwd_graph_ms']:9.3f} {g:9.3f} {gcud / g:7.2f}x" if g and gcud else ""
        lines.append(f"{r['setup']:12s} {r['method']:11s} {r['pattern']:22s} {r['density']:6.3f} {r['fwd_ms']:8.3f} "
                     f"{r['fwdbwd_ms']:10.3f} {ratio(cud)} {ratio(flx)}{graph}")
    return "\n".join(lines)


# ---- model training step ---------------------------------------------------------------------------------------------
def make_train_step(model, opt, x):
    """One training step as the benchmarks time it: loss (bf16 autocast on CUDA), backward, optimizer step."""

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            loss = model.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def model_config(preset, n, exact=False, **overrides):
    """The preset's config for sequences of length n. exact=False keeps the preset's n_ctx when n fits (the same model
    at every n of a sweep); exact=True, or n > n_ctx, sets n_ctx = n (an image preset then gets "stride" position
    embeddings: its raster fixes its length)."""
    from . import load_preset

    cfg = load_preset(preset, **overrides)
    if n == cfg.n_ctx or (n < cfg.n_ctx and not exact):
        return cfg
    extra = dict(pos_emb="stride") if cfg.pos_emb == "image" else {}
    return load_preset(preset, **{**overrides, "n_ctx": n, **extra})


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_train_step(cfg, n, batch=1, steps=5, device="cuda", compile=False):
    """Build the model on `device`, run one untimed step (tables, kernels, optimizer state), then `steps` timed steps.

    Returns dict(step_ms (median), tokens_per_s, peak_mem_gb (CUDA: peak allocated over the timed steps, weights and
    optimizer state included; None on CPU), params, setup_s, and over the timed steps our attention's calls through
    graph replay and how many replayed (replay_counts), and the replays of each timed step (graph_replays_per_step)).
    Raises torch.OutOfMemoryError like the step does.
    compile: torch.compile each block, as `train --set train.compile=true` does (the compile time is in setup_s)."""
    from . import SparseTransformer

    device = torch.device(device)
    cuda = device.type == "cuda"
    t_setup = time.perf_counter()
    torch.manual_seed(0)
    model = SparseTransformer(cfg).to(device)
    if compile:
        for block in model.blocks:
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randint(0, 256, (batch, n), device=device)
    step = make_train_step(model, opt, x)
    step()  # build tables / compile kernels / allocate optimizer state outside the timing
    _sync(device)
    setup_s = time.perf_counter() - t_setup
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, replays, per_step = [], replay_counts(), []
    for _ in range(steps):
        before = replay_counts()
        if cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            step()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        per_step.append(replay_counts(before).get("graph_replays"))
    ms = sorted(times)[len(times) // 2]
    return dict(step_ms=ms, tokens_per_s=batch * n / ms * 1e3,
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                params=model.num_params(), setup_s=round(setup_s, 2), **replay_counts(replays),
                **({"graph_replays_per_step": per_step} if per_step and per_step[0] is not None else {}))


def is_oom(e: BaseException) -> bool:
    """Out of device memory, from the caching allocator or from a library that allocates its own (cuBLAS, cuDNN)."""
    return isinstance(e, torch.OutOfMemoryError) or any(
        s in str(e) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(preset, ns=None, batch=1, attentions=("ours", "dense"), recompute=(True, False), steps=5,
                out_dir="bench/results", dense_max_n=262144, plot=True, device="cuda", compile=False):
    """Training-step time (forward + backward + AdamW step, bf16 autocast), tokens/s and peak memory of a preset at
    each n of `ns` (default: its n_ctx), with our attention and with dense SDPA, side by side in one process. Dense rows
    above dense_max_n are skipped (their step grows as n^2). Writes bench/results/model-<date>.json, and with several
    n a plot model-<date>.png. Returns the rows."""
    from . import load_preset

    dev, tv, trv = _versions()
    ns = list(ns or [load_preset(preset).n_ctx])
    rows = []
    for n in ns:
        for attention in attentions:
            for rc in recompute:
                row = dict(preset=preset, n=n, batch=batch, attention=attention, recompute=rc, device=dev, torch=tv,
                           triton=trv, compile=compile)
                if attention == "dense" and dense_max_n and n > dense_max_n:
                    row["error"] = f"skipped: n > --dense-max-n={dense_max_n} (the dense step grows as n^2)"
                else:
                    try:
                        cfg = model_config(preset, n, recompute=rc, dropout=0.0,
                                           backend="dense" if attention == "dense" else "auto")
                        row.update(time_train_step(cfg, n, batch, steps, device, compile))
                    except Exception as e:  # an OOM or a failing setup is a result, not a crash
                        row["error"] = ("OOM: " if is_oom(e) else f"{type(e).__name__}: ") + str(e)[:300]
                    free_memory()
                rows.append(row)
                print(json.dumps(row), flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = _write_json(rows, out_dir, f"model-{stamp}.json")
    print(format_model_table(rows))
    print(f"wrote {path}")
    if plot and len(set(ns)) > 1:
        png = plot_model(rows, os.path.join(out_dir, f"model-{stamp}.png"))
        if png:
            print(f"wrote {png}")
    return rows


def _write_json(rows, out_dir, name):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return path


def format_model_table(rows):
    lines = [f"{'preset':11s} {'n':>8s} {'B':>2s} {'attention':9s} {'recompute':9s} {'step ms':>10s} {'tok/s':>10s} "
             f"{'peak GB':>8s} {'vs dense':>8s}"]
    dense = {(r["n"], r["batch"], r["recompute"]): r["step_ms"] for r in rows
             if r["attention"] == "dense" and "step_ms" in r}
    for r in rows:
        lead = (f"{r['preset']:11s} {r['n']:8d} {r['batch']:2d} {r['attention']:9s} {str(r['recompute']):9s} ")
        if "step_ms" not in r:
            lines.append(lead + r["error"][:70])
            continue
        d = dense.get((r["n"], r["batch"], r["recompute"]))
        mem = f"{r['peak_mem_gb']:8.2f}" if r["peak_mem_gb"] is not None else f"{'-':>8s}"
        ratio = f"{d / r['step_ms']:7.2f}x" if d and r["attention"] != "dense" else f"{'':8s}"
        lines.append(lead + f"{r['step_ms']:10.1f} {r['tokens_per_s']:10.0f} {mem} {ratio}")
    return "\n".join(lines)


def plot_model(rows, path):
    """Step time and peak memory vs n, log-log, one line per (attention, recompute); guides n^2 and n sqrt(n) on the
    time panel and n on the memory panel, anchored at the first (smallest-n) point of our attention. Returns the path,
    or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)")
        return None
    import numpy as np

    ok = [r for r in rows if "step_ms" in r]
    if not ok:
        print("no plot: no successful rows")
        return None
    series: dict = {}
    for r in sorted(ok, key=lambda r: r["n"]):
        series.setdefault((r["attention"], r["recompute"]), []).append(r)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"ours": "tab:blue", "dense": "tab:red"}
    for (att, rc), pts in series.items():
        ns = [p["n"] for p in pts]
        label = f"{'ours' if att == 'ours' else 'dense (SDPA)'}{', recompute' if rc else ''}"
        style = dict(color=colors.get(att), marker="o", linestyle="-" if rc else "--", label=label)
        ax_t.loglog(ns, [p["step_ms"] / 1e3 for p in pts], **style)
        if pts[0]["peak_mem_gb"] is not None:
            ax_m.loglog(ns, [p["peak_mem_gb"] for p in pts], **style)
    anchor = next((pts for (att, _), pts in series.items() if att == "ours"), next(iter(series.values())))
    n0, lo_n, hi_n = anchor[0]["n"], min(r["n"] for r in ok), max(r["n"] for r in ok)
    grid = np.geomspace(lo_n, hi_n, 50)
    t0 = anchor[0]["step_ms"] / 1e3
    ax_t.loglog(grid, t0 * (grid / n0) ** 2, "k:", lw=1, label="~ n^2")
    ax_t.loglog(grid, t0 * (grid / n0) ** 1.5, "k-.", lw=1, label="~ n sqrt(n)")
    if anchor[0]["peak_mem_gb"] is not None:
        ax_m.loglog(grid, anchor[0]["peak_mem_gb"] * grid / n0, "k-.", lw=1, label="~ n")
    r0 = ok[0]
    for ax, what in ((ax_t, "training step (s)"), (ax_m, "peak GPU memory (GB)")):
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data (CPU run)", ha="center", transform=ax.transAxes)
    precision = "fp32" if r0["device"] == "cpu" else "bf16 autocast"
    fig.suptitle(f"{r0['preset']}, batch {r0['batch']}: training step (fwd + bwd + AdamW, {precision}), "
                 f"{r0['device']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- longest trainable sequence --------------------------------------------------------------------------------------
def length_granularity(cfg) -> int:
    """Search lengths are multiples of the stride (whole rows of the pattern) and of 128 (whole kernel tiles)."""
    return math.lcm(cfg.stride, 128)


def search_max_length(trains, start, max_n, granularity, tolerance=0.0, budget_s=None, clock=time.monotonic):
    """The largest n (a multiple of `granularity`, <= max_n) for which trains(n) succeeds, assuming success is
    monotone in n. trains(n) returns a result dict (with "wall_s", the try's wall time) or None when n does not fit.

    Doubles from `start` until a failure (halves instead if `start` fails), then bisects until the gap between the
    largest success and the smallest failure is <= max(granularity, tolerance * success). With budget_s, stops before
    a try that would (at an n^1.5 extrapolation of the last success) end past the budget; the answer is then a lower
    bound. Returns (n or None, result or None, log: [(n, ok, wall_s)], stop_reason)."""
    t_start = clock()
    g = granularity
    up = lambda m: -(-m // g) * g  # noqa: E731
    start, max_n = up(max(start, g)), max(g, (max_n // g) * g)
    start = min(start, max_n)
    best_n = best = fail_n = None
    log = []

    def attempt(n):
        nonlocal best_n, best, fail_n
        r = trains(n)
        log.append((n, r is not None, r.get("wall_s") if r else None))
        if r is not None and (best_n is None or n > best_n):
            best_n, best = n, r
        if r is None and (fail_n is None or n < fail_n):
            fail_n = n
        return r is not None

    def affordable(n):
        if budget_s is None or best is None or not best.get("wall_s"):
            return True
        guess = best["wall_s"] * (n / best_n) ** 1.5
        return clock() - t_start + guess <= budget_s

    n = start
    if attempt(n):
        while fail_n is None:
            if n >= max_n:
                return best_n, best, log, f"reached --max {max_n}"
            n = min(2 * n, max_n)
            if not affordable(n):
                return best_n, best, log, "time budget (a lower bound: longer n may fit)"
            attempt(n)
    else:
        while best_n is None and n > g:
            n = max(g, (n // 2 // g) * g)
            attempt(n)
        if best_n is None:
            return None, None, log, f"even n={g} does not fit"
    while fail_n - best_n > max(g, tolerance * best_n):
        mid = ((best_n + fail_n) // 2 // g) * g
        if mid <= best_n:
            break
        if not affordable(mid):
            return best_n, best, log, f"time budget (between {best_n} and {fail_n})"
        attempt(mid)
    return best_n, best, log, f"out of memory at {fail_n}"


def time_dense_attention(n, heads, head_dim, batch=1, reps=2, device="cuda", dtype=torch.bfloat16):
    """Seconds of one causal SDPA forward + backward (PyTorch's default SDPA choice, as the model's dense backend) at
    [batch, heads, n, head_dim]: median of `reps` after one untimed call."""
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    go = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)
        q.grad = k.grad = v.grad = None

    return median_wall_s(fwd_bwd, reps, device)


def median_wall_s(fn, reps, device="cpu"):
    """Median wall seconds of `reps` calls of fn after one untimed call (the device synchronized around each)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


DENSE_METHOD = "one-layer attention x layers"
DENSE_NOTE = ("dense causal SDPA forward + backward of one layer's attention (bf16, batch 1, the preset's heads and "
              "head dim) times the number of layers: attention only, no projections, MLP, loss or recomputed forward, "
              "so a lower bound on the dense model's step")


def bench_max_length(preset, start=None, max_n=1 << 24, n=None, dense_scale=False, steps=3, tolerance=0.02,
                     budget_s=480.0, out_dir="bench/results", device="cuda"):
    """The longest sequence `preset` trains on (batch 1, recompute on, dropout 0, bf16 autocast, AdamW) on this GPU,
    or with `n` the step at that one length. Writes bench/results/max-length-<date>.json and returns the row."""
    from . import load_preset

    dev, tv, trv = _versions()
    base = load_preset(preset)
    g = length_granularity(base)

    def trains(m):
        t0 = time.perf_counter()
        try:
            cfg = model_config(preset, m, exact=True, recompute=True, dropout=0.0, backend="auto")
            r = time_train_step(cfg, m, 1, steps, device)
        except Exception as e:
            if not is_oom(e):
                raise
            r = None
            print(f"n={m}: out of memory ({str(e).splitlines()[0][:100]})", flush=True)
        free_memory()
        if r is not None:
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"n={m}: step {r['step_ms'] / 1e3:.3f} s, peak {r['peak_mem_gb'] or 0:.2f} GB, "
                  f"try {r['wall_s']} s", flush=True)
        return r

    if n is not None:
        r = trains(n)
        best_n, log, reason = (n if r else None), [(n, r is not None, r and r["wall_s"])], "one given n"
    else:
        best_n, r, log, reason = search_max_length(trains, start or base.n_ctx, max_n, g, tolerance, budget_s)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    row = dict(preset=preset, n=best_n, params=r and r["params"], step_s=r and r["step_ms"] / 1e3,
               peak_mem_gb=r and r["peak_mem_gb"], tokens_per_s=r and r["tokens_per_s"], device=dev, gpu_mem_gb=total,
               n_layer=base.n_layer, n_head=base.n_head, d_model=base.d_model, steps=steps,
               setup_s=r and r["setup_s"], search=dict(tried=log, stop=reason, granularity=g), torch=tv, triton=trv)
    if n is None and best_n is None:
        row["error"] = reason
    if dense_scale and best_n:
        head_dim = base.d_model // base.n_head  # the model pads q, k to the value width
        try:
            layer_s = time_dense_attention(best_n, base.n_head, head_dim, 1, device=device)
            row.update(dense_layer_fwdbwd_s=layer_s, dense_step_s=layer_s * base.n_layer,
                       dense_step_method=DENSE_METHOD, dense_note=DENSE_NOTE,
                       speedup_vs_dense=layer_s * base.n_layer / row["step_s"])
        except Exception as e:
            row["dense_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        free_memory()
    path = _write_json([row], out_dir, f"max-length-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    print(format_max_length_table([row]))
    print(f"wrote {path}")
    return row


def format_max_length_table(rows):
    lines = [f"{'preset':11s} {'n':>9s} {'params':>8s} {'step s':>8s} {'peak GB':>8s} {'dense s*':>9s} "
             f"{'dense/ours':>10s}  stop"]
    for r in rows:
        if not r["n"]:
            lines.append(f"{r['preset']:11s} {'-':>9s}  {r.get('error', '')}")
            continue
        dense = r.get("dense_step_s")
        lines.append(f"{r['preset']:11s} {r['n']:9d} {r['params'] / 1e6:7.2f}M {r['step_s']:8.3f} "
                     f"{r['peak_mem_gb'] or 0:8.2f} " + (f"{dense:9.2f} {dense / r['step_s']:9.1f}x" if dense else
                                                         f"{'-':>9s} {'-':>10s}") + f"  {r['search']['stop']}")
    if any(r.get("dense_step_s") for r in rows):
        lines.append(f"* dense: {DENSE_METHOD} ({DENSE_NOTE})")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention", help="our kernels vs SDPA (cuDNN, flash) and FlexAttention on the paper's patterns")
    a.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS), help="which setups to run")
    a.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which methods to time")
    a.add_argument("--out", default="bench/results", help="folder for the JSON results")
    m = sub.add_parser("model", help="training-step time and peak memory of a preset, ours vs dense attention")
    m.add_argument("--preset", default="enwik8", help="preset name")
    m.add_argument("--n", type=int, nargs="+", default=None,
                   help="sequence length(s); several make a sweep with a plot (default: the preset's n_ctx)")
    m.add_argument("--batch", type=int, default=1, help="sequences per step")
    m.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    m.add_argument("--attention", nargs="+", default=["ours", "dense"], choices=["ours", "dense"],
                   help="which attention to run")
    m.add_argument("--recompute", default="both", choices=["both", "on", "off"],
                   help="recomputation of each block in the backward: both = each n with and without")
    m.add_argument("--dense-max-n", type=int, default=262144, help="skip dense attention above this n (0: never)")
    m.add_argument("--no-plot", action="store_true", help="do not write the PNG plot of a sweep")
    m.add_argument("--compile", action="store_true", help="torch.compile each block (as train.compile does)")
    m.add_argument("--out", default="bench/results", help="folder for the JSON results and the plot")
    x = sub.add_parser("max-length", help="the longest sequence a preset trains on (batch 1, recompute on)")
    x.add_argument("--preset", default="audio-1m", help="preset name")
    x.add_argument("--n", type=int, default=None, help="time this one length instead of searching")
    x.add_argument("--start", type=int, default=None, help="first length of the doubling (default: the preset's n_ctx)")
    x.add_argument("--max", type=int, default=1 << 24, help="longest length to try")
    x.add_argument("--steps", type=int, default=3, help="timed steps per length (median reported)")
    x.add_argument("--tolerance", type=float, default=0.02,
                   help="stop bisecting when the gap is below this fraction of n (0: down to the granularity)")
    x.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds for the search; stops early with a lower bound (0: no budget)")
    x.add_argument("--dense-scale", action="store_true",
                   help="also time one layer's dense SDPA attention fwd+bwd at the final n, times the layers")
    x.add_argument("--out", default="bench/results", help="folder for the JSON results")
    d = sub.add_parser("decode", help="one cached decode step, ours vs a dense KV-cache step (SDPA); or --images: "
                       "time to sample whole sequences")
    d.add_argument("--preset", default="audio-65k", help="model preset (its shape; weights are random)")
    d.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536], help="cache lengths")
    d.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="sequences decoded together")
    d.add_argument("--images", type=int, default=0, help="instead: time sampling this many whole sequences")
    d.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: eager torch path, no CUDA graph")
    d.add_argument("--compile", action="store_true",
                   help="also time the CUDA-graph step with its blocks through torch.compile (and sample with it)")
    d.add_argument("--out", default="bench/results", help="folder for the JSON results")


def main(args) -> int:
    if not torch.cuda.is_available() and getattr(args, "device", "cuda") != "cpu":
        print("bench needs a CUDA GPU (it times GPU kernels and training steps against dense SDPA)")
        return 2
    if args.what == "model":
        rc = {"both": (True, False), "on": (True,), "off": (False,)}[args.recompute]
        bench_model(args.preset, args.n, args.batch, tuple(args.attention), rc, args.steps, args.out,
                    args.dense_max_n, plot=not args.no_plot, compile=args.compile)
    elif args.what == "decode":
        from .bench_decode import bench_decode, bench_sampling

        if args.images:
            bench_sampling(args.preset, args.images, args.out, args.device, args.compile)
        else:
            bench_decode(args.preset, args.contexts, args.batch, args.out, args.device, args.compile)
    elif args.what == "max-length":
        bench_max_length(args.preset, args.start, args.max, args.n, args.dense_scale, args.steps, args.tolerance,
                         args.time_budget or None, args.out)
    else:
        bench_attention(args.setups, args.methods, args.out)
    return 0
