"""Per-kernel GPU time of one forward+backward of our Triton attention on the issue's setups (torch.profiler).
Usage on the device: python bench/profile_kernels.py [setup ...]"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_transformer import sparse_attention
from sparse_transformer.bench import SETUPS

from sparse_transformer import layouts  # noqa: E402
from sparse_transformer.attention.triton import function as fn_mod  # noqa: E402

SETUPS = dict(SETUPS)
SETUPS["strided-12k-local"] = (2, 8, 12288, 64, lambda: layouts.strided(12288, 128, "local"), "")
SETUPS["strided-12k-a2"] = (2, 8, 12288, 64, lambda: layouts.strided(12288, 128, "strided"), "")
SETUPS["fixed-12k-local"] = (2, 8, 12288, 64, lambda: layouts.fixed(12288, 128, 32, "local"), "")
SETUPS["fixed-12k-summary"] = (2, 8, 12288, 64, lambda: layouts.fixed(12288, 128, 32, "summary"), "")
STAGES = [None]
if sys.argv[1:2] == ["--stages"]:
    STAGES = [1, 2, 3]
    sys.argv = sys.argv[:1] + sys.argv[2:]
todo = [(name, st) for name in (sys.argv[1:] or list(SETUPS)) for st in STAGES]
base = {k: dict(v) for k, v in fn_mod.TUNING.items()}
for name, st in todo:
    if st is not None:
        for key, cfg in base.items():
            fn_mod.TUNING[key] = {k: c[:3] + (st,) for k, c in cfg.items()}
        fn_mod.clear_cache()
        name_st = f"{name} stages={st}"
    else:
        name_st = name
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
    print(f"=== {name_st}: per call (us)")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
        print(f"  {e.device_time_total / 10:9.1f}  x{e.count // 10:<3d} {e.key[:90]}")
