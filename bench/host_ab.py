"""Host time of whatever sparse_transformer is first on PYTHONPATH, for A/B runs of two trees in separate processes
(e.g. a `git archive` of the base commit unpacked under a folder put first on PYTHONPATH, then this tree): per setup,
two eager fwd+bwd medians (do_bench, .grad accumulating, as `bench attention`), then the wall and enqueue medians of
30 calls (host_trace.timings). One JSON line per setup, labelled.
Usage (on a GPU): python bench/host_ab.py LABEL [fixed-12k strided-12k ...]"""
import json
import os
import sys

import triton.testing as tt

sys.path.insert(1, os.path.dirname(__file__))
from dev_probe import inputs  # noqa: E402
from host_trace import timings  # noqa: E402

import sparse_transformer  # noqa: E402
from sparse_transformer.bench import _method_fn  # noqa: E402


def main(label, names):
    for name in names:
        lay, q, k, v, go = inputs(name)
        fn = _method_fn("triton", q, k, v, lay, {})

        def fb():
            fn().backward(go)

        for _ in range(3):
            fb()
        eager = [tt.do_bench(fb, warmup=25, rep=200, return_mode="median") for _ in range(2)]
        wall, enq = timings(fb)
        print(json.dumps(dict(label=label, setup=name, package=os.path.dirname(sparse_transformer.__file__),
                              eager_ms=eager, wall_ms=wall, enqueue_ms=enq)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["fixed-12k", "strided-12k"])
