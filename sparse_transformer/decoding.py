"""Autoregressive sampling: cached decoding (O(sqrt(n)) cache rows per step for strided / fixed) or full passes.

Legend: B batch, t prefix length, V vocabulary (256 bytes), T cache length = t + num_new.

Slot s of the model predicts byte s from bytes < s (model.py: the input shift), so sampling byte s runs slot s with byte
s - 1 as its input. With the cache: a prefill runs slots 0..t-1 in one forward pass and writes every layer's keys and
values; each step then runs one slot through every layer (model.decode_step), reading only the cache rows the layout's
row allows. On CUDA the step is captured once in a CUDA graph and replayed, which removes the per-launch host cost (a
step is ~10 small kernels per layer). use_cache=False samples by repeated full forward passes: the slow ground truth.
"""
from __future__ import annotations

import contextlib

import torch

from .model import SparseTransformer


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> sampled ids [B] (int64). temperature 0 is greedy (argmax); top_k keeps the k likeliest ids;
    top_p keeps the smallest set of likeliest ids whose probability reaches p (nucleus sampling)."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # ids after the set already reached p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


@torch.no_grad()
def generate(model: SparseTransformer, prefix: torch.Tensor, num_new: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, progress: bool = False,
             cuda_graph: bool | None = None, compile: bool = False) -> torch.Tensor:
    """Sample num_new bytes after prefix [B, t] -> [B, t + num_new] int64 on the model's device.

    t may be 0 (a [B, 0] tensor: unconditional samples). t + num_new must be <= n_ctx. On CUDA an fp32 model runs under
    bf16 autocast (a bf16 model as it is), and the cached step is replayed from a CUDA graph (cuda_graph=None: on CUDA).
    compile=True runs the step's blocks through torch.compile (fewer kernels per step; compiling takes a while).
    """
    if prefix.dim() != 2:
        raise ValueError(f"prefix must be [batch, t] (t may be 0), got shape {tuple(prefix.shape)}")
    B, t = prefix.shape
    if B < 1 or num_new < 0 or t + num_new > model.cfg.n_ctx:
        raise ValueError(f"batch {B} >= 1 and prefix {t} + num_new {num_new} <= n_ctx={model.cfg.n_ctx} needed")
    if prefix.numel() and (prefix.min() < 0 or prefix.max() >= model.cfg.vocab_size):
        raise ValueError(f"prefix values must be in 0..{model.cfg.vocab_size - 1}")
    check_sampling(temperature, top_k, top_p)
    device = model.head.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if num_new == 0:
        return prefix.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    out = torch.zeros(B, t + num_new, dtype=torch.long, device=device)
    out[:, :t] = prefix.to(device)
    fp32_on_cuda = device.type == "cuda" and model.head.weight.dtype == torch.float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if fp32_on_cuda \
        else contextlib.nullcontext()  # a bf16 / fp16 model runs in its own dtype
    positions = range(t, t + num_new)
    if progress:
        from tqdm import tqdm

        positions = tqdm(positions, desc="sampling", unit="pos", dynamic_ncols=True)
    pick = lambda logits: sample_logits(logits, temperature, top_k, top_p, generator)  # noqa: E731
    try:
        with amp:
            if not use_cache:
                for s in positions:
                    out[:, s] = pick(model(out[:, :s + 1])[:, s])  # slot s reads bytes < s; byte s is a placeholder
                return out
            step = DecodeStepper(model, B, t + num_new, device, cuda_graph, compile)
            if t:
                model.hidden(out[:, :t], cache=step.cache)  # prefill: slots 0..t-1
            for s in positions:
                out[:, s] = pick(step(out[:, s - 1] if s else out[:, 0], s))
        return out
    finally:
        model.train(was_training)


class DecodeStepper:
    """model.decode_step over its own cache, eager or replayed from a CUDA graph with static token / position buffers:
    `stepper(prev [B], pos) -> logits [B, V]` (the graph's output buffer, overwritten by the next call)."""

    def __init__(self, model: SparseTransformer, batch: int, length: int, device, cuda_graph: bool | None,
                 compile: bool = False):
        self.compiled = compile  # model.decode_step(compiled=...): blocks through torch.compile
        dtype = model.head.weight.dtype
        dtype = torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else dtype
        self.model, self.cache = model, model.new_cache(batch, length, dtype=dtype, device=device)
        self.graph = None
        if cuda_graph if cuda_graph is not None else device.type == "cuda":
            self._capture(batch, device)

    def _capture(self, batch, device):
        self.prev = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: compiles the kernels, builds the layouts, outside the capture
            self.model.decode_step(self.prev, self.pos, self.cache, self.compiled)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_step(self.prev, self.pos, self.cache, self.compiled)

    def __call__(self, prev: torch.Tensor, pos: int) -> torch.Tensor:
        if self.graph is None:
            return self.model.decode_step(prev, pos, self.cache, self.compiled)
        self.prev.copy_(prev)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits
