"""Where an eager fwd+bwd's host time goes, on a GPU: for each setup, ours (backend="triton") and cuDNN's SDPA side by
side, with .grad accumulating as in `sparse-transformer bench attention`:
- wall (sync after each call) and enqueue (the call alone, GPU idle at its start) medians over 30 calls;
- a torch.profiler trace of 5 calls (CPU and CUDA): the CPU ops by self time (launch calls, allocations, any
  synchronising call), and one call's timeline: each CPU op that launched GPU work, when, for how long, and the
  kernel's start and length on the GPU (so gaps where the GPU waits on the host show);
- cProfile of 20 calls by cumulative time (the Python functions and C builtins, e.g. TMA descriptor encoding).
Writes each trace as OUT/host-trace-<setup>-<method>.json (chrome://tracing, Perfetto) unless TRACES=0.
Usage: OUT=dir python bench/host_trace.py [fixed-12k strided-12k strided-3k ...]"""
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time

import torch
from dev_probe import inputs
from torch.profiler import ProfilerActivity, profile, record_function

from sparse_transformer.attention.triton import launcher
from sparse_transformer.bench import _method_fn


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def timings(fb, reps=30):
    """Medians in ms of fb()'s wall time with a sync after it, and of the call alone (enqueue), the GPU idle at its
    start."""
    walls, enq = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fb()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        enq.append(t1 - t0)
    return _median(walls) * 1e3, _median(enq) * 1e3


def trace(fb, path):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            with record_function(f"call{i}"):
                fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48))
    with tempfile.TemporaryDirectory() as tmp:
        out = path or os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(out)
        events = json.load(open(out))["traceEvents"]
    timeline(events)


def timeline(events):
    """The last call's launches: each runtime / driver launch call on the CPU and the GPU work it queued (matched by
    the trace's correlation ids), times in us from the call's start."""
    call = [e for e in events if e.get("name") == "call4" and e.get("cat") == "user_annotation"][0]
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    gpu = {e["args"].get("correlation"): e for e in events
           if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "args" in e}
    print(f"one call's timeline (us from its start; CPU span {t1 - t0:.0f} us):")
    for e in sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and t0 <= e["ts"] <= t1),
                    key=lambda e: e["ts"]):
        g = gpu.get(e.get("args", {}).get("correlation"))
        if g is None:
            continue
        print(f"  cpu at {e['ts'] - t0:7.0f} for {e['dur']:6.1f}  {e['name'][:20]:20s} -> {g['name'][:48]:48s} "
              f"gpu at {g['ts'] - t0:7.0f} for {g['dur']:7.1f}")


def cprofile(fb, n=20, sort="cumulative", lines=30):
    """The top `lines` functions of a cProfile of n calls of fb, by `sort`."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(lines)
    print("\n".join(out.getvalue().splitlines()[4:lines + 10]), flush=True)


def main(names, out, traces=True):
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in names:
        lay, q, k, v, go = inputs(name)
        for method in ("triton", "sdpa-cudnn"):
            fn = _method_fn(method, q, k, v, lay, {})

            def fb():
                fn().backward(go)

            for _ in range(5):
                fb()
            slow = launcher.SLOW
            wall, enq = timings(fb)
            print(f"\n=== {name} {method}: wall {wall:.3f} ms, enqueue {enq:.3f} ms; launches through Triton's own "
                  f"path in 30 calls: {launcher.SLOW - slow}", flush=True)
            trace(fb, os.path.join(out, f"host-trace-{name}-{method}.json") if traces else None)
            if method == "triton":
                cprofile(fb)
            sys.stdout.flush()
        del q, k, v, go


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-12k", "strided-12k", "strided-3k"], os.environ.get("OUT", "."),
         os.environ.get("TRACES", "1") == "1")
