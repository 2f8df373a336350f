"""Evaluation: `sparse-transformer eval --checkpoint DIR [--split test] [--min-context M]` -> bits per dim, as JSON.

Every byte of the split is scored exactly once (the paper's way). Images: each image is one sequence. Streams (text,
audio): non-overlapping windows of n_ctx by default, so the context of a scored byte ranges over 0..n_ctx-1; with
--min-context M, windows slide by n_ctx - M and score only their last n_ctx - M bytes, so every byte after the first
window sees at least M bytes of context (paper Table 3: 0.9952 bits/byte at M = 6,144 ... 0.9908 at 12,160).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .data import get_dataset
from .model import SparseTransformer
from .presets import config_from_dict


@torch.no_grad()
def evaluate(model: SparseTransformer, dataset, split: str = "test", min_context: int = 0, batch_size: int = 8,
             max_windows: int | None = None, precision: str = "auto", progress: bool = True) -> dict:
    """Bits per dim of `split` under `model`: sum of per-byte NLL in bits / bytes scored, accumulated in float64.

    Windows with the same number of scored positions run together in batches of batch_size.
    max_windows: stop early (the result then says "complete": false).
    """
    from tqdm import tqdm

    model.eval()
    device = next(model.parameters()).device
    n_ctx = model.cfg.n_ctx
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    total_windows = dataset.num_eval_windows(split, n_ctx, min_context)
    limit = total_windows if max_windows is None else min(max_windows, total_windows)
    bits, scored, done = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=limit, unit="window", disable=not progress, dynamic_ncols=True, desc=f"eval {split}")
    pending, pending_from = [], None

    def flush():
        nonlocal bits, scored
        tokens = torch.from_numpy(_stack(pending)).to(device)
        with autocast:
            mean = model.loss(tokens, pending_from).double().item()
        count = tokens.shape[0] * (tokens.shape[1] - pending_from)
        bits += mean * count
        scored += count
        bar.update(tokens.shape[0])
        bar.set_postfix_str(f"{bits / scored:.4f} bits/dim")
        pending.clear()

    for window, score_from in dataset.eval_windows(split, n_ctx, min_context):
        if done == limit:
            break
        if pending and (score_from != pending_from or len(pending) == batch_size):
            flush()
        pending.append(window)
        pending_from = score_from
        done += 1
    if pending:
        flush()
    bar.close()
    seconds = time.perf_counter() - start
    return {"split": split, "bits_per_dim": bits / scored, "nats_per_dim": bits / scored * math.log(2),
            "tokens_scored": scored, "windows": done, "complete": done == total_windows, "n_ctx": n_ctx,
            "min_context": min_context, "seconds": round(seconds, 2), "tokens_per_s": round(scored / seconds, 1)}


def _stack(windows):
    import numpy as np

    return np.stack(windows)


def load_model(checkpoint: str | Path, device: str = "auto") -> tuple[SparseTransformer, dict]:
    """A trained model (eval mode) and its run config from a run folder or checkpoint folder."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = load_checkpoint(checkpoint)
    model = SparseTransformer(config_from_dict(ckpt.config["model"]))
    model.load_state_dict(ckpt.model)
    model.to(device).eval()
    return model, {**ckpt.config, "checkpoint": str(ckpt.path), "step": ckpt.step}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to score")
    parser.add_argument("--min-context", type=int, default=0, help="sliding windows: every scored byte after the "
                        "first window sees at least this many bytes of context (0 = non-overlapping windows)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--data", default=None, help="data spec (default: the run's)")
    parser.add_argument("--data-root", default=None, help="download / cache folder (default: the run's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 on CUDA")
    parser.add_argument("--max-windows", type=int, default=None, help="score only this many windows (a quick, "
                        "partial number; the JSON says complete: false)")
    parser.add_argument("--out", default=None, help="JSON file to write (default: <run>/eval-<split>.json)")


def main(args: argparse.Namespace) -> int:
    model, config = load_model(args.checkpoint, args.device)
    spec = args.data or config["data"]["spec"]
    dataset = get_dataset(spec, root=args.data_root or config["train"].get("data_root") or None)
    result = evaluate(model, dataset, args.split, args.min_context, args.batch_size, args.max_windows, args.precision)
    result.update(data=spec, checkpoint=config["checkpoint"], step=config["step"])
    ckpt = Path(config["checkpoint"])
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    out = Path(args.out) if args.out else run_dir / f"eval-{args.split}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m sparse_transformer.evaluate", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
