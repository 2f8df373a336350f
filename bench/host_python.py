"""Our Python's share of one attention call: sparse_attention(backend="triton") fwd+bwd with the kernel launches
stubbed out, on CPU tensors (no GPU, no interpreter), so only the wrapper's own host work is timed. The same shapes as
`bench/dev_probe.py micro` (strided n=256, l=16, one head of width 64). Usage: python bench/host_python.py [reps]"""
import sys
import time

import torch

from sparse_transformer import layouts, sparse_attention
from sparse_transformer.attention.triton import backward, block_backward, forward


def main(reps: int) -> None:
    for module in (forward, backward, block_backward):
        module.launch_kernel = lambda *args, **kwargs: None
    lay = layouts.strided(256, 16)
    q, k, v = (torch.randn(1, 1, 256, 64, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)

    def fb():
        sparse_attention(q, k, v, lay, backend="triton").backward(go)

    fb()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fb()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    print(f"our Python per fwd+bwd, kernels stubbed: median {sorted(times)[2]:.0f} us over 5 x {reps} calls")


if __name__ == "__main__":
    main(int(sys.argv[1]) if sys.argv[1:] else 2000)
