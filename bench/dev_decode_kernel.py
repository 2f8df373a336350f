"""Decode-kernel sweep on the device: the time of one attn_decode launch (CUDA graph replay, so host cost is out) for
the audio-65k shapes (H=16, head width 32, the last position of a 65536-row cache), strided and local rows, over
keys-per-chunk and warps; dense SDPA over the whole cache for scale. Usage: python bench/dev_decode_kernel.py (prints
a table, writes $OUT/dev_decode_kernel.json)."""
import json
import os

import torch
import triton.testing as tt

from sparse_transformer import layouts
from sparse_transformer.attention.decode import decode_params
from sparse_transformer.attention.triton.decode import attn_decode


def graphed(fn, reps=20):
    """fn replayed `reps` times from one CUDA graph: the per-launch time without the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return lambda: g.replay(), reps


rows = []
T, H, D = 65536, 16, 32
pos = torch.tensor([T - 1], device="cuda")
for B in (1, 4):
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    kc, vc = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for name, lay in (("strided", layouts.strided(T, 256, "strided")), ("local", layouts.strided(T, 256, "local"))):
        prm = decode_params(lay).cuda()
        for bn in (32, 64, 128, 256):
            for warps in (1, 2, 4):
                def run(bn=bn, warps=warps):
                    attn_decode(q, kc, vc, prm, pos, 0.125, block_n=bn, num_warps=warps)
                f, reps = graphed(run)
                us = 1e3 * tt.do_bench(f, warmup=10, rep=100, return_mode="median") / reps
                rows.append(dict(batch=B, row=name, block_n=bn, warps=warps, us=us))
                print(f"B={B} {name:8s} BN={bn:4d} warps={warps}: {us:7.2f} us", flush=True)
    mask = torch.ones(1, T, dtype=torch.bool, device="cuda")
    f, reps = graphed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], kc, vc, attn_mask=mask))
    us = 1e3 * tt.do_bench(f, warmup=10, rep=100, return_mode="median") / reps
    rows.append(dict(batch=B, row="dense-sdpa", block_n=0, warps=0, us=us))
    print(f"B={B} dense SDPA over {T} rows: {us:.2f} us", flush=True)
out = os.environ.get("OUT", ".")
json.dump(dict(rows=rows, device=torch.cuda.get_device_name(), torch=torch.__version__), open(
    os.path.join(out, "dev_decode_kernel.json"), "w"), indent=1)
