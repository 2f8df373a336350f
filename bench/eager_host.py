"""Where an eager fwd+bwd spends its host time on the GPU, per setup and launch variant, in turn, in ROUNDS rounds
(4): the Triton gathered kernels (the Gluon ones off), the Gluon kernels with Triton's launcher encoding every TMA
descriptor on every call (launcher.TMA_DIRECT off), and the Gluon kernels with each descriptor encoded once per
address (the default). For each: the protocol's eager fwd+bwd (do_bench median, .grad accumulating, as
`sparse-transformer bench attention`), the wall time per call with a sync after it, the time to enqueue one call
(the GPU idle at its start), and the direct path's TMA encodings over those 30 calls after warm-up (0 once each
address is seen; Triton's own encodings on the per-call variant are not counted); the medians over the rounds; then
a cProfile of 20 calls of the default by own time. JSON under $OUT (or bench/results/).
Usage (on a GPU): python bench/eager_host.py [fixed-12k strided-12k ...]"""
import json
import os
import statistics
import sys
import time

import torch
import triton
import triton.testing as tt
from dev_probe import inputs
from host_trace import cprofile, timings

from sparse_transformer.attention.triton import forward, launcher
from sparse_transformer.bench import _method_fn

VARIANTS = {"triton gather": (False, None), "gluon, encode per call": (True, None),
            "gluon, encode once": (True, (3, 6))}  # launcher.TMA_DIRECT: reuse needs Triton 3.6


ROUNDS = int(os.environ.get("ROUNDS", "4"))


def main(names):
    rows = []
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    for name in names:
        lay, q, k, v, go = inputs(name)
        fn = _method_fn("triton", q, k, v, lay, {})

        def fb():
            fn().backward(go)

        for rnd in range(ROUNDS):
            for variant, (gluon, direct) in VARIANTS.items():
                forward.GLUON_GATHER, launcher.TMA_DIRECT = gluon, direct
                launcher.clear()
                for _ in range(3):
                    fb()
                eager = tt.do_bench(fb, warmup=25, rep=200, return_mode="median")
                enc = launcher.ENCODED
                wall, enq = timings(fb)  # 30 calls
                encoded = launcher.ENCODED - enc
                rows.append(dict(setup=name, variant=variant, round=rnd, eager_ms=eager, wall_ms=wall, enqueue_ms=enq,
                                 direct_encodings=encoded))
                print(f"{name:12s} {variant:24s} round {rnd}: eager {eager:.3f} ms, wall {wall:.3f}, enqueue "
                      f"{enq:.3f}, direct encodings in 30 calls {encoded}", flush=True)
        for variant in VARIANTS:
            mine = [r for r in rows if r["setup"] == name and r["variant"] == variant]
            print(f"{name:12s} {variant:24s} medians over {len(mine)} rounds: " + ", ".join(
                f"{m} {statistics.median([r[m + '_ms'] for r in mine]):.3f}" for m in ("eager", "wall", "enqueue")), flush=True)
        forward.GLUON_GATHER, launcher.TMA_DIRECT = VARIANTS["gluon, encode once"]
        launcher.clear()
        cprofile(fb, sort="tottime", lines=25)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(out, f"eager-host-{time.strftime('%Y%m%d-%H%M%S')}.json")
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   rows=rows), open(path, "w"), indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-12k"])
