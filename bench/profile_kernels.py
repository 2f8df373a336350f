"""Per-kernel GPU time of one forward+backward of our Triton attention on the issue's setups (torch.profiler).
Usage on the device: python bench/profile_kernels.py [setup ...]"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_transformer import sparse_attention
from sparse_transformer.bench import SETUPS

for name in sys.argv[1:] or list(SETUPS):
    B, H, n, D, make, pattern = SETUPS[name]
    lay = make()
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    for _ in range(3):
        sparse_attention(q, k, v, lay, backend="triton").backward(go)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            sparse_attention(q, k, v, lay, backend="triton").backward(go)
        torch.cuda.synchronize()
    print(f"=== {name}: per call (us)")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]:
        print(f"  {e.device_time_total / 10:9.1f}  x{e.count // 10:<3d} {e.key[:90]}")
