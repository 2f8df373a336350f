"""The block-causal band's one-kernel backward (sparse_transformer/attention/triton/block_backward.py) against the
generic dQ + dK/dV pair, side by side in one process on a GPU: graph-replayed fwd+bwd of the fixed setups (the same
protocol as `bench attention`: do_bench medians, q / k / v accumulating their gradients) and the kernels' profiler
times, with the block kernel off, on 64-row tiles and on 128-row tiles (which spill; see MAX_TILE).
Usage: python bench/block_bwd.py [fixed-12k fixed-64k ...]; writes block-bwd-<date>.json to $OUT (default
bench/results)."""
import json
import os
import sys
import time

import torch

from sparse_transformer import sparse_attention
from sparse_transformer.attention.triton import block_backward, function
from sparse_transformer.bench import SETUPS, _time_graph, _versions

VARIANTS = {"generic dQ + dK/dV": (False, 64), "block kernel, 64-row tiles": (True, 64),
            "block kernel, 128-row tiles": (True, 128)}


def _kernels(f):
    """Profiler medians of 5 of each CUDA kernel one f() launches (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    f()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f()
            torch.cuda.synchronize()
        ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
        runs.append([(e.name[:26], e.time_range.elapsed_us()) for e in ev])
    return [(name, sorted(r[i][1] for r in runs)[2]) for i, (name, _) in enumerate(runs[0])]


def main(names):
    dev, tv, trv = _versions()
    rows = []
    for name in names:
        B, H, n, D, make, pattern = SETUPS[name]
        lay = make()
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn_like(q)
        ref = None
        for label, (on, tile) in VARIANTS.items():
            block_backward.BLOCK_BWD, block_backward.MAX_TILE = on, tile
            function.clear_cache()
            fn = lambda: sparse_attention(q, k, v, lay, backend="triton")  # noqa: E731
            q.grad = k.grad = v.grad = None
            fn().backward(go)
            grads = [t.grad.float().clone() for t in (q, k, v)]
            if ref is None:
                ref = grads
            diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, ref))
            fwd, fwdbwd = _time_graph(fn, go)
            kernels = _kernels(lambda: fn().backward(go))
            row = dict(setup=name, variant=label, n=n, batch=B, heads=H, head_dim=D, pattern=pattern, fwd_graph_ms=fwd,
                       fwdbwd_graph_ms=fwdbwd, grad_rel_diff_to_generic=diff, kernels_us=kernels, device=dev, torch=tv,
                       triton=trv)
            rows.append(row)
            print(f"{name:10s} {label:30s} graph fwd {fwd:.3f} ms, fwd+bwd {fwdbwd:.3f} ms, grads vs generic "
                  f"{diff:.1e} | " + "  ".join(f"{a} {b:.0f}" for a, b in kernels), flush=True)
    block_backward.BLOCK_BWD, block_backward.MAX_TILE = True, 64
    function.clear_cache()
    out = os.path.join(os.environ.get("OUT", "bench/results"), f"block-bwd-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1:] or ["fixed-12k", "fixed-64k"])
