"""How fast could any kernel do fwd+bwd of each `bench attention` setup? Lower bounds from the work itself, set beside
issue 3's targets and our latest measured time.

- memory: bytes that every implementation must move under the benchmark's protocol (peers.py: bf16, `.backward` with
  q, k, v's `.grad` already set, so autograd adds each new gradient into it): forward reads q, k, v and writes o (4
  tensors); backward reads q, k, v, o, dO and writes dQ, dK, dV (8); the three `.grad` additions read two tensors and
  write one each (9): 21 tensors of B x H x n x d, plus the fp32 log-sum-exp and Delta rows. Divided by the GPU's
  copy rate (measured here with a 1 GiB device-to-device copy when a GPU is present, else --bandwidth).
- compute: the visible entries times 14 d flops (forward QK^T and PV, 4 d; a backward that recomputes the scores,
  10 d: S, dP, dV, dQ, dK), at cuDNN's dense causal fwd+bwd rate measured in the same table (--table), on the
  visible entries only (no tile waste).
A kernel cannot beat the larger of the two; a real one pays some of both, and our two-segment design (band, then the
strided part or the summary, merged through the log-sum-exp) reads the inputs once per segment.
- two passes: the memory floor of that design even with one kernel per pass and direction (ours has two for the
  band's backward), for layouts of two segments (two_pass_tensors): forward, the band reads q, k, v and writes o (4),
  the second pass reads q, k, v, o and writes o (5); backward, the band reads q, k, v, o, dO and writes dQ, dK, dV (8),
  the second pass reads q, k, v, dO and adds to dQ, dK, dV (read and write: 10); the `.grad` additions (9). The
  gathered summary's pass reads and adds to only the summary rows of K, V, dK, dV (c of every L rows).
Usage: python bench/floor.py [--table bench/results/attention-*.json] [--bandwidth 4.3e12]"""
import argparse
import glob
import json

import torch

from sparse_transformer.attention.plan import GATHER, get_segments
from sparse_transformer.bench import SETUPS

TARGETS_MS = {"fixed-12k": 1.0, "strided-12k": 0.15, "strided-3k": 0.08, "fixed-64k": 6.4, "strided-64k": 0.6}


def copy_rate() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted), median of 20."""
    import triton.testing as tt

    x = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    ms = tt.do_bench(lambda: y.copy_(x), warmup=5, rep=100, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def latest_table() -> str | None:
    """The newest `bench attention` JSON with a row of ours for every setup."""
    for path in sorted(glob.glob("bench/results/attention-*.json"), reverse=True):
        if {r["setup"] for r in json.load(open(path)) if r.get("method") == "triton"} >= set(SETUPS):
            return path
    return None


def two_pass_tensors(lay) -> float | None:
    """B x H x n x d tensors a two-pass fwd+bwd moves at least (see the docstring), or None unless the layout has two
    segments (band, then the strided part or the summary)."""
    segs = get_segments(lay)
    if len(segs) != 2:
        return None
    second = segs[1]
    kv = second.C / second.L if second.kind == GATHER else 1.0  # share of K, V rows the second pass reads
    forward = 4 + (2 + 2 * kv + 1)  # q, k, v, o; then q, k, v, o read again and o written
    backward = 8 + (2 + 2 * kv + 2 + 4 * kv)  # q, k, v, o, dO, dQ, dK, dV; then q, k, v, dO and dQ, dK, dV added to
    return forward + backward + 9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default=latest_table(), help="a `bench attention` JSON (ours and sdpa-cudnn rows)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s when no GPU is here (default 4.3e12, "
                   "an H200's measured copy rate)")
    args = p.parse_args()
    bw = args.bandwidth or (copy_rate() if torch.cuda.is_available() else 4.3e12)
    rows = json.load(open(args.table)) if args.table else []
    ours = {r["setup"]: r for r in rows if r.get("method") == "triton"}
    cudnn = {r["setup"]: r for r in rows if r.get("method") == "sdpa-cudnn"}
    print(f"copy rate {bw / 1e12:.2f} TB/s; table {args.table}")
    print(f"{'setup':12s} {'visible':>9s} {'MB moved':>9s} {'memory us':>10s} {'cuDNN TF/s':>10s} {'compute us':>10s} "
          f"{'floor us':>9s} {'target us':>9s} {'target/floor':>12s} {'ours graph us':>13s} {'ours/floor':>10s} "
          f"{'2-pass us':>9s} {'target/2-pass':>13s} {'ours/2-pass':>11s}")
    out = []
    for name, (B, H, n, D, make, _) in SETUPS.items():
        lay = make()
        visible = lay.density() * n * n * B * H
        tensor = B * H * n * D * 2
        moved = 21 * tensor + 4 * B * H * n * 4
        mem_us = moved / bw * 1e6
        c = cudnn.get(name)
        c_ms = c and (c.get("fwdbwd_graph_ms") or c["fwdbwd_ms"])
        rate = 14 * D * (n * (n + 1) / 2) * B * H / (c_ms * 1e-3) if c_ms else None
        comp_us = 14 * D * visible / rate * 1e6 if rate else None
        floor = max(mem_us, comp_us or 0.0)
        o = ours.get(name)
        o_ms = o and (o.get("fwdbwd_graph_ms") or o["fwdbwd_ms"])
        target = TARGETS_MS[name] * 1e3
        tensors2 = two_pass_tensors(lay)
        two = tensors2 and max((tensors2 * tensor + 6 * B * H * n * 4) / bw * 1e6, comp_us or 0.0)
        print(f"{name:12s} {visible / 1e6:8.1f}M {moved / 1e6:9.0f} {mem_us:10.0f} "
              f"{(rate or 0) / 1e12:10.0f} {comp_us or 0:10.0f} {floor:9.0f} {target:9.0f} {target / floor:12.2f} "
              f"{(o_ms or 0) * 1e3:13.0f} {(o_ms or 0) * 1e3 / floor:10.2f} " +
              (f"{two:9.0f} {target / two:13.2f} {(o_ms or 0) * 1e3 / two:11.2f}" if two else f"{'-':>9s}"))
        out.append(dict(setup=name, visible=visible, bytes=moved, memory_us=mem_us, cudnn_tflops=rate and rate / 1e12,
                        compute_us=comp_us, floor_us=floor, target_us=target, ours_graph_us=o_ms and o_ms * 1e3,
                        two_pass_us=two))
    return out


if __name__ == "__main__":
    main()
