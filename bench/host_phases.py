"""Where an eager fwd+bwd's host time goes between our kernel launches, without a profiler: timestamps (perf_counter)
at the entry and exit of SparseAttentionFunction.forward / .backward and around each launcher.launch call, for 30
calls with the GPU idle at each call's start and .grad accumulating (the benchmark's protocol); medians per event, in
us from the call's start. Setups as `sparse-transformer bench attention`'s, Gluon gathered kernels on and off; graph
replay off (replay.py: a replayed call launches nothing to time).
Usage (on a GPU): python bench/host_phases.py [fixed-12k strided-12k ...]"""
import statistics
import sys
import time

import torch
from dev_probe import inputs

from sparse_transformer.attention.triton import backward, block_backward, forward, function, gluon_gather, replay
from sparse_transformer.bench import _method_fn

EVENTS: list = []


def _mark(label):
    EVENTS.append((label, time.perf_counter()))


def _wrap_launch(module):
    inner = module.launch_kernel

    def launch(kernel, *args, **kwargs):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
        _mark(f"{name} in")
        inner(kernel, *args, **kwargs)
        _mark(f"{name} out")
    module.launch_kernel = launch


def _wrap_method(cls, name):
    inner = getattr(cls, name)

    def method(*args, **kwargs):
        _mark(f"{name} in")
        out = inner(*args, **kwargs)
        _mark(f"{name} out")
        return out
    setattr(cls, name, staticmethod(method))


def main(names):
    replay.ENABLED = False  # the direct launches (a replayed call has none to time)
    for module in (forward, backward, block_backward, gluon_gather):
        _wrap_launch(module)
    _wrap_method(function.SparseAttentionFunction, "forward")
    _wrap_method(function.SparseAttentionFunction, "backward")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in names:
        lay, q, k, v, go = inputs(name)
        fn = _method_fn("triton", q, k, v, lay, {})
        for gluon in ((True, False) if name.startswith("fixed") else (True,)):
            forward.GLUON_GATHER = gluon
            calls = []
            for i in range(35):
                torch.cuda.synchronize()
                EVENTS.clear()
                _mark("call")
                fn().backward(go)
                _mark("return")
                if i >= 5:
                    calls.append(list(EVENTS))
            torch.cuda.synchronize()
            labels = [e[0] for e in calls[0]]
            print(f"\n{name}, gluon={gluon}: medians over {len(calls)} calls, us from the call's start")
            prev = 0.0
            for j, label in enumerate(labels):
                at = statistics.median((c[j][1] - c[0][1]) * 1e6 for c in calls)
                print(f"  {label:36s} {at:8.1f}  (+{at - prev:6.1f})")
                prev = at
    forward.GLUON_GATHER = True


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-12k", "strided-12k"])
