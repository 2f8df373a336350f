"""`sparse-transformer demo`: train the `demo` preset on real bytes on any machine, evaluate, sample, and report.

No download and no GPU: the data is the running Python's own standard-library source code (`python-stdlib`, found
through `sysconfig`), 4 MB split 90/5/5. A few minutes on 2 CPU cores. The report folder holds loss.png, layout.png
(the attention pattern the model uses), sample.txt, eval.json and report.md; its path is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from . import evaluate as evaluation
from . import train
from .data import get_dataset
from .sample import generate_long

PROMPT = b"def "


def sample_bytes(model, prompt: bytes, length: int, temperature: float = 1.0, seed: int = 0) -> bytes:
    """Sample `length` bytes after `prompt` with model.generate (KV cache); past n_ctx the context slides, one full
    forward pass per byte (sample.generate_long)."""
    generator = torch.Generator(device=model.head.weight.device).manual_seed(seed)
    prefix = torch.tensor([list(prompt)], dtype=torch.long)  # (1, t)
    return bytes(generate_long(model, prefix, length, temperature, generator=generator)[0].tolist())


def draw_layout(model, path: Path) -> Path:
    """The first layer's layout, head 0, drawn like the paper's Figure 3 (pictures.draw_layout)."""
    from .pictures import draw_layout as draw

    return Path(draw(model.layer_layouts(model.cfg.n_ctx)[0], str(path)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="sparse-transformer-demo", help="report folder (the run is in OUT/run; "
                        "rerunning resumes or reuses it)")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the demo preset's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sample-bytes", type=int, default=600, help="bytes to sample after the prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="model/train overrides, as for train")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    status = train.main(argparse.Namespace(preset="demo", out=str(out / "run"), data="python-stdlib",
                                           max_steps=args.max_steps, device=args.device, ckpt_every=None,
                                           set=args.set or []))
    if status != 0:
        return status
    train_seconds = time.perf_counter() - start
    model, config = evaluation.load_model(out / "run", args.device)
    dataset = get_dataset(config["data"]["spec"])
    result = evaluation.evaluate(model, dataset, "test")
    result.update(data=config["data"]["spec"], step=config["step"])
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    text = sample_bytes(model, PROMPT, args.sample_bytes, args.temperature)
    (out / "sample.txt").write_bytes(text)
    if (out / "run" / "loss.png").is_file():
        shutil.copy(out / "run" / "loss.png", out / "loss.png")
    draw_layout(model, out / "layout.png")
    cfg = model.cfg
    report = [
        "# sparse-transformer demo",
        "",
        f"- model: {model.summary()}",
        f"- data: {dataset.name} ({dataset.info.get('files')} files from {dataset.info.get('source')}), "
        + ", ".join(f"{k} {v.size:,} bytes" for k, v in dataset.splits.items()),
        f"- trained {config['step']} steps in {train_seconds:.0f} s (run folder: {out / 'run'})",
        f"- test: **{result['bits_per_dim']:.4f} bits/byte** over all {result['tokens_scored']:,} test bytes "
        f"(non-overlapping windows of {cfg.n_ctx}); a byte-uniform model scores 8",
        "",
        "loss.png: train and validation bits/byte per step. layout.png: which keys (columns) each query (row) of the "
        f"first layer's first head attends to ({cfg.pattern}, stride {cfg.stride}, summary {cfg.summary}).",
        "",
        f"## Sample (temperature {args.temperature}, prompt {PROMPT.decode()!r})",
        "",
        "```",
        text.decode("utf-8", errors="replace"),
        "```",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n")
    print(f"\ntest {result['bits_per_dim']:.4f} bits/byte; sample:\n{text.decode('utf-8', errors='replace')}\n")
    print(f"report: {out.resolve()}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m sparse_transformer.demo", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
