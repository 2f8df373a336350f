"""Programmatic dependent launch (attention/triton/common.PDL) off and on, in turn in one process over ROUNDS rounds
(3; off first in even rounds, on first in odd ones): per setup, our fwd+bwd and forward replayed from a CUDA graph
(`bench._time_graph`, the table's graph column) and the eager fwd+bwd (do_bench, as `bench attention`; with how many
of its directions replayed from graphs), with the GPU's SM clock after each. Before the timings each variant's output
and gradients are compared with the off variant's: bit-equal (the same kernels, only overlapped).
Usage (on a GPU): python bench/pdl_ab.py [strided-12k fixed-12k ...]; JSON under $OUT or bench/results/."""
import json
import os
import statistics
import sys

import torch
import triton.testing as tt
from dev_probe import inputs, run_setups

from sparse_transformer.attention.triton import common, function, launcher, replay
from sparse_transformer.bench import _method_fn, _time_graph, gpu_state

ROUNDS = int(os.environ.get("ROUNDS", "3"))


def _switch(on):
    common.PDL = on
    function.clear_cache()  # (graphs of the other variant's launches)
    launcher.clear()


def run_setup(name, rows):
    lay, q, k, v, go = inputs(name)
    fn = _method_fn("triton", q, k, v, lay, {})

    def fb():
        fn().backward(go)

    def result():
        q.grad = k.grad = v.grad = None
        o = fn()
        o.backward(go)
        return [o.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]

    want = None
    for on in (False, True):
        _switch(on)
        got = result()
        want = got if want is None else want
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        print(f"{name:12s} PDL {'on ' if on else 'off'}: outputs and gradients bit-equal to off: {same}", flush=True)
        if not same:
            raise SystemExit(f"{name}: PDL on differs from off")
    for rnd in range(ROUNDS):
        for on in ((False, True) if rnd % 2 == 0 else (True, False)):  # the order alternates (a GPU warming up
            # within a round would otherwise always favour the first)
            _switch(on)
            fb()
            fwd, graph = _time_graph(fn, go)
            replays = replay.REPLAYS
            eager = tt.do_bench(fb, warmup=25, rep=200, return_mode="median")
            torch.cuda.synchronize()
            row = dict(setup=name, pdl=on, round=rnd, fwd_graph_ms=fwd, fwdbwd_graph_ms=graph, fwdbwd_ms=eager,
                       eager_replays=replay.REPLAYS - replays, **gpu_state())
            rows.append(row)
            print(json.dumps(row), flush=True)
            q.grad = k.grad = v.grad = None
    for on in (False, True):
        mine = [r for r in rows if r["setup"] == name and r["pdl"] == on]
        print(f"{name:12s} PDL {'on ' if on else 'off'} medians over {len(mine)} rounds: " + ", ".join(
            f"{m} {statistics.median(r[m] for r in mine):.4f}" for m in ("fwd_graph_ms", "fwdbwd_graph_ms",
                                                                        "fwdbwd_ms")), flush=True)


def main(names):
    default = common.PDL
    try:
        run_setups(names, run_setup, "pdl-ab")
    finally:
        _switch(default)


if __name__ == "__main__":
    main(sys.argv[1:] or ["strided-12k", "strided-3k", "fixed-12k", "strided-64k", "fixed-64k"])
