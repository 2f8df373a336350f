"""Where an eager fwd+bwd spends its host time on the GPU, with the Gluon gathered kernels on and off: per setup, the
wall time per call with a sync after each (what eager training sees), the time to enqueue one call (no sync; the host
side alone while the GPU keeps up), and the top functions of a cProfile of 20 calls.
Usage (on a GPU): python bench/eager_host.py [fixed-12k ...]"""
import sys

import torch
from host_trace import cprofile, timings

from sparse_transformer import layouts, sparse_attention
from sparse_transformer.attention.triton import forward

SETUPS = {"fixed-12k": (2, 8, 12288, 64, lambda n: layouts.fixed(n, 128, 32)),
          "strided-12k": (2, 8, 12288, 64, lambda n: layouts.strided(n, 128))}


def main(names):
    for name in names:
        B, H, n, D, make = SETUPS[name]
        lay = make(n)
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn_like(q)

        def fb():
            sparse_attention(q, k, v, lay, backend="triton").backward(go)
            q.grad = k.grad = v.grad = None

        for on in (False, True):
            forward.GLUON_GATHER = on
            for _ in range(3):
                fb()
            wall, enq = timings(fb, reps=20)
            print(f"{name} gluon={on}: wall {wall:.3f} ms, enqueue {enq:.3f} ms", flush=True)
            cprofile(fb, sort="tottime", lines=14)
    forward.GLUON_GATHER = True


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-12k"])
