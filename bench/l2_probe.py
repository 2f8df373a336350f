"""Would our kernels run faster from a warm L2? The strided setups' kernels wait on memory latency at low occupancy
(BENCHMARKS.md, Nsight Compute), and each of a fwd+bwd's five kernels reads the whole q, k, v (75 MB at strided-12k,
more than the H200's 50 MB L2), so every kernel starts cold. Run a few heads at a time and a group's later kernels
could find its rows in L2. Per setup, in one process:
- whole: one fwd+bwd over every head: each kernel's GPU time (profiler median of 5 calls), graph-replayed fwd+bwd;
  and the same with the L2 flushed before every kernel (what it gets from L2 today);
- groups of g heads (GROUPS): the same work as B * H / g calls on [1, g, n, D] tensors in turn: per-kernel time
  summed over the groups, with and without a flush before every kernel (the gap is what L2 reuse between a group's
  kernels gives at that grid size), and graph fwd+bwd of all groups on one stream and spread over two (where a
  group's small grids leave SMs idle, the other stream's group fills them).
Usage on the device: python bench/l2_probe.py [setup ...]  (prints a table, writes $OUT/dev_l2.json).
Measured on an H200 (2026-12-01, dev-l2-20261201.json): a warm L2 saves up to a fifth of a small grid's kernel time
(strided-12k, 4 heads a call: 526 -> 429 us summed), but small grids fill the GPU badly; on two streams, graph fwd+bwd
over all heads -> groups of 4: strided-12k 0.388 -> 0.370 ms, strided-3k 0.193 -> 0.168, strided-64k even. Built into
the library as head groups on side streams under CUDA-graph capture (commit cbb0ced), the bench protocol gained only
0.444 -> 0.436 ms (strided-12k) and 0.224 -> 0.213 (strided-3k) at the best group size and stream count
(dev-groups-20261201.json), and it was removed."""
import os
import sys

import torch

from dev_probe import graph_ms, median_kernel_times, write_rows
from sparse_transformer import sparse_attention
from sparse_transformer.attention.triton import backward, block_backward, forward
from sparse_transformer.bench import SETUPS

GROUPS = [int(g) for g in os.environ.get("GROUPS", "1 2 4").split()]
_MODULES = (forward, backward, block_backward)


class flushed:
    """Within: every kernel launch of ours is preceded by writing a 256 MiB buffer (evicts L2)."""

    def __enter__(self):
        buf = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
        self.saved = [m.launch_kernel for m in _MODULES]
        for m, launch in zip(_MODULES, self.saved):
            m.launch_kernel = lambda *a, _launch=launch, **kw: (buf.zero_(), _launch(*a, **kw))[1]

    def __exit__(self, *exc):
        for m, launch in zip(_MODULES, self.saved):
            m.launch_kernel = launch


def ours(names, times):
    """Our kernels' names and times, in launch order (the flush's fills dropped)."""
    keep = [i for i, n in enumerate(names) if n.startswith("_attn")]
    return [names[i] for i in keep], [times[i] for i in keep]


def kernels(f, runs=5):
    return ours(*median_kernel_times(f, runs))


def probe(name):
    B, H, n, D, make, _ = SETUPS[name]
    lay = make()
    rows = []

    def make_inputs(shape):
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        return q, k, v, torch.randn_like(q)

    def run(group):
        for q, k, v, go in group:
            q.grad = k.grad = v.grad = None
            sparse_attention(q, k, v, lay, backend="triton").backward(go)

    whole = [make_inputs((B, H, n, D))]
    names, us = kernels(lambda: run(whole))
    with flushed():
        _, us_cold = kernels(lambda: run(whole))
    rows.append(dict(setup=name, heads_per_call=B * H, kernels=names, us=us, us_flushed=us_cold,
                     graph_ms=graph_ms(lambda: run(whole))))
    whole = None
    for g in GROUPS:
        if (B * H) % g or g >= B * H:
            continue
        groups = [make_inputs((1, g, n, D)) for _ in range(B * H // g)]
        names_g, us_g = kernels(lambda: run(groups), 3)
        with flushed():
            _, us_gc = kernels(lambda: run(groups), 3)
        per = len(names_g) // len(groups)  # the same kernels per group, in turn: sum them position-wise
        total = [sum(us_g[i::per]) for i in range(per)]
        total_c = [sum(us_gc[i::per]) for i in range(per)]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]

        def two_streams():
            main = torch.cuda.current_stream()
            for s in streams:
                s.wait_stream(main)
            for i, grp in enumerate(groups):
                with torch.cuda.stream(streams[i % 2]):
                    run([grp])
            for s in streams:
                main.wait_stream(s)

        rows.append(dict(setup=name, heads_per_call=g, kernels=names_g[:per], us=total, us_flushed=total_c,
                         graph_ms=graph_ms(lambda: run(groups)), graph_two_streams_ms=graph_ms(two_streams)))
        groups = None
        torch.cuda.empty_cache()
    for r in rows:
        extra = f" two streams {r['graph_two_streams_ms']:.3f}" if "graph_two_streams_ms" in r else ""
        print(f"{name:12s} heads/call {r['heads_per_call']:3d} graph {r['graph_ms']:.3f} ms{extra}", flush=True)
        print("   warm    " + " ".join(f"{x:7.1f}" for x in r["us"]) + f"  sum {sum(r['us']):7.1f}", flush=True)
        print("   flushed " + " ".join(f"{x:7.1f}" for x in r["us_flushed"]) + f"  sum {sum(r['us_flushed']):7.1f}",
              flush=True)
    print("   kernels: " + " | ".join(k[:28] for k in rows[0]["kernels"]), flush=True)
    return rows


def main(names):
    rows = []
    for name in names:
        rows += probe(name)
    write_rows(rows, "dev_l2.json")


if __name__ == "__main__":
    main(sys.argv[1:] or ["strided-12k", "strided-3k", "strided-64k"])
