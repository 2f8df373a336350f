"""Sampling: `sparse-transformer sample --checkpoint DIR --out PATH [--num N] [--complete N] [--prefix FILE] ...`.

What is written follows the run: a model with pos_emb="image" samples images (a PNG grid; with --complete N, a grid
of completions of N images of a split, the model given each image's top half), a run on "audio:..." data writes WAV
clips, and any other run writes text (UTF-8, invalid bytes as \\xNN escapes). --out ending in .png / .wav / .txt is the
file (audio with several clips: PATH's stem gets -0, -1, ...); any other --out is a folder, created if needed, that
gets samples.png, completions.png, samples.txt or samples-0.wav, samples-1.wav, ...

Sampling is model.generate (KV cache; --no-cache: full forward passes). Text and audio longer than the context
continue with a sliding window of n_ctx - 1 bytes, one full forward pass per byte (generate_long).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import outputs
from .checkpoint import CheckpointError
from .data import DataError, get_dataset
from .evaluate import load_model
from .decoding import check_sampling
from .model import SparseTransformer, SparseTransformerConfig

SUFFIXES = {"image": ".png", "text": ".txt", "audio": ".wav"}


@torch.no_grad()
def generate_long(model: SparseTransformer, prefix: torch.Tensor, num_new: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                  generator: torch.Generator | None = None, progress: bool = False,
                  compile: bool = False) -> torch.Tensor:
    """model.generate past n_ctx: prefix [B, t] int64 (t < n_ctx) -> [B, t + num_new] int64 on the model's device.

    The first n_ctx - t bytes come from one model.generate call; each byte after that from one full forward pass
    over the n_ctx - 1 bytes before it (the context slides). Example: generate_long(model, torch.zeros(4, 0,
    dtype=torch.long), 1000) gives 4 unconditional streams of 1000 bytes.
    """
    n_ctx, (batch, t) = model.cfg.n_ctx, prefix.shape
    if t >= n_ctx:
        raise ValueError(f"the prefix has {t} bytes; it must be shorter than the model's context n_ctx={n_ctx}")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    first = min(num_new, n_ctx - t)
    head = model.generate(prefix, first, use_cache=use_cache, progress=progress, compile=compile,
                          **sampling)  # (B, t + first)
    if first == num_new:
        return head
    out = torch.empty(batch, t + num_new, dtype=torch.long, device=head.device)
    out[:, :t + first] = head
    positions = range(t + first, t + num_new)
    if progress:
        from tqdm import tqdm

        positions = tqdm(positions, desc="sampling (sliding window)", unit="pos", dynamic_ncols=True)
    for s in positions:
        out[:, s] = model.generate(out[:, s - n_ctx + 1:s], 1, use_cache=False, **sampling)[:, -1]
    return out


def modality(cfg: SparseTransformerConfig, data_spec: str) -> str:
    """"image" (pos_emb="image"), "audio" (data spec audio:...) or "text" (everything else)."""
    if cfg.pos_emb == "image":
        return "image"
    return "audio" if data_spec.lower().startswith("audio") else "text"


def output_paths(out: str | Path, kind: str, name: str, count: int = 1) -> list[Path]:
    """Where to write (see the module docstring): `count` paths; parent folders are created."""
    path, suffix = Path(out), SUFFIXES[kind]
    if path.suffix.lower() in SUFFIXES.values():
        if path.suffix.lower() != suffix:
            raise ValueError(f"--out {out}: this {kind} model writes {suffix} files (or give a folder)")
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder; name a {suffix} file or a folder")
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{name}{suffix}"
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def given_bytes(shape: tuple) -> int:
    """Bytes of an image given for completion: the first half, rounded down to whole rows of W * C bytes."""
    h, w, c = shape
    return (h * w * c // 2) // (w * c) * (w * c)


def read_prefix(path: str, kind: str) -> bytes:
    """--prefix: a file's bytes (text; audio already mu-law), or for audio a .wav file, mu-law encoded at 12 kHz."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prefix {path}: no such file")
    if kind == "audio" and path.suffix.lower() == ".wav":
        from .data.audio import encode_file

        try:
            return encode_file(path).tobytes()
        except DataError as e:
            raise ValueError(f"--prefix: {e}") from e
    return path.read_bytes()


def load_images(spec: str, root: str | None, split: str, count: int, shape: tuple) -> np.ndarray:
    """The first `count` images of a split as [count, H * W * C] uint8 (the first n_ctx bytes of each example)."""
    dataset = get_dataset(spec, root=root)
    n = int(np.prod(shape))
    if dataset.example_len is None or dataset.example_len < n or (dataset.shape and dataset.shape[1:] != shape[1:]):
        raise ValueError(f"--complete: {dataset.name} examples (shape {dataset.shape}) do not hold this model's "
                         f"{tuple(shape)} images")
    images = dataset.split(split)
    if count > images.shape[0]:
        raise ValueError(f"--complete {count}: the {split} split has only {images.shape[0]} images")
    return np.asarray(images[:count, :n])


def _check(args: argparse.Namespace, kind: str, cfg: SparseTransformerConfig) -> None:
    """Reject flags that do not fit the model or each other, before any work."""
    if args.complete is not None and kind != "image":
        raise ValueError(f"--complete needs an image model (pos_emb='image'); this one samples {kind}")
    if kind == "image" and args.prefix:
        raise ValueError("--prefix is for text and audio; for images use --complete N (the top half of N images)")
    if kind == "image" and args.length is not None:
        raise ValueError(f"--length is for text and audio; an image is always n_ctx={cfg.n_ctx} bytes")
    for flag in ("num", "complete", "length", "top_k", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value} must be >= 1")
    check_sampling(args.temperature, args.top_k, args.top_p)


