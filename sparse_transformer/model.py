"""The Sparse Transformer model (Child et al. 2019, sections 5.2-5.4, 6; SPEC.md sections 2-4, paper-spec.md section 3).

Legend: B batch, N sequence length at forward time (N <= n_ctx), D d_model, H heads, Dk / Dv per-head query-key / value
width, F feed-forward width, V vocabulary (256 byte values), L stride, C summary size.

Network (pre-LN, paper section 5.2):  H_0 = embed(X);  x += dropout(attn(norm(x)));  x += dropout(ff(norm(x)));
logits = norm(H_N) W_out, with W_out untied from the token embedding and initialized to zero.

Input shift (not in the paper; paper-spec.md section 3.3): the token embeddings are shifted right by one and slot 0 gets a
learned start vector, so slot t sees bytes x_0..x_{t-1} and predicts x_t; every byte of the input is scored. Position
embeddings are added *after* the shift, so slot t carries the coordinates of the byte it predicts (for images: the
channel to predict). OpenAI's later code [DA] shifts the summed token + position embedding instead.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import layouts
from .attention import sparse_attention
from .attention.decode import decode_attention

PATTERNS = ("dense", "local", "strided", "fixed")
ARRANGEMENTS = ("interleaved", "merged", "split")
BACKENDS = ("auto", "triton", "torch", "flex", "dense", "reference")
POS_EMBS = ("stride", "image", "1d")
ACTIVATIONS = ("gelu_sigmoid", "gelu_tanh", "gelu")
INIT_SCHEMES = ("code", "std")
BLOCK_SIZES = (0, 16, 32, 64, 128)


@dataclass
class SparseTransformerConfig:
    n_ctx: int = 256  # context length in bytes (the model's n); forward accepts any N <= n_ctx
    n_layer: int = 4  # residual blocks (the paper's N)
    n_head: int = 4  # attention heads; per-head widths are the projection widths / n_head
    d_model: int = 128  # residual width d
    d_ff: int = 512  # feed-forward inner width: 4 * d_model, or 2 * d_model for the paper's "half-size"
    qk_ratio: float = 1.0  # query/key projection width / d_model; 0.5 = the paper's half-size q/k (v stays d_model)
    vocab_size: int = 256  # byte values
    pattern: str = "fixed"  # "dense" | "local" (band of `stride`) | "strided" | "fixed" (paper section 4.3)
    arrangement: str = "merged"  # "interleaved" (layer r: A1 or A2) | "merged" (A1 u A2 per head) | "split" (heads)
    interleave_ratio: int = 1  # interleaved: A1 layers per A2 layer (1 = the paper's r mod 2; [DA] CIFAR uses 3)
    stride: int = 32  # l: block length (fixed), period (strided), band (local); also the 2D position-embedding width
    summary: int = 8  # c: summary cells at the end of each block (fixed)
    num_verts: int = 1  # fixed: distinct summary sub-blocks, head h uses the (h mod num_verts)-th from the block end
    pos_emb: str = "stride"  # "stride" (row i // L, column i % L; text, audio) | "image" (row, col, channel) | "1d"
    image_shape: tuple[int, int, int] = (0, 0, 0)  # (height, width, channels) for pos_emb="image"; HWC raster order
    dropout: float = 0.0  # at the end of each residual branch only (paper section 5.4)
    activation: str = "gelu_sigmoid"  # "gelu_sigmoid" x * sigmoid(1.702 x) (paper) | "gelu_tanh" | "gelu" (erf)
    init_scheme: str = "code"  # weights std sqrt(0.125 / fan_in) ("code", OpenAI's later code) or 0.125 / sqrt(fan_in)
    backend: str = "auto"  # "auto" | "triton" | "torch" | "flex" | "dense" (SDPA, causal) | "reference" (tests)
    block_size: int = 0  # Triton tile (16 / 32 / 64 / 128); 0 lets the kernels choose per segment
    recompute: bool = False  # checkpoint each residual block: only the residual stream is kept for the backward
    loss_chunk: int = 8192  # positions per cross-entropy chunk in loss(); 0 = all at once

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"{field}={getattr(self, field)!r}: {why}")

        for f in ("n_ctx", "n_layer", "n_head", "d_model", "d_ff", "stride", "summary", "num_verts",
                  "interleave_ratio"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f, "must be a positive int")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            bad("vocab_size", "must be an int >= 2 (256 for bytes)")
        for f, options in (("pattern", PATTERNS), ("arrangement", ARRANGEMENTS), ("backend", BACKENDS),
                           ("pos_emb", POS_EMBS), ("activation", ACTIVATIONS), ("init_scheme", INIT_SCHEMES),
                           ("block_size", BLOCK_SIZES)):
            if getattr(self, f) not in options:
                bad(f, f"must be one of {options}")
        if self.d_model % self.n_head:
            ok = [h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]
            bad("n_head", f"must divide d_model={self.d_model}; try one of {ok}")
        if not 0.0 < self.qk_ratio <= 1.0:
            bad("qk_ratio", "must be in (0, 1]: 1.0 full-size, 0.5 half-size query/key projections")
        d_qk = self.qk_ratio * self.d_model
        if d_qk != int(d_qk) or int(d_qk) % self.n_head:
            bad("qk_ratio", f"qk_ratio * d_model = {d_qk} must be a whole multiple of n_head={self.n_head}; "
                            f"1.0 or 0.5 work when d_model / n_head is even")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            bad("loss_chunk", "must be an int >= 0 (0 = no chunking)")
        if not isinstance(self.recompute, bool):
            bad("recompute", "must be True or False")
        if self.block_size > self.n_ctx:
            bad("block_size", f"must be <= n_ctx={self.n_ctx}; 0 lets the kernels choose")
        uses_stride = self.pattern != "dense" or self.pos_emb == "stride"
        if uses_stride and self.stride > self.n_ctx:
            bad("stride", f"must be <= n_ctx={self.n_ctx} (about sqrt(n_ctx) = {math.isqrt(self.n_ctx)} is the "
                          f"paper's choice)")
        if self.pattern == "fixed":
            if self.summary > self.stride:
                bad("summary", f"must be <= stride={self.stride} (the paper uses 8..32 with stride 128..256)")
            if self.num_verts * self.summary > self.stride:
                bad("num_verts", f"num_verts * summary = {self.num_verts * self.summary} must be <= stride="
                                 f"{self.stride}; at most {self.stride // self.summary} works")
            heads_a2 = self.n_head // 2 if self.arrangement == "split" else self.n_head
            if self.num_verts > 1 and heads_a2 % self.num_verts:
                bad("num_verts", f"must divide the {heads_a2} heads that attend to summary cells")
        if self.arrangement == "split" and self.pattern in ("strided", "fixed") and self.n_head % 2:
            bad("n_head", "must be even with arrangement='split' (half the heads on each part)")
        if self.pos_emb == "image":
            shape = tuple(self.image_shape)
            if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
                bad("image_shape", "must be three positive ints (height, width, channels) with pos_emb='image'")
            if math.prod(shape) != self.n_ctx:
                bad("image_shape", f"height * width * channels = {math.prod(shape)} must equal n_ctx={self.n_ctx}")
        self.image_shape = tuple(self.image_shape)
        dv = self.d_model // self.n_head
        if self.backend == "triton" and (dv < 16 or dv > 256 or dv & (dv - 1)):
            bad("backend", f"'triton' needs d_model / n_head a power of two in 16..256, got {dv}; use 'torch'")

    @property
    def d_qk(self) -> int:
        """Total query/key projection width."""
        return int(self.qk_ratio * self.d_model)


# ---- blocks ----------------------------------------------------------------------------------------------------------
def gelu_sigmoid(x):
    """GELU in the sigmoid approximation of GPT-1 and the paper: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"gelu_sigmoid": gelu_sigmoid, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class Attention(nn.Module):
    """Projections around `sparse_attention`: q, k (width d_qk) and v (width d) in one matmul, then W_p."""

    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.d_model, 2 * cfg.d_qk + cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # W_p: scaled by 1/sqrt(2N) at init

    def _heads(self, x):
        """x [B, N, D] -> q, k [B, H, N, Dk] and v [B, H, N, Dv] (views of one projection)."""
        B, N, D = x.shape
        H, dk, dv = self.cfg.n_head, self.cfg.d_qk // self.cfg.n_head, D // self.cfg.n_head
        q, k, v = self.qkv(x).split([self.cfg.d_qk, self.cfg.d_qk, D], dim=-1)
        return (q.view(B, N, H, dk).transpose(1, 2), k.view(B, N, H, dk).transpose(1, 2),
                v.view(B, N, H, dv).transpose(1, 2))

    def forward(self, x, layout: layouts.Layout, kv: tuple | None = None):
        """kv: optional (k_cache, v_cache) [B, H, T, Dk|Dv] whose rows 0..N-1 receive this call's keys and values
        (the prefill of cached decoding)."""
        B, N, D = x.shape
        dk, dv = self.cfg.d_qk // self.cfg.n_head, D // self.cfg.n_head
        q, k, v = self._heads(x)  # (B, H, N, Dk), (B, H, N, Dk), (B, H, N, Dv)
        if kv is not None:
            kv[0][:, :, :N] = k
            kv[1][:, :, :N] = v
        if dk < dv:  # the kernels take one head width: zero columns leave q.k unchanged
            q, k = F.pad(q, (0, dv - dk)), F.pad(k, (0, dv - dk))
        y = attend(q, k, v, layout, 1.0 / math.sqrt(dk), self.cfg.backend, self.cfg.block_size)  # (B, H, N, Dv)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))

    def step(self, x, layout: layouts.Layout, kv: tuple, pos):
        """One new position: x [B, 1, D] at position pos (int, or an int64 tensor [1] on x's device); writes its key and
        value into row pos of the caches and attends over the rows its layout row allows."""
        B, _, D = x.shape
        q, k, v = self._heads(x)  # (B, H, 1, Dk | Dv)
        # decoding does not follow the training backend: "auto" is the Triton kernel on CUDA, the torch path on CPU
        backend = {"dense": "sdpa", "triton": "triton"}.get(self.cfg.backend, "auto")
        y = cache_attend(q[:, :, 0], k[:, :, 0], v[:, :, 0], kv, layout, pos, backend)
        return self.proj(y.reshape(B, 1, D))


