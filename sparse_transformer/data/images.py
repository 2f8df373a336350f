"""Images as raster bytes, row-major with channels interleaved (HWC): CIFAR-10, ImageNet 64x64, Fashion-MNIST.

One image is one sequence: n = H * W * C (3072, 12288, 784). The official CIFAR-10 and downsampled-ImageNet arrays
are channel-planar (all R, then G, then B); they are transposed to HWC once, when the cache is prepared.
"""
from __future__ import annotations

import gzip
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from . import ByteDataset
from .download import DataError, check_marker, download as fetch_url, reset_dir, write_marker

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the CIFAR page
CIFAR10_SIZE = 170_498_071
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
IMAGENET64_COUNTS = (1_281_167, 50_000)  # train, val images in the official downsampled ImageNet 64x64


def _planar_to_hwc(rows: np.ndarray, side: int) -> np.ndarray:
    """[N, C*side*side] channel-planar -> [N, side*side*C] raster with channels interleaved."""
    n = rows.shape[0]
    return np.ascontiguousarray(rows.reshape(n, 3, side, side).transpose(0, 2, 3, 1)).reshape(n, -1)


def _open_u8(path: Path, example_len: int) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, example_len)


# ---------------------------------------------------------------------------------------------------- CIFAR-10

def load_cifar10(directory: Path, download: bool = True, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                 size: int | None = CIFAR10_SIZE, num_valid: int = 2_000) -> ByteDataset:
    """CIFAR-10 as [N, 3072] HWC bytes: the first 48k training images train, the last 2k validate, 10k test."""
    directory = Path(directory)
    prepared = directory / "prepared"
    if not check_marker(prepared):
        archive = directory / "cifar-10-python.tar.gz"
        if not archive.exists() and not download:
            raise DataError(f"CIFAR-10 not found: download {url} to {archive} (or allow downloads) and run again")
        fetch_url(url, archive, size=size, md5=md5)  # verifies an existing archive too
        _prepare_cifar10(archive, prepared)
    train = _open_u8(prepared / "train.u8", 3072)
    if not 0 < num_valid < train.shape[0]:
        raise ValueError(f"num_valid={num_valid} must be in (0, {train.shape[0]})")
    splits = {"train": train[:-num_valid], "valid": train[-num_valid:], "test": _open_u8(prepared / "test.u8", 3072)}
    return ByteDataset("cifar10", splits, example_len=3072, shape=(32, 32, 3), info={"source": url, "md5": md5})


def _prepare_cifar10(archive: Path, prepared: Path) -> None:
    reset_dir(prepared)
    parts = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    sizes = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for split, names in parts.items():
                with open(prepared / f"{split}.u8", "wb") as out:
                    for name in names:
                        if name not in members:
                            raise DataError(f"{archive}: no member {name!r}; is this cifar-10-python.tar.gz?")
                        # The archive's md5 was checked before this point, so unpickling it is safe.
                        batch = pickle.load(tar.extractfile(members[name]), encoding="bytes")
                        rows = np.asarray(batch[b"data"], dtype=np.uint8)
                        out.write(_planar_to_hwc(rows, 32).tobytes())
                sizes[f"{split}.u8"] = (prepared / f"{split}.u8").stat().st_size
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{archive}: cannot read ({e}); delete it and run again") from e
    write_marker(prepared, sizes)


# ---------------------------------------------------------------------------------------------------- ImageNet 64

def load_imagenet64(source: Path, cache: Path, num_valid: int = 10_000,
                    expected_counts: tuple | None = IMAGENET64_COUNTS) -> ByteDataset:
    """Downsampled ImageNet 64x64 from the official npz files (train_data_batch_1..10.npz, val_data.npz) in `source`.

    Splits: train = the training set less its last `num_valid` images (valid); test = the official validation set,
    which is what the paper reports on. Prepared once into `cache` as HWC bytes (about 16 GB).
    """
    source, prepared = Path(source), Path(cache) / "prepared"
    if not check_marker(prepared) or _marker_source(prepared) != str(source.resolve()):
        _prepare_imagenet64(source, prepared, expected_counts)
    train = _open_u8(prepared / "train.u8", 12288)
    splits = {"train": train[:-num_valid], "valid": train[-num_valid:], "test": _open_u8(prepared / "test.u8", 12288)}
    return ByteDataset("imagenet64", splits, example_len=12288, shape=(64, 64, 3), info={"source": str(source)})


