"""Where an eager fwd+bwd spends its host time on the GPU, per setup and launch variant, in turn, in ROUNDS rounds
(4; the order reversed in odd rounds). Variants (VARIANTS="default no-graphs ..." picks some; default: all):
- triton-gather: the Triton gathered kernels (the Gluon ones off), no graph replay;
- encode-per-call: the Gluon kernels with Triton's launcher encoding every TMA descriptor on every call
  (launcher.TMA_DIRECT off), no graph replay;
- no-graphs: the Gluon kernels, each descriptor encoded once per address, every call's launches made directly
  (replay.ENABLED off: SPARSE_TRANSFORMER_GRAPHS=0);
- default: the library's defaults: that, with each call's launches replayed from a CUDA graph once its tensors
  repeat (replay.py).
For each: the protocol's eager fwd+bwd (do_bench median, .grad accumulating, as `sparse-transformer bench
attention`), the wall time per call with a sync after it, the time to enqueue one call (the GPU idle at its start),
the direct path's TMA encodings over those 30 calls after warm-up (0 once each address is seen; Triton's own
encodings on the per-call variant are not counted) and the graph replays among them; the medians over the rounds;
then a cProfile of 20 calls of the default by own time. JSON under $OUT (or bench/results/).
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

from sparse_transformer.attention.triton import forward, function, launcher, replay
from sparse_transformer.bench import _method_fn

# (forward.GLUON_GATHER, launcher.TMA_DIRECT, replay.ENABLED); TMA_DIRECT's reuse needs Triton 3.6
ALL_VARIANTS = {"triton-gather": (False, (3, 6), False), "encode-per-call": (True, None, False),
                "no-graphs": (True, (3, 6), False), "default": (True, (3, 6), True)}
VARIANTS = {v: ALL_VARIANTS[v] for v in os.environ.get("VARIANTS", " ".join(ALL_VARIANTS)).split()}


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
            order = list(VARIANTS.items())  # reversed in odd rounds: a drift within a round favours no variant
            for variant, (gluon, direct, graphs) in (order if rnd % 2 == 0 else order[::-1]):
                forward.GLUON_GATHER, launcher.TMA_DIRECT, replay.ENABLED = gluon, direct, graphs
                launcher.clear()
                function.clear_cache()
                for _ in range(3):
                    fb()
                eager = tt.do_bench(fb, warmup=25, rep=200, return_mode="median")
                enc, reps = launcher.ENCODED, replay.REPLAYS
                wall, enq = timings(fb)  # 30 calls
                encoded, replays = launcher.ENCODED - enc, replay.REPLAYS - reps
                rows.append(dict(setup=name, variant=variant, round=rnd, eager_ms=eager, wall_ms=wall, enqueue_ms=enq,
                                 direct_encodings=encoded, replays=replays))
                print(f"{name:12s} {variant:16s} round {rnd}: eager {eager:.3f} ms, wall {wall:.3f}, enqueue "
                      f"{enq:.3f}, direct encodings in 30 calls {encoded}, graph replays {replays}", flush=True)
        for variant in VARIANTS:
            mine = [r for r in rows if r["setup"] == name and r["variant"] == variant]
            print(f"{name:12s} {variant:16s} medians over {len(mine)} rounds: " + ", ".join(
                f"{m} {statistics.median([r[m + '_ms'] for r in mine]):.3f}" for m in ("eager", "wall", "enqueue")), flush=True)
        forward.GLUON_GATHER, launcher.TMA_DIRECT, replay.ENABLED = ALL_VARIANTS["default"]
        launcher.clear()
        function.clear_cache()
        cprofile(fb, sort="tottime", lines=25)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(out, f"eager-host-{time.strftime('%Y%m%d-%H%M%S')}.json")
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   rows=rows), open(path, "w"), indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-12k"])
