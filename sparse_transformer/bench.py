"""Benchmarks against dense attention (SDPA: cuDNN and flash) and FlexAttention, side by side in one process.

`sparse-transformer bench model [--preset enwik8]`: training-step time, tokens/s and peak memory of a preset with our
attention and with dense SDPA, each with and without recomputation; JSON to bench/results/model-<date>.json.

`sparse-transformer bench attention [--setups NAME ...] [--out DIR]`: for each setup of the paper's patterns, times
forward and forward+backward (median of triton.testing.do_bench, random bf16 inputs) of our Triton kernels, dense
causal SDPA (cuDNN, flash), FlexAttention (compiled, the layout's element rule, default 128 blocks) and our torch
backend; prints a table and writes JSON rows (setup, method, n, batch, heads, head_dim, pattern, fwd_ms, fwdbwd_ms,
density, device, torch, triton) to bench/results/attention-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
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


def _time(fn, go=None):
    import triton.testing as tt

    fwd = tt.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def fb():
        fn().backward(go)

    fwdbwd = tt.do_bench(fb, warmup=25, rep=200, return_mode="median")
    return fwd, fwdbwd


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
                fn().backward(go)  # compile / build tables outside the timing
                torch.cuda.synchronize()
                row["setup_s"] = round(time.time() - t0, 2)
                row["fwd_ms"], row["fwdbwd_ms"] = _time(fn, go)
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
             f"{'vs cuDNN':>8s} {'vs flex':>8s}"]
    ref = {(r["setup"], r["method"]): r for r in rows}
    for r in rows:
        if "fwdbwd_ms" not in r:
            lines.append(f"{r['setup']:12s} {r['method']:11s} {r['pattern']:22s} {'':>6s} {r.get('error', '')[:60]}")
            continue
        cud = ref.get((r["setup"], "sdpa-cudnn"), {}).get("fwdbwd_ms")
        flx = ref.get((r["setup"], "flex"), {}).get("fwdbwd_ms")
        ratio = lambda x: f"{x / r['fwdbwd_ms']:7.2f}x" if x else "      -"  # noqa: E731
        lines.append(f"{r['setup']:12s} {r['method']:11s} {r['pattern']:22s} {r['density']:6.3f} {r['fwd_ms']:8.3f} "
                     f"{r['fwdbwd_ms']:10.3f} {ratio(cud)} {ratio(flx)}")
    return "\n".join(lines)


def make_train_step(model, opt, x):
    """One training step as the benchmarks time it: bf16 autocast loss, backward, optimizer step."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bench_model(preset, n=None, batch=1, attentions=("ours", "dense"), recompute=(True, False), steps=5,
                out_dir="bench/results"):
    """Training-step time (forward + backward + AdamW step, bf16 autocast), tokens/s and peak memory of a preset,
    with our attention and with dense SDPA, side by side in one process. Writes bench/results/model-<date>.json."""
    from . import SparseTransformer, load_preset

    dev, tv, trv = _versions()
    rows = []
    for attention in attentions:
        for rc in recompute:
            cfg = load_preset(preset, **({"n_ctx": n} if n else {}), recompute=rc, dropout=0.0,
                              backend="dense" if attention == "dense" else "auto")
            row = dict(preset=preset, n=cfg.n_ctx, batch=batch, attention=attention, recompute=rc, device=dev,
                       torch=tv, triton=trv)
            try:
                torch.manual_seed(0)
                model = SparseTransformer(cfg).cuda()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                x = torch.randint(0, 256, (batch, cfg.n_ctx), device="cuda")

                step = make_train_step(model, opt, x)
                step()  # build tables / compile kernels outside the timing
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(steps):
                    t0 = torch.cuda.Event(enable_timing=True)
                    t1 = torch.cuda.Event(enable_timing=True)
                    t0.record()
                    step()
                    t1.record()
                    torch.cuda.synchronize()
                    times.append(t0.elapsed_time(t1))
                times.sort()
                row.update(step_ms=times[len(times) // 2], tokens_per_s=batch * cfg.n_ctx / times[len(times) // 2] * 1e3,
                           peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30, params=model.num_params())
            except torch.OutOfMemoryError as e:
                row["error"] = f"OOM: {str(e)[:120]}"
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
            model = opt = None
            torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"model-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'preset':10s} {'n':>6s} {'B':>2s} {'attention':9s} {'recompute':9s} {'step ms':>9s} {'tok/s':>9s} "
          f"{'peak GB':>8s}")
    for r in rows:
        if "step_ms" in r:
            print(f"{r['preset']:10s} {r['n']:6d} {r['batch']:2d} {r['attention']:9s} {str(r['recompute']):9s} "
                  f"{r['step_ms']:9.1f} {r['tokens_per_s']:9.0f} {r['peak_mem_gb']:8.2f}")
        else:
            print(f"{r['preset']:10s} {r['n']:6d} {r['batch']:2d} {r['attention']:9s} {str(r['recompute']):9s} "
                  f"{r['error'][:60]}")
    print(f"wrote {path}")
    return rows


def add_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attention", help="our kernels vs SDPA (cuDNN, flash) and FlexAttention on the paper's patterns")
    a.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS), help="which setups to run")
    a.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which methods to time")
    a.add_argument("--out", default="bench/results", help="folder for the JSON results")
    m = sub.add_parser("model", help="training-step time and peak memory of a preset, ours vs dense attention")
    m.add_argument("--preset", default="enwik8", help="preset name")
    m.add_argument("--n", type=int, default=None, help="sequence length (default: the preset's n_ctx)")
    m.add_argument("--batch", type=int, default=1, help="sequences per step")
    m.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    m.add_argument("--out", default="bench/results", help="folder for the JSON results")


def main(args) -> int:
    if not torch.cuda.is_available():
        print("bench attention needs a CUDA GPU (it times GPU kernels against cuDNN and FlexAttention)")
        return 2
    if args.what == "model":
        bench_model(args.preset, args.n, args.batch, steps=args.steps, out_dir=args.out)
    else:
        bench_attention(args.setups, args.methods, args.out)
    return 0
