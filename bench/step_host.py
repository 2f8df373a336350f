"""Is a preset's training step bound by the host or by the GPU? Usage on the device: python bench/step_host.py [preset]

For our attention and dense SDPA, at batch 1 and 2: the step's wall time (synchronized), the host time to enqueue it
(the step() call alone; equal to the wall time when the host is the bottleneck, or when the launch queue is full), and
the GPU time of its kernels alone (torch.profiler kernel events, one step). A host-bound step hardly grows from
batch 1 to 2 and has GPU kernel time well under its wall time.
"""
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sparse_transformer import SparseTransformer, load_preset
from sparse_transformer.bench import make_train_step

preset = sys.argv[1] if len(sys.argv) > 1 else "enwik8"
print(f"{'attention':>9} {'B':>2} {'wall ms':>8} {'enqueue ms':>10} {'GPU kernels ms':>14}")
for backend in ("auto", "dense"):
    cfg = load_preset(preset, recompute=False, dropout=0.0, backend=backend)
    model = SparseTransformer(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for B in (1, 2):
        step = make_train_step(model, opt, torch.randint(0, 256, (B, cfg.n_ctx), device="cuda"))
        for _ in range(3):
            step()
        walls, hosts = [], []
        for _ in range(6):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            hosts.append(t1 - t0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        gpu = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e3
        print(f"{backend:>9} {B:>2} {1e3 * statistics.median(walls):8.1f} {1e3 * statistics.median(hosts):10.1f} "
              f"{gpu:14.1f}", flush=True)
    del model, opt
    torch.cuda.empty_cache()
