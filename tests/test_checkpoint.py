"""Checkpoint folders: round trip, atomic naming, pruning, and clear errors for corrupt or truncated files."""
import pytest
import torch

from sparse_transformer.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                           save_checkpoint)


def _save(run, step, scale=1.0, keep=2):
    weights = {"w": torch.arange(6.0).view(2, 3) * scale, "b": torch.zeros(3)}
    state = {"optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}, "rng": [{"cpu": torch.get_rng_state()}]}
    return save_checkpoint(run, step, weights, state, {"model": {"n_layer": 2}}, keep=keep)


def test_round_trip_and_latest(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 20, scale=2.0)
    (tmp_path / "checkpoints" / ".tmp-step_00000030-123").mkdir()  # a save killed half way: ignored
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 20 and ckpt.path.name == "step_00000020"
    assert torch.equal(ckpt.model["w"], torch.arange(6.0).view(2, 3) * 2)
    assert torch.equal(ckpt.state["rng"][0]["cpu"], torch.get_rng_state())
    assert ckpt.config == {"model": {"n_layer": 2}}
    assert load_checkpoint(tmp_path / "checkpoints" / "step_00000010").step == 10


def test_keep_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert latest_checkpoint(tmp_path / "nothing") is None


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", "flip"), ("state.pt", "truncate"), ("manifest.json", "delete")], ids=str)
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, name, damage):
    _save(tmp_path, 5)
    path = _save(tmp_path, 6) / name
    blob = path.read_bytes()
    if damage == "flip":
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    elif damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match="corrupt.*step_00000005"):
        load_checkpoint(tmp_path)


def test_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
