"""Raw audio as bytes, as in the paper's classical-music runs: WAV -> mono -> 12 kHz -> 8-bit mu-law (256 levels).

The paper's Table 4 says "mu-law encoded at 12 kHz" and scores bits per byte, so one byte per sample with mu = 255.
Files (sorted by path) are concatenated into one stream and split 90/5/5 like `bytes:`. The encoded stream is cached
under the data root, keyed by the files' names, sizes and modification times.
"""
from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path

import numpy as np

from . import ByteDataset, split_stream
from .download import DataError, atomic_write_bytes

SAMPLE_RATE = 12_000
MU = 255


def mu_law_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """Samples in [-1, 1] -> uint8 codes 0..mu (ITU-T G.711-style companding, then uniform quantization)."""
    x = np.clip(x, -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)  # [-1, 1]
    return np.floor((y + 1) / 2 * mu + 0.5).astype(np.uint8)


def mu_law_decode(codes: np.ndarray, mu: int = MU) -> np.ndarray:
    y = codes.astype(np.float64) / mu * 2 - 1
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A PCM WAV file -> (mono float64 samples in [-1, 1], sample rate). 8/16/24/32-bit integer PCM."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(frames)
    except (wave.Error, EOFError) as e:
        raise DataError(f"{path}: not a PCM WAV file this reader understands ({e})") from e
    if len(raw) != frames * channels * width:
        raise DataError(f"{path}: truncated ({len(raw)} data bytes, header says {frames * channels * width})")
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128) / 128
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float64) / (1 << 23)
    elif width in (2, 4):
        x = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float64) / (1 << (8 * width - 1))
    else:
        raise DataError(f"{path}: unsupported sample width {width} bytes")
    return x.reshape(-1, channels).mean(axis=1), rate


def resample(x: np.ndarray, rate_in: int, rate_out: int, half_width: int = 16) -> np.ndarray:
    """Band-limited resampling by a Hann-windowed sinc (low-pass at the lower Nyquist rate), evaluated directly.

    half_width zero crossings on each side; cost O(len(out) * half_width / cutoff).
    """
    if rate_in == rate_out or x.size == 0:
        return x.copy()
    cutoff = min(1.0, rate_out / rate_in)  # in units of the input Nyquist rate
    reach = int(np.ceil(half_width / cutoff))
    n_out = int(np.floor(x.size * rate_out / rate_in))
    padded = np.pad(x, reach)
    out = np.empty(n_out)
    taps = np.arange(-reach + 1, reach + 1)
    for lo in range(0, n_out, 8192):
        t = np.arange(lo, min(lo + 8192, n_out)) * (rate_in / rate_out)  # output times in input samples
        base = np.floor(t).astype(np.int64)
        idx = base[:, None] + taps  # (chunk, 2 * reach)
        d = t[:, None] - idx
        window = 0.5 + 0.5 * np.cos(np.pi * np.clip(d / (reach + 1), -1, 1))
        kernel = cutoff * np.sinc(cutoff * d) * window
        out[lo:lo + t.size] = (padded[idx + reach] * kernel).sum(axis=1)
    return out


def encode_file(path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    x, rate_in = read_wav(path)
    return mu_law_encode(resample(x, rate_in, rate))


def load_audio_dir(directory: Path, cache: Path, rate: int = SAMPLE_RATE) -> ByteDataset:
    """All .wav files under `directory` as one mu-law byte stream at `rate` Hz, split 90/5/5."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() == ".wav" and p.is_file())
    if not files:
        raise DataError(f"audio:{directory}: no .wav files found. Point it at a folder of WAV files (any rate and "
                        "channel count; they are made mono, resampled to 12 kHz and mu-law encoded).")
    listing = [(str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(directory.resolve()), rate, listing]).encode()).hexdigest()[:16]
    stream_path = Path(cache) / f"{key}.u8"
    meta_path = stream_path.with_suffix(".json")
    if not (meta_path.is_file() and stream_path.is_file()
            and json.loads(meta_path.read_text())["bytes"] == stream_path.stat().st_size):
        stream_path.parent.mkdir(parents=True, exist_ok=True)
        stream = np.concatenate([encode_file(p, rate) for p in files])
        atomic_write_bytes(stream_path, stream.tobytes())
        atomic_write_bytes(meta_path, json.dumps({"bytes": int(stream.size), "files": listing}).encode())
    data = np.memmap(stream_path, dtype=np.uint8, mode="r")
    if data.size < 20:
        raise DataError(f"audio:{directory}: only {data.size} samples at {rate} Hz; too little to split 90/5/5")
    return ByteDataset(f"audio:{directory.name}", split_stream(data),
                       info={"source": str(directory), "files": len(files), "rate": rate, "mu": MU})
