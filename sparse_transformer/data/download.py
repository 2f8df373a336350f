"""Downloads and file checks shared by the dataset loaders.

A download streams into `<dest>.part-<pid>` with a progress bar, is checked (size and md5/sha256) and only then renamed
onto `dest` (os.replace), so an interrupted or corrupt transfer never leaves a file that looks finished. A file already at
`dest` is checked the same way before use; if it fails, the loader stops with the expected and actual values instead of
training on it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path

from tqdm import tqdm


class DataError(RuntimeError):
    """A dataset is missing, truncated or corrupt. The message says what to do."""


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """Where downloaded and prepared data live: `root`, else $SPARSE_TRANSFORMER_DATA, else ~/.cache/sparse-transformer."""
    if root is not None:
        return Path(root)
    env = os.environ.get("SPARSE_TRANSFORMER_DATA")
    return Path(env) if env else Path.home() / ".cache" / "sparse-transformer"


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, size: int | None = None, md5: str | None = None,
                sha256: str | None = None) -> None:
    """Raise DataError unless `path` exists with the given size and digests (each check optional)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DataError(f"{path}: {actual:,} bytes, expected {size:,} (truncated or the wrong file); delete it and "
                        "run again to download or prepare it afresh")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise DataError(f"{path}: {algorithm} {got}, expected {expected} (corrupt or the wrong file); delete "
                                "it and run again to download it afresh")


def download(url: str, dest: str | os.PathLike, size: int | None = None, md5: str | None = None,
             sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` unless a verified copy is already there; return dest.

    Works with http(s):// and file:// URLs (tests use a local server and file URLs). The bytes go to a temporary file
    beside dest and are renamed onto it only after the size/checksum checks pass, so dest is either absent or good.
    """
    dest = Path(dest)
    if dest.exists():
        verify_file(dest, size, md5, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total else size
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}",
                       disable=not progress, leave=False)
            with bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        try:
            verify_file(tmp, size, md5, sha256)
        except DataError as e:
            raise DataError(f"download of {url} failed its check: {e}") from None
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"could not download {url}: {e}. Download it by hand to {dest} (checked on the next run).") \
            from e
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def write_marker(directory: Path, files: dict[str, int], info: dict | None = None) -> None:
    """Record the sizes of prepared files (written last, atomically): their presence marks a finished preparation."""
    tmp = directory / "prepared.json.tmp"
    tmp.write_text(json.dumps({"files": files, **(info or {})}, indent=1))
    os.replace(tmp, directory / "prepared.json")


def check_marker(directory: Path) -> bool:
    """True if `directory` holds a finished preparation whose files all have their recorded sizes."""
    marker = directory / "prepared.json"
    if not marker.is_file():
        return False
    files = json.loads(marker.read_text())["files"]
    for name, size in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def reset_dir(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