def _load(checkpoint: str, device: str) -> tuple[SparseTransformer, dict]:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint {checkpoint}: no such run or checkpoint folder")
    try:
        return load_model(checkpoint, device)
    except CheckpointError as e:
        raise ValueError(str(e)) from e


def _generate(model, prefix: np.ndarray, num_new: int, args, generator) -> tuple[np.ndarray, float]:
    """Sample with the CLI's settings and a progress bar: (tokens [B, t + num_new] uint8, seconds)."""
    start = time.perf_counter()
    parts = []
    for i in range(0, len(prefix), args.batch_size):  # at most --batch-size sequences (and caches) at once
        out = generate_long(model, torch.from_numpy(prefix[i:i + args.batch_size]).long(), num_new, args.temperature,
                            args.top_k, args.top_p, use_cache=not args.no_cache, generator=generator, progress=True,
                            compile=args.compile)
        parts.append(out.cpu().numpy().astype(np.uint8))
    return np.concatenate(parts), time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    parser.add_argument("--out", required=True, help="a .png / .wav / .txt file, or a folder that gets "
                        "samples.png, completions.png, samples.txt or samples-0.wav, samples-1.wav, ...")
    parser.add_argument("--num", type=int, default=None, help="samples (default 16 images, 4 texts or clips); with "
                        "--complete, completions per image (default 4)")
    parser.add_argument("--complete", type=int, default=None, metavar="N", help="images: complete the top half of "
                        "the first N images of --split")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split for --complete")
    parser.add_argument("--data", default=None, help="data spec for --complete (default: the run's)")
    parser.add_argument("--prefix", default=None, metavar="FILE", help="text / audio prompt: the file's bytes (audio: "
                        "a .wav file is mu-law encoded first)")
    parser.add_argument("--length", type=int, default=None, help="text / audio bytes to sample after the prompt "
                        "(default: fill the context, n_ctx - prompt; more slides the context)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (paper: 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k likeliest bytes")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the likeliest bytes up to mass p")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences sampled at once (memory: one key/value "
                        "cache of n_ctx positions per sequence and layer)")
    parser.add_argument("--no-cache", action="store_true", help="full forward passes instead of the KV cache (slow)")
    parser.add_argument("--compile", action="store_true", help="run the cached step's blocks through torch.compile "
                        "(fewer kernels per step; the first step compiles)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])


def _complete_images(model, config, kind, args, generator) -> tuple[list[Path], np.ndarray, int, float]:
    """--complete N: the top half of N images of the split, --num completions each, drawn as one grid."""
    cfg, num = model.cfg, args.num or 4
    try:
        originals = load_images(args.data or config["data"]["spec"], config["train"].get("data_root") or None,
                                args.split, args.complete, cfg.image_shape)  # (N, n_ctx)
    except DataError as e:
        raise ValueError(str(e)) from e
    given, paths = given_bytes(cfg.image_shape), output_paths(args.out, kind, "completions")
    tokens, seconds = _generate(model, originals[:, :given].repeat(num, axis=0), cfg.n_ctx - given, args, generator)
    outputs.write_completion_grid(originals, tokens.reshape(args.complete, num, -1), given, cfg.image_shape, paths[0])
    return paths, tokens, cfg.n_ctx - given, seconds


def _sample_images(model, config, kind, args, generator) -> tuple[list[Path], np.ndarray, int, float]:
    """--num unconditional images as one grid."""
    cfg, paths = model.cfg, output_paths(args.out, kind, "samples")
    tokens, seconds = _generate(model, np.zeros((args.num or 16, 0), dtype=np.uint8), cfg.n_ctx, args, generator)
    outputs.write_image_grid(tokens, cfg.image_shape, paths[0])
    return paths, tokens, cfg.n_ctx, seconds


def _sample_stream(model, config, kind, args, generator) -> tuple[list[Path], np.ndarray, int, float]:
    """--num texts (one file) or audio clips (a file each), each the prompt and then --length sampled bytes."""
    num, prompt = args.num or 4, read_prefix(args.prefix, kind) if args.prefix else b""
    length = args.length or model.cfg.n_ctx - len(prompt)
    prefix = np.frombuffer(prompt, dtype=np.uint8)[None].repeat(num, axis=0)  # (num, t)
    paths = output_paths(args.out, kind, "samples", count=1 if kind == "text" else num)
    tokens, seconds = _generate(model, prefix, length, args, generator)
    if kind == "text":
        outputs.write_text([row.tobytes() for row in tokens], paths[0])
    else:
        for row, path in zip(tokens, paths):
            outputs.write_wav(row, path)
    return paths, tokens, length, seconds


def main(args: argparse.Namespace) -> int:
    model, config = _load(args.checkpoint, args.device)
    kind = modality(model.cfg, config["data"]["spec"])
    _check(args, kind, model.cfg)
    generator = torch.Generator(device=model.head.weight.device).manual_seed(args.seed)
    run = _complete_images if args.complete is not None else _sample_images if kind == "image" else _sample_stream
    paths, tokens, positions, seconds = run(model, config, kind, args, generator)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(f"{tokens.shape[0]} samples x {positions} positions in {seconds:.2f} s: {tokens.shape[0] / seconds:.2f} "
          f"samples/s, {1000 * seconds / positions:.2f} ms per position ({model.head.weight.device}, "
          f"{'full passes' if args.no_cache else 'KV cache'})")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m sparse_transformer.sample", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
