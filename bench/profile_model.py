"""Where a training step of a preset spends GPU time (torch.profiler), ours vs dense attention.
Usage on the device: python bench/profile_model.py [preset]"""
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sparse_transformer import SparseTransformer, load_preset
from sparse_transformer.bench import make_train_step

preset = sys.argv[1] if len(sys.argv) > 1 else "enwik8"
for backend in ("auto", "dense"):
    cfg = load_preset(preset, recompute=False, dropout=0.0, backend=backend)
    model = SparseTransformer(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 256, (1, cfg.n_ctx), device="cuda")

    step = make_train_step(model, opt, x)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    ev = [e for e in prof.key_averages() if e.device_time_total > 0]
    # kernel events only: an operator's device time is its kernels' time again, so summing both counts it twice
    gpu = sum(e.self_device_time_total for e in ev if e.device_type == DeviceType.CUDA) / 1e3
    print(f"=== {preset} backend={backend}: wall {wall:.1f} ms (under the profiler), GPU kernels {gpu:.1f} ms")
    print("  top entries mix operators and their kernels (e.g. SparseAttentionFunctionBackward and the dQ / dK/dV "
          "kernels it launches):")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms  x{e.count:<4d} {e.key[:90]}")
    del model, opt
    torch.cuda.empty_cache()
