"""Decode benchmarks (GPU): one cached decode step of a preset's model, ours against a dense KV-cache step (SDPA).

`sparse-transformer bench decode [--preset audio-65k] [--contexts 4096 16384 65536] [--batch 1 4]` (wired in
bench.py): the time of one decode step (all layers, the logits included) at the last position of a cache of each
context length, for our attention (the layout's row only) and for the same model with dense attention (SDPA over every
cached row), each eager and replayed from a CUDA graph (decoding.DecodeStepper, as generate() runs it), and with
--compile also replayed with the blocks through torch.compile (mode "cuda-graph+compile"). The model runs
in bf16 with random weights, the caches hold random values. Median of triton.testing.do_bench. JSON rows (preset, context, batch, attention, mode, step_ms, keys_per_query, device, torch,
triton) to bench/results/decode-<date>.json.

`--images N` instead times sampling N whole sequences of the preset (e.g. 64 CIFAR-10 images with the cifar10 preset),
from an empty prefix, with generate() as a user calls it.
"""
from __future__ import annotations

import datetime
import time

import torch

from .model import SparseTransformer
from .presets import load_preset


def _model(preset: str, attention: str, n_ctx: int | None = None, device: str = "cuda") -> SparseTransformer:
    """The preset's model with random weights, n_ctx >= the longest context (an image preset longer than its raster
    gets "stride" position embeddings, as bench model does): bf16 on CUDA (how one samples), fp32 on CPU."""
    from .bench import model_config

    overrides = dict(dropout=0.0, backend="dense" if attention == "dense" else "auto")
    cfg = model_config(preset, n_ctx, **overrides) if n_ctx else load_preset(preset, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = SparseTransformer(cfg)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.02)  # zero at init: give the logits some spread
    return model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()


def _keys_per_query(model: SparseTransformer, pos: int) -> float:
    from .attention.decode import row_keys

    lays = model.layer_layouts(model.cfg.n_ctx)
    if model.cfg.backend == "dense":
        return float(pos + 1)
    return sum(len(row_keys(lay, h, pos)) for lay in lays for h in range(model.cfg.n_head)) / (
        len(lays) * model.cfg.n_head)


@torch.no_grad()
def time_step(model: SparseTransformer, batch: int, context: int, graph: bool, compile: bool = False) -> float:
    """Median ms of one decode step at position context - 1 over a cache of `context` random rows (CUDA: do_bench;
    CPU: eager only, a plain median of wall times)."""
    from .decoding import DecodeStepper

    device = model.head.weight.device
    step = DecodeStepper(model, batch, context, device, cuda_graph=graph, compile=compile)
    for t in step.cache.k + step.cache.v:
        t.normal_()
    prev = torch.randint(0, 256, (batch,), device=device)
    run = lambda: step(prev, context - 1)  # noqa: E731
    if device.type != "cuda":
        from .bench import median_wall_s

        return 1e3 * median_wall_s(run, 5)
    import triton.testing as tt

    return tt.do_bench(run, warmup=25, rep=200, return_mode="median")


def bench_decode(preset, contexts, batches, out_dir="bench/results", device="cuda", compile=False):
    """Rows of decode-step times, ours and dense, at each context and batch (CUDA: eager and CUDA graph, and with
    compile the CUDA graph of the compiled step)."""
    from .bench import _versions

    dev, tv, trv = _versions()
    rows = []
    for attention in ("ours", "dense"):
        model = _model(preset, attention, max(contexts), device)
        for context in contexts:
            for batch in batches:
                modes = [(False, False)] + ([(True, False)] + [(True, True)] * compile if device == "cuda" else [])
                for graph, compiled in modes:
                    try:
                        ms = time_step(model, batch, context, graph, compiled)
                    except torch.cuda.OutOfMemoryError:
                        ms = None
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(dict(preset=preset, context=context, batch=batch, attention=attention,
                                     mode=("cuda-graph" if graph else "eager") + "+compile" * compiled, step_ms=ms,
                                     keys_per_query=_keys_per_query(model, context - 1), device=dev, torch=tv,
                                     triton=trv))
                    print(_row_line(rows[-1]), flush=True)
        del model
    if compile:  # recompiles past torch._dynamo's cache limit would fall back to eager: show how many graphs ran
        from torch._dynamo.utils import counters

        print("torch.compile:", dict(counters["stats"]))
    print(format_table(rows))
    _write(rows, out_dir, "decode")
    return rows


def bench_sampling(preset, num, out_dir="bench/results", device="cuda", compile=False):
    """Seconds to sample `num` whole sequences of the preset from an empty prefix (generate: CUDA graph and bf16 on
    CUDA)."""
    from .bench import _versions

    dev, tv, trv = _versions()
    model = _model(preset, "ours", device=device)
    n = model.cfg.n_ctx
    g = torch.Generator(device).manual_seed(0)
    empty = torch.zeros(num, 0, dtype=torch.long, device=device)
    model.generate(empty, 8, generator=g, compile=compile)  # compile the kernels; the timed call captures its graph
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate(empty, n, generator=g, progress=True, compile=compile)
    sync()
    seconds = time.perf_counter() - t0
    row = dict(preset=preset, num=num, n=n, seconds=seconds, ms_per_position=1e3 * seconds / n,
               compile=compile, params=model.num_params(), distinct_bytes=int(out.unique().numel()), device=dev, torch=tv, triton=trv)
    print(f"sampled {num} x {n} positions of {preset} ({row['params'] / 1e6:.1f}M params) in {seconds:.1f} s "
          f"({row['ms_per_position']:.2f} ms per position, all {num} sequences at once)")
    _write([row], out_dir, "sampling")
    return row


def _row_line(r):
    ms = "OOM" if r["step_ms"] is None else f"{r['step_ms']:.3f}"
    return (f"{r['attention']:>5} {r['mode']:>10} context {r['context']:>7} batch {r['batch']:>3}: {ms} ms "
            f"({r['keys_per_query']:.0f} keys per query)")


def format_table(rows):
    out = ["| context | batch | mode | ours ms | dense ms | speed-up | keys per query (ours / dense) |",
           "|---|---|---|---|---|---|---|"]
    ours = {(r["context"], r["batch"], r["mode"]): r for r in rows if r["attention"] == "ours"}
    for r in rows:
        if r["attention"] != "dense":
            continue
        o = ours.get((r["context"], r["batch"], r["mode"]))
        if o is None:
            continue
        a, d = o["step_ms"], r["step_ms"]
        ratio = f"{d / a:.1f}x" if a and d else "-"
        out.append(f"| {r['context']} | {r['batch']} | {r['mode']} | {a if a is None else f'{a:.3f}'} | "
                   f"{d if d is None else f'{d:.3f}'} | {ratio} | {o['keys_per_query']:.0f} / "
                   f"{r['keys_per_query']:.0f} |")
    return "\n".join(out)


def _write(rows, out_dir, kind):
    from .bench import _write_json

    path = _write_json(rows, out_dir, f"{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    print(f"wrote {path}")
    return path
