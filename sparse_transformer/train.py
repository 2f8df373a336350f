"""Training: `sparse-transformer train --preset NAME --out DIR [--data SPEC] [--max-steps N] [--set key=value ...]`.

The paper's recipe (section 6): Adam with linear warmup then cosine decay, gradient clipping at 1.0, weight decay 0.01
on matrices (decoupled, AdamW); mixed precision (bf16 autocast on CUDA; fp16 with dynamic loss scaling as an option).
One process per GPU under `torchrun` (DDP, or FSDP2 `fully_shard` with --set parallel=fsdp); the same command runs
single-process on CPU or one GPU.

Order (nanoGPT's train.py): config -> distributed init -> data -> model -> optimizer -> resume -> compile / DDP / FSDP
-> loop (checkpoint and validation at the top, micro-steps, clip, step, log). The global batch of step s is a pure
function of (seed, s) (sparse_transformer.data), so a resumed run, or one with more processes, sees the same bytes.

Files in DIR: config.json, metrics.jsonl (one JSON object per logged step: step, loss in bits/dim, lr, tokens_per_s;
validation lines carry val_loss), tb/ (TensorBoard, if installed), checkpoints/step_*/ (see checkpoint.py), loss.png.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import get_dataset
from .model import SparseTransformer
from .presets import PRESETS, config_from_dict, config_to_dict, dataclass_from_dict, load_preset


@dataclass
class TrainConfig:
    data: str = "python-stdlib"  # data spec for sparse_transformer.data.get_dataset
    data_root: str = ""  # download / cache folder ("" = $SPARSE_TRANSFORMER_DATA or ~/.cache/sparse-transformer)
    batch_size: int = 16  # global sequences per optimizer step (all processes and micro-steps together)
    grad_accum: int = 1  # micro-steps per optimizer step in each process
    max_steps: int = 1000  # optimizer steps; the cosine schedule reaches its floor here
    lr: float = 3.5e-4  # peak learning rate (the paper's CIFAR-10 value)
    warmup_steps: int = 5000  # linear warmup (paper: 5000 iterations)
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01  # decoupled, on parameters with >= 2 dims only (paper; [DA])
    beta1: float = 0.9  # Adam betas: not stated in the paper; [DA] uses 0.9 / 0.999
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip (paper)
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp16" (GradScaler) | "fp32"
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # with several processes: "ddp" | "fsdp" (FSDP2 fully_shard per block)
    seed: int = 0  # model init, data order and dropout
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 500  # steps between validation losses (0 = only at the end)
    eval_batches: int = 8  # validation batches of batch_size sequences each
    ckpt_every: int = 1000  # steps between checkpoints (also saved at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # newest checkpoints kept

    def __post_init__(self):
        for f in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be >= 1")
        for f in ("warmup_steps", "eval_every", "ckpt_every"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f}={getattr(self, f)!r}: must be >= 0")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision={self.precision!r}: must be auto, bf16, fp16 or fp32")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r}: must be ddp or fsdp")


# Training settings per model preset (presets.py holds the model side). Epoch counts are the paper's; batch sizes are
# not stated in the paper (UNVERIFIED choices), and max_steps follows from epochs * examples / batch.
TRAIN_PRESETS: dict[str, dict] = {
    "demo": dict(data="python-stdlib", batch_size=16, max_steps=800, lr=2e-3, warmup_steps=50, eval_every=200,
                 eval_batches=4, ckpt_every=200, log_every=10),
    "fashion-mnist": dict(data="fashion-mnist", batch_size=64, max_steps=5000, lr=1e-3, warmup_steps=500,
                          eval_every=500, ckpt_every=1000),
    "cifar10": dict(data="cifar10", batch_size=16, max_steps=120 * 48_000 // 16, lr=3.5e-4, warmup_steps=5000,
                    eval_every=2000, ckpt_every=2000),
    "enwik8": dict(data="enwik8", batch_size=16, max_steps=80 * 90_000_000 // (16 * 12288), lr=3.5e-4,
                   warmup_steps=5000, eval_every=2000, ckpt_every=2000),
    "imagenet64": dict(data="imagenet64", batch_size=64, max_steps=70 * 1_271_167 // 64, lr=3.5e-4, warmup_steps=5000,
                       eval_every=5000, ckpt_every=5000),
    "audio-65k": dict(data="audio:", batch_size=8, max_steps=100_000, lr=3.5e-4),
    "audio-262k": dict(data="audio:", batch_size=2, max_steps=100_000, lr=3.5e-4),
    "audio-1m": dict(data="audio:", batch_size=1, max_steps=100_000, lr=3.5e-4),
}


def get_lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at `step`: linear warmup to 1, then cosine decay to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- config ----------------------------------------------------------------------------------------------------------
def build_config(preset: str, data: str | None = None, max_steps: int | None = None, sets=(), ckpt_every=None):
    """(SparseTransformerConfig, TrainConfig) from a preset, then --data / --max-steps / --ckpt-every, then --set.

    --set takes `model.FIELD=VALUE`, `train.FIELD=VALUE` or a bare FIELD (model fields first). Values are JSON where
    they parse (1e-3, true, [28, 28, 1]) and strings otherwise; both dataclasses check types strictly.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets are {sorted(PRESETS)}")
    model = config_to_dict(load_preset(preset))
    train = dataclasses.asdict(TrainConfig(**TRAIN_PRESETS.get(preset, {})))
    if data is not None:
        train["data"] = data
    if max_steps is not None:
        train["max_steps"] = max_steps
    if ckpt_every is not None:
        train["ckpt_every"] = ckpt_every
    for item in sets:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected key=value")
        section, _, name = key.rpartition(".")
        if section not in ("", "model", "train"):
            raise ValueError(f"--set {item!r}: the prefix must be model. or train.")
        target = {"model": model, "train": train}.get(section) or (model if name in model else train)
        if name not in target:
            raise ValueError(f"--set {item!r}: unknown key {name!r}; model keys: {sorted(model)}; train keys: "
                             f"{sorted(train)}")
        target[name] = _parse_value(text, target[name])
    return config_from_dict(model), _train_from_dict(train)


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text.strip().lower() in ("true", "yes", "on") if isinstance(current, bool) and text.strip().lower() \
            in ("true", "false", "yes", "no", "on", "off") else text
    return value


