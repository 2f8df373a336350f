"""One warm fwd+bwd of each named `bench attention` setup between cudaProfilerStart / Stop, for Nsight Compute's
--profile-from-start off (compiles and warm-up calls stay outside the profile). On the device:
ncu --profile-from-start off --clock-control none -k regex:_attn --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    python bench/ncu_probe.py strided-12k > ncu-strided-12k.txt
(bash bench/device_pending.sh ncu OUT runs it)."""
import sys

import torch

from sparse_transformer import sparse_attention
from sparse_transformer.bench import SETUPS


def main(names):
    for name in names:
        B, H, n, D, make, _ = SETUPS[name]
        lay = make()
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn_like(q)
        for _ in range(2):  # compile and warm up outside the profiled range
            sparse_attention(q, k, v, lay, backend="triton").backward(go)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        sparse_attention(q, k, v, lay, backend="triton").backward(go)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print("profiled", name, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["strided-12k"])