def _marker_source(prepared: Path) -> str | None:
    import json
    return json.loads((prepared / "prepared.json").read_text()).get("source")


def _prepare_imagenet64(source: Path, prepared: Path, expected_counts: tuple | None) -> None:
    train_files = sorted(source.rglob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    val_files = sorted(source.rglob("val_data.npz"))
    if not train_files or not val_files:
        raise DataError(
            f"ImageNet 64x64 npz files not found in {source}. Download Imagenet64_train_part1_npz.zip, "
            "Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip from https://image-net.org/download-images "
            "(Downsampled ImageNet, registration needed), unzip them into one folder and pass imagenet64:FOLDER "
            "(or set IMAGENET64_DIR).")
    reset_dir(prepared)
    sizes, counts = {}, []
    for split, files in (("train", train_files), ("test", val_files)):
        count = 0
        with open(prepared / f"{split}.u8", "wb") as out:
            for path in files:
                try:
                    with np.load(path) as npz:  # a zip: member CRCs catch corruption, truncation fails to open
                        rows = npz["data"]
                except Exception as e:  # noqa: BLE001 - numpy/zipfile raise several types for damaged files
                    raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); download it again") from e
                if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 12288:
                    raise DataError(f"{path}: data {rows.dtype} {rows.shape}, expected uint8 [N, 12288]")
                out.write(_planar_to_hwc(rows, 64).tobytes())
                count += rows.shape[0]
        counts.append(count)
        sizes[f"{split}.u8"] = count * 12288
    if expected_counts is not None and tuple(counts) != tuple(expected_counts):
        raise DataError(f"{source}: {counts[0]:,} train / {counts[1]:,} val images, expected "
                        f"{expected_counts[0]:,} / {expected_counts[1]:,}; some npz files are missing or wrong")
    write_marker(prepared, sizes, {"source": str(source.resolve())})


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST

def load_fashion_mnist(directory: Path, num_valid: int = 5_000, expected_counts: tuple | None = (60_000, 10_000)
                       ) -> ByteDataset:
    """Fashion-MNIST idx files (optionally .gz) as [N, 784] bytes: 55k train / 5k valid / 10k test."""
    directory = Path(directory)
    arrays = {}
    for split, stem in (("train", "train-images-idx3-ubyte"), ("test", "t10k-images-idx3-ubyte")):
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(
                f"Fashion-MNIST not found: no {stem}[.gz] in {directory}. Install Debian's dataset-fashion-mnist "
                "package (apt install dataset-fashion-mnist), or download train-images-idx3-ubyte.gz and "
                "t10k-images-idx3-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist (data/fashion) "
                "into a folder and pass fashion-mnist:FOLDER.")
        arrays[split] = read_idx_images(path)
    if expected_counts is not None:
        got = (arrays["train"].shape[0], arrays["test"].shape[0])
        if got != tuple(expected_counts):
            raise DataError(f"{directory}: {got[0]} train / {got[1]} test images, expected {expected_counts}")
    train = arrays["train"]
    splits = {"train": train[:-num_valid], "valid": train[-num_valid:], "test": arrays["test"]}
    return ByteDataset("fashion-mnist", splits, example_len=784, shape=(28, 28, 1), info={"source": str(directory)})


def read_idx_images(path: Path) -> np.ndarray:
    """An idx3-ubyte image file (raw or gzip) -> [N, rows*cols] uint8; header and exact length checked."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip ({e}); get the file again") from e
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x803:
        raise DataError(f"{path}: not an idx3-ubyte image file (bad magic number)")
    count, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + count * rows * cols:
        raise DataError(f"{path}: {len(raw) - 16} image bytes, header says {count} x {rows} x {cols} "
                        "(truncated or corrupt); get the file again")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, rows * cols)
