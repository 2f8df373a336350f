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
- probe (--probe, on a GPU): the memory floors measured instead of computed. The same protocol runs with every kernel
  replaced by a byte mover (`_move`: one Triton kernel that reads its input tensors and writes its outputs, no
  attention math): one pass (forward q, k, v -> o; backward q, k, v, o, dO -> dQ, dK, dV), and for the strided
  setups two (each direction again: q, k, v, o -> o; q, k, v, dO, dQ, dK, dV -> dQ, dK, dV), then autograd's three
  `.grad` additions (the `add_` that AccumulateGrad runs). Graph-replayed medians, beside our own fwd+bwd timed the
  same way in the same run. L2 hits count for the movers as they would for a kernel (a pass reading what the one
  before it wrote); the fp32 log-sum-exp and Delta rows are left out.
Usage: python bench/floor.py [--table bench/results/attention-*.json] [--bandwidth 4.3e12] [--probe [--out DIR]]"""
import argparse
import datetime
import glob
import json
import os

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


def _mover():
    """The byte mover: `_move(ins, outs)` reads every tensor of `ins` (up to 7, contiguous, same numel) and writes their
    sum to every tensor of `outs` (up to 3), in one kernel launch. Built on first use (Triton is imported here only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _move_kernel(ins, outs, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < numel
        acc = tl.zeros([BLOCK], tl.float32)
        for i in tl.static_range(len(ins)):
            acc += tl.load(ins[i] + offs, mask=ok, other=0.0).to(tl.float32)
        for i in tl.static_range(len(outs)):
            tl.store(outs[i] + offs, acc.to(outs[i].dtype.element_ty), mask=ok)

    def move(ins, outs, block=4096):
        ts = list(ins) + list(outs)
        if not 1 <= len(ins) <= 7 or not 1 <= len(outs) <= 3:
            raise ValueError(f"1-7 inputs and 1-3 outputs, got {len(ins)} and {len(outs)}")
        if any(not t.is_contiguous() or t.numel() != ts[0].numel() for t in ts):
            raise ValueError("the mover takes contiguous tensors of one size")
        _move_kernel[(triton.cdiv(ts[0].numel(), block),)](tuple(ins), tuple(outs), ts[0].numel(), BLOCK=block,
                                                          num_warps=8)

    return move


def protocol_passes(two_pass: bool):
    """The probe's steps, in order: ("move", inputs, outputs) by tensor name, or ("add", .grad, new gradient)."""
    steps = [("move", "q k v", "o")]
    if two_pass:
        steps.append(("move", "q k v o", "o"))
    steps.append(("move", "q k v o do", "dq dk dv"))
    if two_pass:
        steps.append(("move", "q k v do dq dk dv", "dq dk dv"))
    return steps + [("add", "gq", "dq"), ("add", "gk", "dk"), ("add", "gv", "dv")]


def step_tensors(steps) -> int:
    """B x H x n x d tensors the steps read and write (an addition reads two and writes one)."""
    return sum(len(a.split()) + len(b.split()) + (kind == "add") for kind, a, b in steps)


def _probe_setup(name, move) -> dict:
    """One setup's row of probe(): the movers' and our graph-replayed fwd+bwd, ms."""
    from sparse_transformer.attention import sparse_attention
    from sparse_transformer.bench import _time_graph, graph_ms

    B, H, n, D, make, _ = SETUPS[name]
    lay = make()
    t = {x: torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16) for x in "q k v o do dq dk dv gq gk gv".split()}
    row = dict(setup=name)
    for label, two in (("one_pass", False), ("two_pass", True)):
        steps = protocol_passes(two)
        if two and two_pass_tensors(lay) != step_tensors(steps):  # two segments, the second reading all of K and V
            continue  # (not the gathered summary, whose second pass reads c of every L rows of them)

        def run(steps=steps):
            for kind, a, b in steps:
                if kind == "move":
                    move([t[x] for x in a.split()], [t[x] for x in b.split()])
                else:
                    t[a].add_(t[b])

        row[label + "_ms"] = graph_ms(run)
        row[label + "_tensors"] = step_tensors(steps)
    q, k, v = (t[x].clone().requires_grad_() for x in "qkv")
    for x in (q, k, v):
        x.grad = torch.randn_like(x)  # the protocol's timed calls add into a .grad already set
    row["ours_ms"] = _time_graph(lambda: sparse_attention(q, k, v, lay, backend="triton"), t["do"])[1]
    row["target_ms"] = TARGETS_MS[name]
    return row


def probe(setups, out_dir="bench/results"):
    """Measured floors (see the docstring) and our fwd+bwd, graph-replayed in one run; rows written as JSON."""
    from sparse_transformer.bench import _versions

    move = _mover()
    dev, tv, trv = _versions()
    rows = []
    for name in setups:
        rows.append(dict(_probe_setup(name, move), device=dev, torch=tv, triton=trv))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    print(f"{'setup':12s} {'1-pass mover ms':>15s} {'2-pass mover ms':>15s} {'ours ms':>8s} {'target ms':>9s} "
          f"{'target/1-pass':>13s} {'target/2-pass':>13s}")
    for r in rows:
        two = r.get("two_pass_ms")
        print(f"{r['setup']:12s} {r['one_pass_ms']:15.3f} " + (f"{two:15.3f}" if two else f"{'-':>15s}") +
              f" {r['ours_ms']:8.3f} {r['target_ms']:9.3f} {r['target_ms'] / r['one_pass_ms']:13.2f} " +
              (f"{r['target_ms'] / two:13.2f}" if two else f"{'-':>13s}"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"floor-probe-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {path}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", default=latest_table(), help="a `bench attention` JSON (ours and sdpa-cudnn rows)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s when no GPU is here (default 4.3e12, "
                   "an H200's measured copy rate)")
    p.add_argument("--probe", action="store_true", help="measure the floors with byte movers on this GPU (see the "
                   "docstring), beside our fwd+bwd")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--out", default="bench/results", help="where --probe writes its JSON")
    args = p.parse_args()
    if args.probe:
        return probe(args.setups, args.out)
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
