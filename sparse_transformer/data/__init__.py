"""Byte datasets (vocabulary 256) with the paper's train/valid/test splits, and deterministic batches.

`get_dataset(spec)` resolves a data spec:
    enwik8              first 90M / next 5M / last 5M bytes of enwik8 (downloaded, checksum verified)
    cifar10             32x32x3 images as HWC raster bytes, n = 3072; 48k train / 2k valid / 10k test (downloaded)
    imagenet64[:DIR]    64x64x3, n = 12288, from the official downsampled-ImageNet npz files in DIR
    fashion-mnist[:DIR] 28x28x1, n = 784, idx files (default /usr/share/datasets/fashion-mnist/)
    bytes:PATH          any file as bytes, 90/5/5 split
    audio:DIR           WAV files -> mono, 12 kHz, 8-bit mu-law, 90/5/5 split of the concatenation
    python-stdlib[:N]   the running Python's standard-library sources (first N bytes, default 4M), 90/5/5: the demo's
                        data, on every machine, no download

Batches are a pure function of (seed, step): resuming at step s draws exactly the batches an uninterrupted run draws,
and the global batch is the same whatever the number of processes (each rank takes its slice).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .download import DataError, cache_root

SPLITS = ("train", "valid", "test")
_ALIASES = {"val": "valid", "validation": "valid"}


@dataclass
class ByteDataset:
    """uint8 token arrays per split: [N] for streams (text, audio) or [num_examples, example_len] for images."""

    name: str
    splits: dict  # "train" | "valid" | "test" -> np.ndarray (uint8; may be a read-only memmap)
    example_len: int | None = None  # bytes per example (images); None for streams
    shape: tuple | None = None  # (H, W, C) of an image example
    info: dict = field(default_factory=dict)  # provenance: source files, checksums, split sizes

    def __post_init__(self):
        for name, array in self.splits.items():
            if array.dtype != np.uint8:
                raise ValueError(f"split {name!r}: dtype {array.dtype}, expected uint8")
            if self.example_len is not None and (array.ndim != 2 or array.shape[1] != self.example_len):
                raise ValueError(f"split {name!r}: shape {array.shape}, expected [num_examples, {self.example_len}]")

    def split(self, name: str) -> np.ndarray:
        name = _ALIASES.get(name, name)
        if name not in self.splits:
            raise ValueError(f"{self.name} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def num_tokens(self, name: str) -> int:
        return int(self.split(name).size)

    def check_context(self, n_ctx: int) -> None:
        if self.example_len is not None and n_ctx > self.example_len:
            raise ValueError(f"n_ctx={n_ctx} is longer than one {self.name} example ({self.example_len} bytes)")
        for name in SPLITS:
            if name in self.splits and self.example_len is None and self.num_tokens(name) < n_ctx:
                raise ValueError(f"{self.name} split {name!r} has {self.num_tokens(name)} bytes, fewer than "
                                 f"n_ctx={n_ctx}")

    def batch(self, split: str, step: int, batch_size: int, n_ctx: int, seed: int) -> np.ndarray:
        """The global batch for `step`: [batch_size, n_ctx] uint8, a pure function of (seed, split, step).

        Streams: random windows. Images: epochs of a fixed per-epoch permutation (each image once per epoch); an
        n_ctx shorter than an image takes its first n_ctx bytes.
        """
        data = self.split(split)
        if self.example_len is None:
            rng = np.random.default_rng([seed, SPLITS.index(_ALIASES.get(split, split)), step])
            starts = rng.integers(0, data.size - n_ctx + 1, size=batch_size)
            return np.asarray(data[starts[:, None] + np.arange(n_ctx)])
        count = data.shape[0]
        positions = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offsets = np.divmod(positions, count)
        rows = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            perm = _permutation(seed, int(epoch), count)
            rows[epochs == epoch] = perm[offsets[epochs == epoch]]
        return np.asarray(data[rows, :n_ctx])

    def eval_windows(self, split: str, n_ctx: int, min_context: int = 0):
        """Windows that score every token of the split once: yields (window [n_ctx] uint8, score_from).

        Positions score_from..n_ctx-1 of the window are scored. Images: each example, all positions. Streams:
        non-overlapping windows (min_context=0), or the paper's sliding protocol where every scored byte after the
        first window sees at least `min_context` bytes of context (windows advance by n_ctx - min_context). A last
        short remainder is scored at the end of a window that ends at the split's end.
        """
        data = self.split(split)
        if self.example_len is not None:
            for row in range(data.shape[0]):
                yield np.asarray(data[row, :n_ctx]), 0
            return
        if not 0 <= min_context < n_ctx:
            raise ValueError(f"min_context={min_context} must be in [0, n_ctx={n_ctx})")
        total = data.size
        if total < n_ctx:
            raise ValueError(f"split {split!r} has {total} bytes, fewer than n_ctx={n_ctx}")
        yield np.asarray(data[:n_ctx]), 0
        scored = n_ctx  # tokens [0, scored) are done
        advance = n_ctx - min_context
        while scored < total:
            end = min(scored + advance, total)
            start = end - n_ctx
            yield np.asarray(data[start:end]), n_ctx - (end - scored)
            scored = end

    def num_eval_windows(self, split: str, n_ctx: int, min_context: int = 0) -> int:
        data = self.split(split)
        if self.example_len is not None:
            return data.shape[0]
        remaining = data.size - n_ctx
        return 1 + -(-remaining // (n_ctx - min_context))


_PERMUTATIONS: dict = {}


def _permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    key = (seed, epoch, count)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 4:
            _PERMUTATIONS.clear()
        _PERMUTATIONS[key] = np.random.default_rng([seed, 1000 + epoch]).permutation(count)
    return _PERMUTATIONS[key]


def split_stream(data: np.ndarray, fractions=(0.90, 0.05, 0.05)) -> dict:
    """Contiguous train/valid/test split of a byte stream by fractions (the paper's 90/5/5 for enwik8)."""
    n = data.size
    a = int(round(n * fractions[0]))
    b = a + int(round(n * fractions[1]))
    return {"train": data[:a], "valid": data[a:b], "test": data[b:]}


def get_dataset(spec: str, root: str | os.PathLike | None = None, download: bool = True) -> ByteDataset:
    """Resolve a data spec (see the module docstring) to a ByteDataset.

    root: cache directory for downloads and prepared arrays (default $SPARSE_TRANSFORMER_DATA or
    ~/.cache/sparse-transformer). download: allow network downloads (enwik8, cifar10); if False and the files are
    absent, raise DataError saying how to get them.
    """
    name, _, arg = spec.partition(":")
    name = name.lower()
    base = cache_root(root)
    if name == "enwik8":
        from .text import load_enwik8
        return load_enwik8(base / "enwik8", download=download)
    if name == "bytes":
        from .text import load_bytes
        if not arg:
            raise ValueError("bytes:PATH needs a file path, e.g. bytes:/data/corpus.txt")
        return load_bytes(Path(arg))
    if name == "python-stdlib":
        from .text import load_python_stdlib
        return load_python_stdlib(int(arg) if arg else 4_000_000)
    if name == "cifar10":
        from .images import load_cifar10
        return load_cifar10(base / "cifar10", download=download)
    if name == "imagenet64":
        from .images import load_imagenet64
        source = Path(arg) if arg else Path(os.environ.get("IMAGENET64_DIR", base / "imagenet64" / "source"))
        return load_imagenet64(source, base / "imagenet64")
    if name == "fashion-mnist":
        from .images import FASHION_MNIST_DIR, load_fashion_mnist
        return load_fashion_mnist(Path(arg) if arg else Path(FASHION_MNIST_DIR))
    if name == "audio":
        from .audio import load_audio_dir
        if not arg:
            raise ValueError("audio:DIR needs a folder of .wav files, e.g. audio:/data/music")
        return load_audio_dir(Path(arg), base / "audio")
    raise ValueError(f"unknown data spec {spec!r}: use enwik8, cifar10, imagenet64[:DIR], fashion-mnist[:DIR], "
                     "bytes:PATH, audio:DIR or python-stdlib")


__all__ = ["ByteDataset", "DataError", "SPLITS", "get_dataset", "split_stream"]