@torch.compiler.disable  # a compiled step keeps the cache writes in place and our kernel out of tracing
def cache_attend(q, k, v, kv: tuple, layout: layouts.Layout, pos, backend: str):
    """Write k, v [B, H, Dk | Dv] into row pos of the caches kv, then attend q [B, H, Dk] over the row's keys."""
    if isinstance(pos, numbers.Integral):
        kv[0][:, :, pos], kv[1][:, :, pos] = k, v
    else:  # a device position: no host sync, so the step can be captured in a CUDA graph
        kv[0].index_copy_(2, pos, k[:, :, None].to(kv[0].dtype))
        kv[1].index_copy_(2, pos, v[:, :, None].to(kv[1].dtype))
    return decode_attention(q, kv[0], kv[1], layout, pos, 1.0 / math.sqrt(q.shape[-1]), backend)


@torch.compiler.disable  # torch.compile fuses the projections, MLP and norms around it; the kernels are ours already
def attend(q, k, v, layout, scale, backend, block_size=0):
    """Dispatch one attention call. q, k, v: [B, H, N, Dv]; "dense" ignores the layout (dense causal SDPA)."""
    if backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda and _triton_fits(q.shape[-1]) else "torch"
    if backend == "triton" and block_size:
        from .attention.triton.function import sparse_attention_triton

        return sparse_attention_triton(q, k, v, layout, scale, block_size, block_size)[0]
    return sparse_attention(q, k, v, layout, scale=scale, backend=backend)


