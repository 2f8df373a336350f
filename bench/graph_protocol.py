"""Does the table's graph column depend on how it is taken? For each setup, in turn over ROUNDS rounds (3): the
eager fwd+bwd (do_bench, as `bench attention`), `bench._time_graph` (the table's graph column: a forward-only graph
captured and timed first, then the fwd+bwd graph), and a fwd+bwd graph captured and timed alone (as
bench/dev_probe.py). Also the GPU's temperature and SM clock after each (torch.cuda, where pynvml is installed).
Usage (on a GPU): python bench/graph_protocol.py [fixed-64k strided-64k ...]; JSON under $OUT or bench/results/."""
import json
import os
import sys

import torch
import triton.testing as tt
from dev_probe import inputs, run_setups

from sparse_transformer.bench import _method_fn, _time_graph, capture_graph, gpu_state

ROUNDS = int(os.environ.get("ROUNDS", "3"))


def run_setup(name, rows):
    lay, q, k, v, go = inputs(name)
    fn = _method_fn("triton", q, k, v, lay, {})

    def fb():
        fn().backward(go)

    fb()
    variants = {"eager": lambda: tt.do_bench(fb, warmup=25, rep=200, return_mode="median"),
                "table graph (fwd first)": lambda: _time_graph(fn, go)[1],
                "fwd+bwd graph alone": lambda: tt.do_bench(capture_graph(fb).replay, warmup=25, rep=200,
                                                            return_mode="median")}
    for rnd in range(ROUNDS):
        for variant, run in variants.items():
            ms = run()
            torch.cuda.synchronize()
            row = dict(setup=name, variant=variant, round=rnd, fwdbwd_ms=ms, **gpu_state())
            rows.append(row)
            print(json.dumps(row), flush=True)


def main(names):
    run_setups(names, run_setup, "graph-protocol")


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-64k", "strided-64k", "fixed-12k"])
