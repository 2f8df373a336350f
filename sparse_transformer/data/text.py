"""Text as bytes: enwik8 (downloaded and verified) and any file (`bytes:PATH`)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from . import ByteDataset, split_stream
from .download import DataError, download as fetch_url, verify_file

# Matt Mahoney's Hutter Prize file (http://mattmahoney.net/dc/textdata.html). The archive's size and sha256 and the
# member's md5 (from Mahoney's own listing) are the widely published values; both are checked.
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_ZIP_SIZE = 36_445_475
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # paper: first 90M train, last 10M valid+test (blocksparse: 5M/5M)


def load_enwik8(directory: Path, download: bool = True, url: str = ENWIK8_URL, zip_size: int | None = ENWIK8_ZIP_SIZE,
                zip_sha256: str | None = ENWIK8_ZIP_SHA256, size: int = ENWIK8_SIZE, md5: str | None = ENWIK8_MD5,
                split: tuple = ENWIK8_SPLIT) -> ByteDataset:
    """enwik8 with the 90M/5M/5M split, kept in `directory` as enwik8.zip and the extracted 100 MB file.

    url/zip_size/zip_sha256/size/md5/split are parameters so tests can serve a tiny stand-in; the defaults are the
    real file's published values.
    """
    directory = Path(directory)
    raw = directory / "enwik8"
    if not (raw.is_file() and raw.stat().st_size == size):
        archive = directory / "enwik8.zip"
        if not archive.exists() and not download:
            raise DataError(f"enwik8 not found in {directory}. Download {url} to {archive} (or allow downloads) "
                            f"and run again.")
        fetch_url(url, archive, size=zip_size, sha256=zip_sha256)
        _extract_member(archive, "enwik8", raw, size, md5)
    else:
        verify_file(raw, size=size, md5=md5)  # about 0.2 s: a silently corrupted copy is never trained on
    data = np.memmap(raw, dtype=np.uint8, mode="r")
    a, b, c = split
    if data.size != a + b + c:
        raise DataError(f"{raw}: {data.size} bytes, expected {a + b + c}")
    splits = {"train": data[:a], "valid": data[a:a + b], "test": data[a + b:]}
    return ByteDataset("enwik8", splits, info={"source": url, "md5": md5, "split": list(split)})


def _extract_member(archive: Path, member: str, dest: Path, size: int, md5: str | None) -> None:
    tmp = dest.with_name(dest.name + ".part")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 22):
                out.write(block)
    except (zipfile.BadZipFile, KeyError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{archive}: cannot extract {member!r} ({e}); delete the archive and run again") from e
    try:
        verify_file(tmp, size=size, md5=md5)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dest)


def load_bytes(path: Path) -> ByteDataset:
    """Any file as a byte stream, split 90/5/5 in order (train first)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"bytes:{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"bytes:{path}: the file is empty")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return ByteDataset(f"bytes:{path.name}", split_stream(data), info={"source": str(path), "split": [0.9, 0.05, 0.05]})


def load_python_stdlib(max_bytes: int = 4_000_000) -> ByteDataset:
    """The running Python's own standard-library sources (*.py, sorted by path, concatenated, cut at max_bytes) as one
    byte stream, split 90/5/5. Real text that every machine with Python has: the demo's data, no download."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    chunks, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        try:
            chunks.append(path.read_bytes()[:max_bytes - total])
        except OSError:
            continue
        total += len(chunks[-1])
    if total < 100_000:
        raise DataError(f"python-stdlib: only {total} bytes of .py files under {root}")
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return ByteDataset("python-stdlib", split_stream(data), info={"source": str(root), "files": len(chunks)})
