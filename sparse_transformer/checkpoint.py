"""Checkpoints: one folder per step, written whole to a temporary name and renamed into place.

    RUN/checkpoints/step_00001000/
        model.safetensors   weights (fp32, full, unsharded)
        state.pt            optimizer, scheduler, grad scaler, RNG states of every rank, step, data position
        config.json         the resolved run config (model, data, train)
        manifest.json       size and sha256 of the three files above (written last)

A folder only ever appears under its final name complete (os.replace of the directory), so a run killed at any
moment leaves either the previous checkpoint or the new one. `latest_checkpoint` picks the highest step; if that
folder does not match its manifest, loading raises CheckpointError instead of silently starting over.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
FILES = ("model.safetensors", "state.pt", "config.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt. The message names the folder and what to do."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict  # parameter name -> tensor (CPU)
    state: dict  # optimizer / scheduler / scaler / rng / data position
    config: dict  # resolved run config


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder (-> its latest checkpoint) or a checkpoint folder itself."""
    path = Path(path)
    if (path / "manifest.json").is_file() or (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no checkpoint here (expected {checkpoint_dir(path)}/step_*/ or a folder "
                              "holding model.safetensors)")
    return latest


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict, state: dict, config: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep` of them. Returns its folder.

    model_state: name -> tensor (full, unsharded); state: picklable with torch.load(weights_only=True) (tensors,
    numbers, strings, lists, dicts); config: JSON-serializable. Saving a step that already exists is a no-op: with
    deterministic training the state at a step is the same.
    """
    from safetensors.torch import save_file

    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.is_dir():
        return final
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model_state.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save({**state, "step": step}, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    for name in (*FILES, "manifest.json"):
        _fsync(tmp / name)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Load a checkpoint folder (or a run folder's latest), checking it against its manifest first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(path)
    try:
        model = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        config = json.loads((path / "config.json").read_text())
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as e:
        raise CheckpointError(_corrupt(path, f"cannot read it ({type(e).__name__}: {e})")) from e
    return Checkpoint(path=path, step=int(state["step"]), model=model, state=state, config=config)


def verify_checkpoint(path: Path) -> None:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(_corrupt(path, "manifest.json is missing"))
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(_corrupt(path, f"manifest.json is unreadable ({e})")) from e
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(_corrupt(path, f"{name} is missing"))
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(_corrupt(path, f"{name} is {file.stat().st_size} bytes, manifest says "
                                                 f"{expected['bytes']} (truncated)"))
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(_corrupt(path, f"{name} does not match its sha256 in manifest.json"))


def _corrupt(path: Path, why: str) -> str:
    earlier = [p.name for p in list_checkpoints(path.parent.parent) if p != path]
    hint = (f"move it away to resume from {earlier[-1]}" if earlier else
            "move it away (training would then start from scratch)")
    return f"checkpoint {path} is corrupt: {why}. Refusing to continue; {hint}."


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
