"""Training on CPU: the loss falls; kill -9 / SIGTERM + resume is bit-identical; DDP and FSDP2 with 2 gloo processes
equal one process with the same global batch."""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_transformer import train
from sparse_transformer.checkpoint import CheckpointError, latest_checkpoint
from sparse_transformer.evaluate import evaluate, load_model
from sparse_transformer.data import get_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
TINY = ["n_ctx=64", "n_layer=2", "n_head=2", "d_model=32", "d_ff=64", "stride=8", "summary=2", "dropout=0.1",
        "train.batch_size=4", "train.log_every=1", "train.eval_every=20", "train.eval_batches=1",
        "train.warmup_steps=5", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    words = "def return self import class for in if else while with as lambda yield".split()
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(words, 8)) for _ in range(2000)).encode()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(text)
    return path


def _args(out, corpus, steps=STEPS, extra=()):
    return argparse.Namespace(preset="demo", out=str(out), data=f"bytes:{corpus}", max_steps=steps, device="cpu",
                              ckpt_every=5, set=TINY + list(extra))


def _cmd(out, corpus, steps=STEPS, extra=()):
    cmd = ["-m", "sparse_transformer.train", "--preset", "demo", "--out", str(out), "--data", f"bytes:{corpus}",
           "--max-steps", str(steps), "--device", "cpu", "--ckpt-every", "5"]
    return cmd + [a for s in TINY + list(extra) for a in ("--set", s)]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _losses(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows
                                                                  if "val_loss" in r}


def _assert_same_history(run, reference):
    """Every train and validation loss of a resumed run equals the uninterrupted run's, to 1e-6 relative.

    Not bit for bit: with a second test session loading the 2-core machine, logged losses of this CPU training were
    seen to move in the last bits at isolated steps (7.347170352935791 vs 7.347169876098633 at step 6 of a run that was
    never interrupted, the steps between identical), in about one of ten such runs. A faulty resume (dropout RNG,
    optimizer or scheduler state, data position) moves the losses by 1e-3 and more within a few steps."""
    (a, va), (b, vb) = _losses(run), _losses(reference)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)) and sorted(va) == sorted(vb)
    for got, want in ((a, b), (va, vb)):
        for step in want:
            assert math.isclose(got[step], want[step], rel_tol=1e-6), (step, got[step], want[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """One uninterrupted run, in this process."""
    run = tmp_path_factory.mktemp("reference")
    assert train.main(_args(run, corpus)) == 0
    return run


def test_lr_schedule():
    f = [train.get_lr_factor(s, 10, 100) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert f[55] == pytest.approx(0.5) and f[100] == 0.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_build_config_set_and_errors():
    model, tc = train.build_config("demo", max_steps=7, sets=["n_layer=3", "train.lr=1e-3", "dropout=0.2",
                                                                "train.compile=true", "backend=torch"])
    assert (model.n_layer, model.dropout, model.backend, tc.lr, tc.compile, tc.max_steps) == (3, 0.2, "torch", 1e-3,
                                                                                             True, 7)
    with pytest.raises(ValueError, match="unknown key"):
        train.build_config("demo", sets=["n_layers=3"])
    with pytest.raises(ValueError, match="n_layer"):
        train.build_config("demo", sets=["n_layer=2.5"])
    with pytest.raises(ValueError, match="precision"):
        train.build_config("demo", sets=["precision=fp8"])


def test_training_lowers_loss_and_writes_run_folder(reference, corpus):
    losses, val = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)]) < losses[1] - 1.0  # 8 bits -> well below
    assert sorted(val) == [20, 40, 60]
    assert (reference / "loss.png").stat().st_size > 1000 and (reference / "config.json").is_file()
    assert latest_checkpoint(reference).name == f"step_{STEPS:08d}"
    model, _ = load_model(reference, "cpu")
    result = evaluate(model, get_dataset(f"bytes:{corpus}"), "test", min_context=32, progress=False)
    assert result["complete"] and result["tokens_scored"] == get_dataset(f"bytes:{corpus}").num_tokens("test")
    assert result["bits_per_dim"] < 6.0


def test_kill9_and_resume_matches_uninterrupted_run(tmp_path, reference, corpus):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *_cmd(run, corpus)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"loss"') >= 12:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(latest_checkpoint(run).name.split("_")[1])
    assert 10 <= killed_at < STEPS
    assert train.main(_args(run, corpus)) == 0  # the same command resumes
    _assert_same_history(run, reference)


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path, reference, corpus):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *_cmd(run, corpus, extra=["train.ckpt_every=0"])], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"loss"') >= 7:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    assert proc.wait(60) == 128 + signal.SIGTERM
    stopped_at = int(latest_checkpoint(run).name.split("_")[1])
    assert 7 <= stopped_at < STEPS  # saved where it stopped, not at a ckpt_every multiple (there are none)
    assert train.main(_args(run, corpus, extra=["train.ckpt_every=0"])) == 0
    _assert_same_history(run, reference)


def test_corrupt_or_mismatched_checkpoint_is_an_error(tmp_path, reference, corpus):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    with pytest.raises(CheckpointError, match="different run"):
        train.main(_args(run, corpus, steps=STEPS + 5, extra=["n_layer=3"]))
    weights = latest_checkpoint(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="corrupt"):
        train.main(_args(run, corpus, steps=STEPS + 5))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, corpus, parallel):
    steps, extra = 6, ["dropout=0.0", "train.eval_every=0", f"train.parallel={parallel}"]
    single = tmp_path / "single"
    assert train.main(_args(single, corpus, steps, extra + ["train.grad_accum=2"])) == 0
    ddp = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(torchrun + _cmd(ddp, corpus, steps, extra), env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    (a, va), (b, vb) = _losses(single), _losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:  # the same global batch split the same way: equal up to the order of float sums
        assert math.isclose(a[step], b[step], rel_tol=2e-5), (step, a[step], b[step])
    assert math.isclose(va[steps], vb[steps], rel_tol=2e-5)


def test_demo_sampling_and_layout_picture(tmp_path, reference):
    from sparse_transformer.demo import draw_layout, sample_bytes

    model, _ = load_model(reference, "cpu")
    a = sample_bytes(model, b"def ", 80, temperature=1.0, seed=3)  # 80 > n_ctx=64: the context slides
    assert len(a) == 84 and a.startswith(b"def ") and a == sample_bytes(model, b"def ", 80, seed=3)
    assert draw_layout(model, tmp_path / "layout.png").stat().st_size > 100
