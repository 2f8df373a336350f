"""Host (CPU) time of our attention's forward and backward calls vs GPU time, on a short-row setup (strided-3k).
Usage on the device: python bench/host_overhead.py"""
import time

import torch
import triton.testing as tt

from sparse_transformer import sparse_attention
from sparse_transformer.attention.triton import function as fn_mod
from sparse_transformer.attention.triton.forward import attn_forward
from sparse_transformer.bench import SETUPS


def host_us(f, reps=200):
    f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    t = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return t


def graph_us(q, k, v, lay, go):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            sparse_attention(q, k, v, lay, backend="triton").backward(go)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sparse_attention(q, k, v, lay, backend="triton").backward(go)
    print(f"  fwd+bwd graph replay:    {tt.do_bench(g.replay, warmup=25, rep=200, return_mode='median') * 1e3:7.1f} us GPU")


for name in ["strided-3k", "strided-12k"]:
    B, H, n, D, make, _ = SETUPS[name]
    lay = make()
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)
    o = sparse_attention(q, k, v, lay, backend="triton")
    launches = fn_mod.get_launches(lay, D, q.device)
    lse = torch.empty(B, H, n, device="cuda")
    out = torch.empty_like(q)
    print(name)
    print(f"  one attn_forward launch: {host_us(lambda: attn_forward(q, k, v, out, lse, launches[0], 0.1, False)):7.1f} us host")
    print(f"  torch.empty_like:        {host_us(lambda: torch.empty_like(q)):7.1f} us host")
    with torch.no_grad():
        print(f"  forward (no grad):       {host_us(lambda: sparse_attention(q, k, v, lay, backend='triton')):7.1f} us host")
    print(f"  forward (grad):          {host_us(lambda: sparse_attention(q, k, v, lay, backend='triton')):7.1f} us host")
    print(f"  forward+backward:        {host_us(lambda: sparse_attention(q, k, v, lay, backend='triton').backward(go), 50):7.1f} us host")
    # pure GPU time: the same fwd+bwd captured in a CUDA graph and replayed
    print(f"  fwd+bwd do_bench eager:  {tt.do_bench(lambda: sparse_attention(q, k, v, lay, backend='triton').backward(go), warmup=25, rep=200, return_mode='median') * 1e3:7.1f} us", flush=True)
    q.grad = k.grad = v.grad = None
    try:
        graph_us(q, k, v, lay, go)
    except Exception as e:
        print("  graph capture failed:", str(e)[:200])
