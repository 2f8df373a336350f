"""Writers for sampled bytes: image grids and completion grids (PNG), audio clips (WAV), text (UTF-8).

Images are HWC raster bytes (C = 1 greyscale or 3 RGB), as in data/images.py; they are drawn in RGB, upscaled by
nearest neighbour, with a thin white gap between cells. Audio bytes are 8-bit mu-law at data/audio.py's SAMPLE_RATE,
decoded and written as 16-bit mono PCM.
"""
from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from .data.audio import SAMPLE_RATE, mu_law_decode

GAP = 2  # pixels between cells
GAP_COLOUR = (255, 255, 255)
MISSING = (128, 128, 128)  # the part of an image the model was not given
BOUNDARY = (255, 0, 0)  # the line where the given part ends


def to_rgb(tokens: np.ndarray, shape: tuple) -> np.ndarray:
    """tokens [..., H * W * C] (values 0..255) -> RGB images [..., H, W, 3] uint8; greyscale is repeated."""
    h, w, c = shape
    if c not in (1, 3) or tokens.shape[-1] != h * w * c:
        raise ValueError(f"image shape {tuple(shape)}: need C = 1 or 3 and H * W * C = {tokens.shape[-1]} bytes")
    images = np.asarray(tokens).astype(np.uint8).reshape(*tokens.shape[:-1], h, w, c)
    return np.repeat(images, 3, axis=-1) if c == 1 else images


def default_scale(shape: tuple) -> int:
    """Nearest-neighbour upscale that makes a cell about 128 px: 28x28 and 32x32 -> x4, 64x64 -> x2."""
    return max(1, 128 // max(shape[0], shape[1]))


def tile(cells: np.ndarray, scale: int = 1, gap: int = GAP) -> np.ndarray:
    """cells [R, K, h, w, 3] uint8 -> one canvas [R * (h * scale + gap) + gap, K * (w * scale + gap) + gap, 3]."""
    rows, cols, h, w, _ = cells.shape
    big = cells.repeat(scale, axis=2).repeat(scale, axis=3)  # (R, K, h * s, w * s, 3)
    hs, ws = h * scale, w * scale
    canvas = np.empty((rows * (hs + gap) + gap, cols * (ws + gap) + gap, 3), dtype=np.uint8)
    canvas[:] = GAP_COLOUR
    for r in range(rows):
        for k in range(cols):
            y, x = gap + r * (hs + gap), gap + k * (ws + gap)
            canvas[y:y + hs, x:x + ws] = big[r, k]
    return canvas


def _save_png(canvas: np.ndarray, path) -> Path:
    from PIL import Image

    path = Path(path)
    Image.fromarray(canvas, "RGB").save(path)
    return path


def write_image_grid(tokens: np.ndarray, shape: tuple, path, columns: int | None = None,
                     scale: int | None = None) -> Path:
    """N sampled images tokens [N, H * W * C] -> a PNG grid, `columns` wide (default ceil(sqrt(N))), row by row.

    Cells past N stay the gap colour. Returns the path.
    """
    images = to_rgb(np.asarray(tokens), shape)  # (N, H, W, 3)
    n = images.shape[0]
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    cells = np.empty((rows * columns, *images.shape[1:]), dtype=np.uint8)
    cells[:] = GAP_COLOUR
    cells[:n] = images
    return _save_png(tile(cells.reshape(rows, columns, *images.shape[1:]), scale or default_scale(shape)), path)


def write_completion_grid(originals: np.ndarray, completions: np.ndarray, given: int, shape: tuple, path,
                          scale: int | None = None) -> Path:
    """Image completions as a PNG: one column per image; rows: what the model was given (the rest grey), the
    completions, the original. A red line marks where the given part ends in every cell.

    originals [N, H * W * C]; completions [N, K, H * W * C]; given: bytes given, a whole number of rows.
    """
    h, w, c = shape
    if given % (w * c) or not 0 <= given <= h * w * c:
        raise ValueError(f"given={given} must be a whole number of rows of {w * c} bytes within the image")
    originals, completions = np.asarray(originals), np.asarray(completions)
    half = to_rgb(originals, shape)  # (N, H, W, 3)
    given_rows = given // (w * c)
    half[:, given_rows:] = MISSING
    cells = np.concatenate([half[None], to_rgb(completions, shape).transpose(1, 0, 2, 3, 4),
                            to_rgb(originals, shape)[None]])  # (K + 2, N, H, W, 3)
    scale = scale or default_scale(shape)
    canvas = tile(cells, scale)
    if 0 < given_rows < h:
        thick, inside = max(1, scale // 4), _cell_columns(cells.shape[1], w * scale)
        for r in range(cells.shape[0]):
            y = GAP + r * (h * scale + GAP) + given_rows * scale  # the first row of the part not given
            canvas[y:y + thick, inside] = BOUNDARY
    return _save_png(canvas, path)


def _cell_columns(count: int, width: int) -> np.ndarray:
    """[canvas width] bool: which x positions lie inside a cell (not in a gap)."""
    inside = np.zeros(count * (width + GAP) + GAP, dtype=bool)
    for k in range(count):
        inside[GAP + k * (width + GAP):GAP + k * (width + GAP) + width] = True
    return inside


def write_wav(codes: np.ndarray, path, rate: int = SAMPLE_RATE) -> Path:
    """8-bit mu-law codes [L] -> a mono 16-bit PCM WAV file at `rate` Hz (data/audio.py's mu_law_decode)."""
    pcm = np.round(np.clip(mu_law_decode(np.asarray(codes, dtype=np.uint8)), -1, 1) * 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def separator(i: int, n: int) -> str:
    return f"==================== sample {i + 1} of {n} ===================="


def format_text(samples: list[bytes]) -> str:
    """Samples as one string, each under a separator line; bytes that are not UTF-8 appear as \\xNN escapes."""
    parts = []
    for i, sample in enumerate(samples):
        parts += [separator(i, len(samples)), sample.decode("utf-8", errors="backslashreplace"), ""]
    return "\n".join(parts)


def write_text(samples: list[bytes], path) -> Path:
    """format_text(samples) as a UTF-8 file. Returns the path."""
    path = Path(path)
    path.write_text(format_text(samples), encoding="utf-8")
    return path