def _train_from_dict(values: dict) -> TrainConfig:
    return dataclass_from_dict(TrainConfig, values, "train")


# ---- distribution (outside the model; torchtitan's order: recompute (model config) -> compile -> DDP / FSDP2) ---------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per GPU (NCCL) or per CPU worker (gloo)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


class LossModule(nn.Module):
    """tokens -> mean bits/dim through `forward`, so DDP's and FSDP2's hooks run around the model's chunked loss."""

    def __init__(self, model: SparseTransformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, score_from: int = 0):
        return self.model.loss(tokens, score_from)


def parallelize(model: SparseTransformer, tc: TrainConfig, d: Dist) -> nn.Module:
    """Wrap the single-device model for training: compile, then DDP or FSDP2 when there are several processes."""
    if tc.compile:
        for block in model.blocks:
            block.compile()
    module = LossModule(model)
    if d.world == 1:
        return module
    if tc.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if _precision(tc, d) == "bf16" else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        return fully_shard(module, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def _precision(tc: TrainConfig, d: Dist) -> str:
    if tc.precision == "auto":
        return "bf16" if d.device.type == "cuda" else "fp32"
    return tc.precision


def make_optimizer(module: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on matrices (>= 2 dims: embeddings and linear weights), none on vectors."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params) and not any(hasattr(p, "device_mesh") for p in params)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=fused or None)


# ---- logging ---------------------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed). On resume, lines past the checkpoint's step are dropped, so a
    killed-and-resumed run's file equals an uninterrupted run's."""

    def __init__(self, out: Path, resume_step: int, enabled: bool):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        # validation at resume_step runs again at the top of the resumed loop, so only its train line is kept
        kept = [r for r in _read_jsonl(self.path) if r["step"] < resume_step or (r["step"] == resume_step
                                                                                  and "val_loss" not in r)]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is an optional dependency
            self.tb = None

    def write(self, **row):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, row["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is gone too
    return rows


# ---- the run ---------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    model_cfg, tc = build_config(args.preset, args.data, args.max_steps, args.set or (), args.ckpt_every)
    d = init_distributed(args.device)
    out = Path(args.out)
    run_config = {"model": config_to_dict(model_cfg), "data": {"spec": tc.data}, "train": dataclasses.asdict(tc),
                  "preset": args.preset}
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run_config, indent=1), flush=True)

    dataset = get_dataset(tc.data, root=tc.data_root or None)
    dataset.check_context(model_cfg.n_ctx)
    per_process = tc.batch_size // d.world
    micro = per_process // tc.grad_accum
    if per_process * d.world != tc.batch_size or micro * tc.grad_accum != per_process:
        raise ValueError(f"batch_size={tc.batch_size} must be divisible by processes ({d.world}) x grad_accum "
                         f"({tc.grad_accum})")

    torch.manual_seed(tc.seed)  # the same initial weights in every process (FSDP2 shards what each rank builds)
    model = SparseTransformer(model_cfg).to(d.device)
    step, state = 0, None
    ckpt_path = latest_checkpoint(out)
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)  # raises CheckpointError if corrupt: never a silent restart
        _check_same_run(ckpt.config, run_config, ckpt.path)
        model.load_state_dict(ckpt.model)
        step, state = ckpt.step, ckpt.state
    module = parallelize(model, tc, d)
    optimizer = make_optimizer(module, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: get_lr_factor(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    precision = _precision(tc, d)
    scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
    torch.manual_seed(tc.seed + 1 + d.rank)  # dropout streams differ per process
    if state is not None:
        _load_train_state(module, optimizer, scheduler, scaler, state, tc, d)
    if step >= tc.max_steps:
        if d.main:
            print(f"{out} already holds a finished run of {tc.max_steps} steps (raise --max-steps to go on)")
        if d.world > 1:
            dist.destroy_process_group()
        return 0
    if d.main:
        print(model.summary(), flush=True)
        print(f"data {dataset.name}: " + ", ".join(f"{k} {v.size:,} bytes" for k, v in dataset.splits.items())
              + (f"; resuming at step {step} from {ckpt_path}" if ckpt_path else ""), flush=True)
        (out / "config.json").write_text(json.dumps(run_config, indent=1))

    log = MetricsLog(out, step, d.main)
    stop = _StopFlag()
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision in ("bf16", "fp16"))
    tokens_per_step = tc.batch_size * model_cfg.n_ctx
    status = 0
    from tqdm import tqdm

    bar = tqdm(total=tc.max_steps, initial=step, disable=not d.main, unit="step", dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0
    try:
        while True:
            if step > 0 and tc.ckpt_every and step % tc.ckpt_every == 0:
                save_run_checkpoint(out, step, module, model, optimizer, scheduler, scaler, run_config, tc, d)
            if step > 0 and tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                log.write(step=step, val_loss=validate(module, dataset, model_cfg.n_ctx, micro, tc, d, autocast))
            if step >= tc.max_steps or stop.requested(d):
                break
            module.train()
            batch = dataset.batch("train", step, tc.batch_size, model_cfg.n_ctx, tc.seed)
            total = torch.zeros((), device=d.device)
            for m in range(tc.grad_accum):
                first = (d.rank * tc.grad_accum + m) * micro
                tokens = torch.from_numpy(batch[first:first + micro]).to(d.device, non_blocking=True)
                with _no_sync(module, d, last=m == tc.grad_accum - 1), autocast:
                    loss = module(tokens)  # mean bits/dim of this micro-batch
                scaler.scale(loss * (math.log(2) / tc.grad_accum)).backward()  # nats: clip 1.0 as in the paper
                total += loss.detach() / tc.grad_accum
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(module.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            steps_since += 1
            if step % tc.log_every == 0 or step == tc.max_steps:
                if d.world > 1:
                    dist.all_reduce(total)
                    total /= d.world
                now = time.perf_counter()
                rate = steps_since * tokens_per_step / (now - t_last)
                t_last, steps_since = now, 0
                value = total.item()
                log.write(step=step, loss=value, lr=optimizer.param_groups[0]["lr"], tokens_per_s=round(rate, 1))
                bar.set_postfix_str(f"{value:.4f} bits/dim, {rate:,.0f} tok/s")
            bar.update(1)
        if stop.signum is not None:
            status = 128 + stop.signum
            save_run_checkpoint(out, step, module, model, optimizer, scheduler, scaler, run_config, tc, d)
            if d.main:
                print(f"\nstopped by signal {stop.signum} at step {step}; checkpoint saved, rerun to resume", flush=True)
        else:
            save_run_checkpoint(out, step, module, model, optimizer, scheduler, scaler, run_config, tc, d)
            val = validate(module, dataset, model_cfg.n_ctx, micro, tc, d, autocast)
            log.write(step=step, val_loss=val)
            if d.main:
                print(f"\nstep {step}: validation {val:.4f} bits/dim; run folder {out}", flush=True)
    finally:
        bar.close()
        log.close()
        stop.restore()
    if d.main:
        plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


@torch.no_grad()
def validate(module, dataset, n_ctx: int, micro: int, tc: TrainConfig, d: Dist, autocast) -> float:
    """Mean bits/dim over tc.eval_batches fixed validation batches (the same ones every time), split across ranks
    and run `micro` sequences at a time."""
    module.eval()
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    per = tc.batch_size // d.world
    for i in range(tc.eval_batches):
        batch = dataset.batch("valid", i, tc.batch_size, n_ctx, tc.seed)[d.rank * per:(d.rank + 1) * per]
        for s in range(0, per, micro):
            with autocast:
                total += module(torch.from_numpy(batch[s:s + micro]).to(d.device)).double() * (micro / per)
    if d.world > 1:
        dist.all_reduce(total)
    module.train()
    return total.item() / (tc.eval_batches * d.world)


def _no_sync(module, d: Dist, last: bool):
    """Gradient all-reduce only on the last micro-step (DDP no_sync; FSDP2 set_requires_gradient_sync)."""
    if d.world == 1 or last:
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    module.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _check_same_run(saved: dict, current: dict, path: Path) -> None:
    for section in ("model", "data"):
        if saved.get(section) != current[section]:
            diff = {k: (saved.get(section, {}).get(k), v) for k, v in current[section].items()
                    if saved.get(section, {}).get(k) != v}
            raise CheckpointError(f"{path} is from a different run ({section} differs, saved vs now: {diff}); use "
                                  "another --out folder, or the same settings to resume")


# ---- checkpoints: gather full state on every rank, write on rank 0 -------------------------------------------------
def save_run_checkpoint(out, step, module, model, optimizer, scheduler, scaler, run_config, tc, d: Dist):
    rng = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    if tc.parallel == "fsdp" and d.world > 1:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {k.removeprefix("model."): v for k, v in get_model_state_dict(module, options=opts).items()}
        optim_state, optim_format = get_optimizer_state_dict(module, optimizer, options=opts), "fsdp-full"
    else:
        weights, optim_state, optim_format = model.state_dict(), optimizer.state_dict(), "torch"
    rngs = [rng]
    if d.world > 1:
        rngs = [None] * d.world
        dist.all_gather_object(rngs, rng)
    if d.main:
        state = {"optimizer": optim_state, "optimizer_format": optim_format, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": rngs, "world_size": d.world,
                 "data": {"seed": tc.seed, "next_step": step, "spec": tc.data}}
        save_checkpoint(out, step, weights, state, run_config, keep=tc.keep_checkpoints)
    if d.world > 1:
        dist.barrier()


def _load_train_state(module, optimizer, scheduler, scaler, state, tc, d: Dist) -> None:
    fsdp = tc.parallel == "fsdp" and d.world > 1
    if (state["optimizer_format"] == "fsdp-full") != fsdp:
        raise CheckpointError(f"the checkpoint's optimizer state is {state['optimizer_format']!r}; resume it with the "
                              f"same parallel mode ({'fsdp' if not fsdp else 'ddp or one process'}) it was saved with")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if state.get("world_size") == d.world:
        rng = state["rng"][d.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    elif d.main:
        print(f"warning: checkpoint saved with {state.get('world_size')} processes, now {d.world}: dropout streams "
              "are reseeded, so the run is not bit-identical to an uninterrupted one", file=sys.stderr)


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to stop after the current step and save; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread): no handlers
                pass

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, d: Dist) -> bool:
        flag = self.signum is not None
        if d.world > 1:  # every rank stops at the same step, or the collectives would hang
            t = torch.tensor([float(self.signum or 0)], device=d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() and self.signum is None:
                self.signum = int(t.item())
            flag = bool(t.item())
        return flag

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ---- loss curve --------------------------------------------------------------------------------------------------------
def plot_loss_curve(metrics: Path, png: Path) -> Path | None:
    """Train (and validation) bits/dim against step, as a PNG: matplotlib if installed, else drawn with Pillow."""
    rows = _read_jsonl(Path(metrics))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        ax.plot(*zip(*train), label="train", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("bits / dim")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
    except ImportError:
        _plot_with_pillow(train, val, png)
    return png


def _plot_with_pillow(train, val, png: Path, size=(720, 480), pad=50):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = train + val
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)

    def xy(p):
        return (pad + (p[0] - x0) / (x1 - x0) * (size[0] - 2 * pad),
                size[1] - pad - (p[1] - y0) / (y1 - y0) * (size[1] - 2 * pad))

    draw.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline="gray")
    for series, color in ((train, "royalblue"), (val, "darkorange")):
        if len(series) > 1:
            draw.line([xy(p) for p in series], fill=color, width=2)
    draw.text((pad, 10), f"bits/dim: train (blue), validation (orange); {y0:.3f}..{y1:.3f}", fill="black")
    draw.text((pad, size[1] - pad + 10), f"step {x0}..{x1}", fill="black")
    img.save(png)


# ---- command line -----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model preset (and its training "
                        "defaults)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, loss.png; rerunning "
                        "with the same folder resumes")
    parser.add_argument("--data", default=None, help="data spec: enwik8, cifar10, imagenet64[:DIR], "
                        "fashion-mnist[:DIR], bytes:PATH, audio:DIR, python-stdlib (default: the preset's)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    parser.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default: preset's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a model or train field, e.g. "
                        "--set model.n_layer=4 --set train.lr=1e-3 --set dropout=0 (repeatable)")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m sparse_transformer.train", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