def _triton_fits(head_dim: int) -> bool:
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and importlib.util.find_spec("triton") is not None


class FeedForward(nn.Module):
    """ff(x) = W_2 act(W_1 x + b_1) + b_2, inner width d_ff."""

    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)  # W_1
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)  # W_2: scaled by 1/sqrt(2N) at init
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x += dropout(attn(ln_1 x)); x += dropout(ff(ln_2 x)). No dropout inside the branches."""

    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layout: layouts.Layout, kv: tuple | None = None):
        x = x + self.drop(self.attn(self.ln_1(x), layout, kv))  # (B, N, D)
        return x + self.drop(self.mlp(self.ln_2(x)))

    def step(self, x, layout: layouts.Layout, kv: tuple, pos):
        x = x + self.drop(self.attn.step(self.ln_1(x), layout, kv, pos))  # (B, 1, D)
        return x + self.drop(self.mlp(self.ln_2(x)))


class PositionEmbedding(nn.Module):
    """Learned position embeddings, one table per coordinate, summed (paper section 5.3, eq. 15)."""

    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__()
        self.kind, self.stride = cfg.pos_emb, cfg.stride
        if cfg.pos_emb == "image":
            sizes = cfg.image_shape  # row, column, channel
        elif cfg.pos_emb == "stride":
            sizes = (-(-cfg.n_ctx // cfg.stride), cfg.stride)  # row i // L, column i % L
        else:
            sizes = (cfg.n_ctx,)
        self.sizes = tuple(sizes)
        self.tables = nn.ParameterList(nn.Parameter(torch.empty(s, cfg.d_model)) for s in sizes)

    def coordinates(self, n: int, device) -> list[torch.Tensor]:
        return self.coordinates_of(torch.arange(n, device=device))

    def coordinates_of(self, i: torch.Tensor) -> list[torch.Tensor]:
        """Each table's index for positions i (any integer tensor)."""
        if self.kind == "image":
            _, w, c = self.sizes
            return [i // (w * c), (i // c) % w, i % c]
        if self.kind == "stride":
            return [i // self.stride, i % self.stride]
        return [i]

    def forward(self, n: int, device) -> torch.Tensor:
        return self.at(torch.arange(n, device=device))  # (N, D)

    def at(self, i: torch.Tensor) -> torch.Tensor:
        """The embeddings of positions i: [*i.shape, D]."""
        return sum(t[idx] for t, idx in zip(self.tables, self.coordinates_of(i)))


# ---- the model -------------------------------------------------------------------------------------------------------
class SparseTransformer(nn.Module):
    """Byte-level autoregressive Sparse Transformer: tokens [B, N] (uint8 or int64) -> logits [B, N, V] fp32.

    Slot t of the output predicts byte t from bytes 0..t-1 (see the module docstring on the input shift).

    Example:
        >>> from sparse_transformer.presets import load_preset
        >>> model = SparseTransformer(load_preset("demo"))
        >>> bits = model.loss(torch.randint(0, 256, (2, 256)))  # mean bits per byte
    """

    def __init__(self, cfg: SparseTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.start = nn.Parameter(torch.empty(cfg.d_model))  # the learned input of slot 0
        self.pos_emb = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # W_out, untied, zero at init
        self._layouts: dict[int, list[layouts.Layout]] = {}
        self.reset_parameters()

    # ---- init (paper section 6; SPEC section 3) --------------------------------------------------------------------
    def weight_std(self, fan_in: int) -> float:
        """Std of a weight matrix with this fan-in: the paper's N(0, 0.125/sqrt(d_in)) in the config's reading."""
        return math.sqrt(0.125 / fan_in) if self.cfg.init_scheme == "code" else 0.125 / math.sqrt(fan_in)

    def reset_parameters(self):
        """Token embedding and start vector std 0.125/sqrt(d); position tables 0.125/sqrt(d * n_emb) (both readings
        agree on the embeddings, paper-spec.md 3.4); block matrices weight_std(fan_in), W_p and W_2 further scaled by
        1/sqrt(2N); biases 0; LayerNorm gain 1, bias 0; W_out 0."""
        d, depth = self.cfg.d_model, 1.0 / math.sqrt(2 * self.cfg.n_layer)
        nn.init.normal_(self.tok_emb.weight, std=0.125 / math.sqrt(d))
        nn.init.normal_(self.start, std=0.125 / math.sqrt(d))
        for t in self.pos_emb.tables:
            nn.init.normal_(t, std=0.125 / math.sqrt(d * len(self.pos_emb.tables)))
        for name, mod in self.blocks.named_modules():
            if isinstance(mod, nn.Linear):
                scale = depth if name.endswith(("attn.proj", "mlp.proj")) else 1.0
                nn.init.normal_(mod.weight, std=self.weight_std(mod.in_features) * scale)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                mod.reset_parameters()
        self.ln_f.reset_parameters()
        nn.init.zeros_(self.head.weight)

    # ---- layouts ---------------------------------------------------------------------------------------------------
    def layer_layouts(self, n: int) -> list[layouts.Layout]:
        """The attention layout of each layer at sequence length n (built once per n)."""
        if n not in self._layouts:
            self._layouts[n] = build_layer_layouts(self.cfg, n)
        return self._layouts[n]

    # ---- forward ---------------------------------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, cache: "KVCache | None" = None) -> torch.Tensor:
        """tokens [B, N] -> the final-normed residual stream [B, N, D] (what W_out reads). With a cache, every layer's
        keys and values of slots 0..N-1 are written into it (the prefill of cached decoding)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, n], got shape {tuple(tokens.shape)}")
        B, N = tokens.shape
        if not 1 <= N <= self.cfg.n_ctx:
            raise ValueError(f"sequence length {N} must be in 1..n_ctx={self.cfg.n_ctx}")
        x = self.tok_emb(tokens[:, :-1].long())  # (B, N-1, D): byte t-1 feeds slot t
        x = torch.cat([self.start.expand(B, 1, -1).to(x.dtype), x], dim=1)  # (B, N, D)
        x = x + self.pos_emb(N, tokens.device)
        if cache is not None and (cache.length < N or cache.k[0].shape[0] != B):
            raise ValueError(f"the cache holds {cache.k[0].shape[0]} sequences of {cache.length} positions; "
                             f"tokens are {B} sequences of {N}")
        recompute = self.cfg.recompute and torch.is_grad_enabled()
        for r, (block, layout) in enumerate(zip(self.blocks, self.layer_layouts(N))):
            if cache is not None:
                x = block(x, layout, cache.layer(r))
            else:
                x = checkpoint(block, x, layout, use_reentrant=False) if recompute else block(x, layout)
        return self.ln_f(x)

    # ---- cached decoding (decoding.py drives it) -------------------------------------------------------------------
    def new_cache(self, batch: int, length: int | None = None, dtype=None, device=None) -> "KVCache":
        """Empty key/value caches for `batch` sequences of up to `length` (default n_ctx) positions."""
        length = self.cfg.n_ctx if length is None else length
        if not 1 <= length <= self.cfg.n_ctx:
            raise ValueError(f"cache length {length} must be in 1..n_ctx={self.cfg.n_ctx}")
        p = self.head.weight
        return KVCache.empty(self.cfg, batch, length, dtype or p.dtype, device or p.device)

    def decode_step(self, prev: torch.Tensor, pos, cache: "KVCache", compiled: bool = False) -> torch.Tensor:
        """Logits [B, V] (fp32) of slot pos, whose input is byte pos - 1 (prev [B]; ignored at pos 0, which reads the
        start vector). Rows 0..pos-1 of the cache must hold the earlier slots; row pos is written. pos: int, or an
        int64 tensor [1] on the model's device (then the step does no host sync and can be captured in a CUDA graph).
        compiled: run each block's step through torch.compile (fuses its norms, bias adds and activation; the cache
        write and the attention stay outside the graph; the first call compiles)."""
        x = self.tok_emb(prev.long())  # (B, D)
        start = self.start.to(x.dtype).expand_as(x)
        if isinstance(pos, numbers.Integral):
            pos = int(pos)
            if not 0 <= pos < cache.length:
                raise ValueError(f"position {pos} is outside the cache (length {cache.length})")
            x = start if pos == 0 else x
            x = x + self.pos_emb.at(torch.tensor(pos, device=x.device))
        elif isinstance(pos, torch.Tensor) and pos.shape == (1,) and pos.dtype == torch.int64:
            x = torch.where(pos.view(1, 1) == 0, start, x) + self.pos_emb.at(pos)
        else:
            raise TypeError(f"pos must be an int or an int64 tensor of shape [1], got {pos!r}")
        x = x[:, None]  # (B, 1, D)
        lays = self.layer_layouts(self.cfg.n_ctx)  # the head patterns do not depend on n
        step = _compiled_block_step() if compiled else Block.step
        for r, (block, layout) in enumerate(zip(self.blocks, lays)):
            x = step(block, x, layout, cache.layer(r), pos)
        return self.logits(self.ln_f(x))[:, 0]

    def generate(self, prefix: torch.Tensor, num_new: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 progress: bool = False, cuda_graph: bool | None = None, compile: bool = False) -> torch.Tensor:
        """Sample num_new bytes after prefix [B, t] (t may be 0) -> [B, t + num_new] int64. See decoding.generate."""
        from .decoding import generate

        return generate(self, prefix, num_new, temperature=temperature, top_k=top_k, top_p=top_p,
                        use_cache=use_cache, generator=generator, progress=progress, cuda_graph=cuda_graph,
                        compile=compile)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] -> logits [..., V] in the weights' dtype (fp32): W_out runs outside autocast (bf16 logits lose
        bits)."""
        with torch.autocast(h.device.type, enabled=False):
            return self.head(h.to(self.head.weight.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] uint8 / int64 -> logits [B, N, V] fp32; slot t predicts tokens[:, t]."""
        return self.logits(self.hidden(tokens))

    def loss(self, tokens: torch.Tensor, score_from: int = 0) -> torch.Tensor:
        """Mean negative log-likelihood in bits per byte of tokens[:, score_from:] given everything before.

        The cross-entropy runs over chunks of cfg.loss_chunk positions, each recomputed in the backward, so the fp32
        [B, N, V] logits never exist at once. score_from > 0 scores only the tail of the window (sliding-window
        evaluation with a minimum context, paper Table 3).
        """
        h = self.hidden(tokens)[:, score_from:].reshape(-1, self.cfg.d_model)  # (B * scored, D)
        target = tokens[:, score_from:].reshape(-1).long()
        if h.shape[0] == 0:
            raise ValueError(f"score_from={score_from} leaves nothing to score in {tokens.shape[1]} positions")
        step = self.cfg.loss_chunk or h.shape[0]
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], step):
            args = (h[s:s + step], target[s:s + step])
            if torch.is_grad_enabled() and h.requires_grad and step < h.shape[0]:
                total = total + checkpoint(self._nll_sum, *args, use_reentrant=False)
            else:
                total = total + self._nll_sum(*args)
        return total / (h.shape[0] * math.log(2))

    def _nll_sum(self, h, target):
        return F.cross_entropy(self.logits(h), target, reduction="sum")

    # ---- reporting -------------------------------------------------------------------------------------------------
    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + sum(t.numel() for t in self.pos_emb.tables)
        return n

    def flops_per_token(self, n: int | None = None) -> float:
        """Estimated training FLOPs per token (forward + backward = 3x forward, no recomputation) at length n:
        2 per multiply-add over the block and output matrices, plus attention's q.k and p.v over the visible keys."""
        n = n or self.cfg.n_ctx
        cfg = self.cfg
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        keys = sum(lay.row_counts().mean() for lay in self.layer_layouts(n))  # visible keys per query, summed
        if cfg.backend == "dense":
            keys = cfg.n_layer * (n + 1) / 2
        return 3 * (2 * matmul + 2 * keys * (cfg.d_qk + cfg.d_model))

    def summary(self, n: int | None = None) -> str:
        """One line: shape, parameters, attention arrangement and density at n (default n_ctx), training FLOPs/token."""
        cfg, n = self.cfg, n or self.cfg.n_ctx
        lays = self.layer_layouts(n)
        density = sum(lay.density() for lay in lays) / len(lays)
        pat = cfg.pattern if cfg.pattern in ("dense", "local") else f"{cfg.pattern}/{cfg.arrangement}"
        return (f"SparseTransformer: {cfg.n_layer} layers, {cfg.n_head} heads, d={cfg.d_model}, ff={cfg.d_ff}, "
                f"qk={cfg.d_qk} | {self.num_params() / 1e6:.2f}M params | {pat} l={cfg.stride}"
                + (f" c={cfg.summary}" if cfg.pattern == "fixed" else "")
                + f", density {density:.2%} at n={n}, backend {cfg.backend} | "
                  f"{self.flops_per_token(n) / 1e9:.3f} GFLOPs/token (fwd+bwd)")


@functools.cache
def _compiled_block_step():
    """Block.step through torch.compile, made once: the blocks share it (their parameters are graph inputs)."""
    return torch.compile(Block.step)


@dataclass
class KVCache:
    """Per-layer key and value caches: k[r] [B, H, T, Dk], v[r] [B, H, T, Dv]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, cfg: SparseTransformerConfig, batch: int, length: int, dtype, device) -> "KVCache":
        H = cfg.n_head
        shape_k, shape_v = (batch, H, length, cfg.d_qk // H), (batch, H, length, cfg.d_model // H)
        return cls([torch.zeros(shape_k, dtype=dtype, device=device) for _ in range(cfg.n_layer)],
                   [torch.zeros(shape_v, dtype=dtype, device=device) for _ in range(cfg.n_layer)])

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def layer(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[r], self.v[r]


def build_layer_layouts(cfg: SparseTransformerConfig, n: int) -> list[layouts.Layout]:
    """Each layer's layout at length n (paper section 5.1). Strided parts: A1 "local", A2 "strided"; fixed parts:
    A1 "local", A2 "summary" (per-head summary sub-blocks when num_verts > 1).

    interleaved: layer r uses A2 when r % (interleave_ratio + 1) == interleave_ratio, else A1 (A1 comes first).
    merged: every head attends to A1 u A2.  split: heads [0, H/2) attend to A1, heads [H/2, H) to A2.
    """
    if cfg.pattern == "dense":
        return [layouts.dense(n)] * cfg.n_layer
    if cfg.pattern == "local":
        return [layouts.local(n, cfg.stride)] * cfg.n_layer

    def part(name, heads=1):
        if cfg.pattern == "strided":
            return layouts.strided(n, cfg.stride, name)
        verts = cfg.num_verts if name != "local" else 1
        return layouts.fixed(n, cfg.stride, cfg.summary, name, heads=heads if verts > 1 else 1, num_verts=verts)

    a2_name = "strided" if cfg.pattern == "strided" else "summary"
    if cfg.arrangement == "merged":
        return [part("both", cfg.n_head)] * cfg.n_layer
    if cfg.arrangement == "split":
        half = cfg.n_head // 2
        a1, a2 = part("local"), part(a2_name, half)
        heads = [a1] * half + [a2.head(h % a2.num_heads) for h in range(half)]
        return [layouts.stack(heads)] * cfg.n_layer
    a1, a2 = part("local"), part(a2_name, cfg.n_head)
    k = cfg.interleave_ratio
    return [a2 if r % (k + 1) == k else a1 for r in range(cfg.n_layer)]
