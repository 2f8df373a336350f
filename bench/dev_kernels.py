"""Kernel tuning sweep on the device: times our Triton kernels (fwd, fwd+bwd, bf16) on the issue's setups for a few
launch settings, next to cuDNN in the same process. Usage: python bench/dev_kernels.py [setup ...] (prints a table,
writes $OUT/dev_kernels.json)."""
import json
import os
import sys

import torch
import triton.testing as tt

from sparse_transformer import sparse_attention
from sparse_transformer.attention.triton import function as fn_mod
from sparse_transformer.bench import SETUPS

VARIANTS = {  # name: {kind: (fwd, dq, dkdv)} as (BM, BN, num_warps, num_stages); kinds not named keep their TUNING
    "current": {},
    "band64": {"natural": ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2))},
    "trans32": {"transposed": ((32, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 2))},
    "trans64": {"transposed": ((64, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 2))},
    "trans128": {"transposed": ((128, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2))},
    "gather128": {"gather": ((128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3))},
}
BASE = {k: dict(v) for k, v in fn_mod.TUNING.items()}


def bench(f, go):
    fwd = tt.do_bench(f, warmup=25, rep=150, return_mode="median")
    fb = tt.do_bench(lambda: f().backward(go), warmup=25, rep=150, return_mode="median")
    return fwd, fb


rows = []
names = sys.argv[1:] or list(SETUPS)
for name in names:
    B, H, n, D, make, pattern = SETUPS[name]
    lay = make()
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    c_f, c_fb = bench(dense, go)
    for vname, cfg in VARIANTS.items():
        fn_mod.TUNING.update({k: dict(v) for k, v in BASE.items()})
        for kind, c in cfg.items():
            key = (kind, 64 if D <= 64 else 128)
            fn_mod.TUNING[key] = dict(fwd=c[0], dq=c[1], dkdv=c[2], split=BASE[key].get("split", ()))
        fn_mod.clear_cache()
        try:
            f = lambda: sparse_attention(q, k, v, lay, backend="triton")  # noqa: E731
            f().backward(go)
            t_f, t_fb = bench(f, go)
        except Exception as e:
            print(name, vname, "ERROR", str(e)[:300])
            continue
        import time
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            f()
        cpu_us = (time.perf_counter() - t0) / 50 * 1e6  # host time per forward call (launch overhead bound)
        torch.cuda.synchronize()
        r = dict(setup=name, cpu_fwd_us=cpu_us, variant=vname, density=lay.density(), fwd_ms=t_f, fwdbwd_ms=t_fb, cudnn_fwd_ms=c_f,
                 cudnn_fwdbwd_ms=c_fb, ideal_fwdbwd_ms=c_fb * lay.density() / 0.5)
        rows.append(r)
        print(f"{name:12s} {vname:12s} fwd {t_f:7.3f} ms  fwd+bwd {t_fb:7.3f} ms | cuDNN {c_f:6.3f} / {c_fb:6.3f} ms |"
              f" ideal {r['ideal_fwdbwd_ms']:6.3f} ms | host {cpu_us:5.0f} us/fwd", flush=True)
    del q, k, v, go
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "dev_kernels.json"), "w"), indent=1)

