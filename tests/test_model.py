"""Tests for sparse_transformer/model.py: causality per pattern and backend, block vs reference, recomputation, init,
chunked loss, autocast, validation. Tiny float64 models on CPU; backends without CUDA are marked gpu."""
import math

import pytest
import torch

from sparse_transformer.model import Block, SparseTransformer, SparseTransformerConfig, build_layer_layouts


def tiny(**kw) -> SparseTransformerConfig:
    base = dict(n_ctx=48, n_layer=2, n_head=4, d_model=32, d_ff=64, stride=8, summary=2, pattern="fixed",
                arrangement="merged", backend="torch")
    return SparseTransformerConfig(**{**base, **kw})


def make_model(cfg, dtype=torch.float64):
    model = SparseTransformer(cfg).to(dtype)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # W_out starts at zero: make the logits depend on the input
    return model.eval()


ARRANGED = [
    pytest.param(dict(pattern="dense"), id="dense"),
    pytest.param(dict(pattern="local"), id="local"),
    *[pytest.param(dict(pattern=p, arrangement=a), id=f"{p}-{a}")
      for p in ("strided", "fixed") for a in ("interleaved", "merged", "split")],
    pytest.param(dict(pattern="fixed", arrangement="merged", num_verts=2), id="fixed-merged-verts2"),
    pytest.param(dict(pattern="fixed", arrangement="interleaved", num_verts=4), id="fixed-interleaved-verts4"),
    pytest.param(dict(pattern="fixed", arrangement="split", num_verts=2), id="fixed-split-verts2"),
    pytest.param(dict(pattern="strided", arrangement="interleaved", pos_emb="image", image_shape=(4, 4, 3),
                      stride=12), id="strided-image"),
    pytest.param(dict(pattern="strided", arrangement="merged", pos_emb="1d", qk_ratio=0.5), id="strided-1d-halfqk"),
]


def check_causal(model, n, positions=(0, 17, 30)):
    """Changing tokens[:, t] may change logits at slots > t only (slot t predicts byte t), and does change slot t+1."""
    tokens = torch.randint(0, 256, (2, n))
    with torch.no_grad():
        base = model(tokens)
        for t in positions:
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 255, (2,))) % 256
            out = model(changed)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"t={t}: logits at slots <= t changed"
            assert not torch.allclose(out[:, t + 1], base[:, t + 1]), f"t={t}: slot t+1 ignores byte t"


@pytest.mark.parametrize("backend", ["torch", "reference", "dense"])
@pytest.mark.parametrize("arranged", ARRANGED)
def test_causal(arranged, backend):
    cfg = tiny(backend=backend, **arranged)
    check_causal(make_model(cfg), n=cfg.n_ctx if cfg.pos_emb == "image" else 37)  # 37: off the stride grid


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("arranged", ARRANGED)
def test_causal_cuda(arranged, backend):
    cfg = tiny(backend=backend, d_model=64, **arranged)  # triton: head widths 16
    model = make_model(cfg, torch.float32).cuda()
    tokens = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        base = model(tokens)
        changed = tokens.clone()
        changed[:, 20] ^= 1
        assert torch.equal(model(changed)[:, :21], base[:, :21])


@pytest.mark.interpreter
@pytest.mark.parametrize("arranged", ARRANGED)
def test_triton_interpreter_matches_reference(arranged):
    """The triton backend under TRITON_INTERPRET=1 (CPU), fp32: same logits as the reference backend, and causal."""
    cfg = tiny(backend="triton", d_model=64, **arranged)  # head width 16, the kernels' smallest
    model = make_model(cfg, torch.float32)
    tokens = torch.randint(0, 256, (1, 40 if cfg.pos_emb != "image" else cfg.n_ctx))
    with torch.no_grad():
        out = model(tokens)
        for blk in model.blocks:
            blk.attn.cfg = tiny(backend="reference", d_model=64, **arranged)
        torch.testing.assert_close(out, model(tokens), rtol=1e-4, atol=1e-4)
        changed = tokens.clone()
        changed[:, 20] ^= 1
        for blk in model.blocks:
            blk.attn.cfg = cfg
        assert torch.equal(model(changed)[:, :21], out[:, :21])


@pytest.mark.parametrize("arranged", ARRANGED[2:])
def test_block_torch_matches_reference(arranged):
    """One residual block, forward and backward, torch backend vs the dense reference, in float64."""
    cfg = tiny(**arranged)
    block = Block(cfg).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    n = cfg.n_ctx if cfg.pos_emb == "image" else 41
    layout = build_layer_layouts(cfg, n)[1]  # the second layer: the A2 part when interleaved
    x = torch.randn(2, n, cfg.d_model, dtype=torch.float64, requires_grad=True)
    results = {}
    for backend in ("torch", "reference"):
        block.attn.cfg = tiny(**arranged, backend=backend)
        out = block(x, layout)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [x, *block.parameters()])
        results[backend] = (out, grads)
    (out_t, g_t), (out_r, g_r) = results["torch"], results["reference"]
    torch.testing.assert_close(out_t, out_r, rtol=1e-10, atol=1e-10)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, a, b in zip(names, g_t, g_r):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


def test_dense_backend_matches_dense_reference():
    cfg = tiny(pattern="dense", backend="dense")
    model = make_model(cfg)
    tokens = torch.randint(0, 256, (2, 33))
    out = model(tokens)
    for blk in model.blocks:
        blk.attn.cfg = tiny(pattern="dense", backend="reference")
    torch.testing.assert_close(out, model(tokens), rtol=1e-10, atol=1e-10)


def test_recompute_gives_same_grads():
    """Checkpointed blocks replay the dropout masks (preserve_rng_state), so gradients match the plain backward."""
    grads = []
    for recompute in (False, True):
        torch.manual_seed(1)
        model = make_model(tiny(dropout=0.2, recompute=recompute, pattern="strided", arrangement="interleaved"))
        model.train()
        torch.manual_seed(2)
        model.loss(torch.randint(0, 256, (2, 40))).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-12, atol=1e-14, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("scheme", ["code", "std"])
def test_init_statistics(scheme):
    cfg = SparseTransformerConfig(n_ctx=1024, n_layer=8, n_head=4, d_model=256, d_ff=1024, qk_ratio=0.5, stride=32,
                                  init_scheme=scheme)
    model = SparseTransformer(cfg)
    rule = (lambda fan: math.sqrt(0.125 / fan)) if scheme == "code" else (lambda fan: 0.125 / math.sqrt(fan))
    depth = 1 / math.sqrt(2 * cfg.n_layer)
    d = cfg.d_model

    def assert_std(t, want, name):
        got = t.detach().std().item()
        assert abs(got - want) <= 0.03 * want, f"{name}: std {got:.5f}, spec {want:.5f}"

    assert_std(model.tok_emb.weight, 0.125 / math.sqrt(d), "token embedding")
    for t in model.pos_emb.tables:
        assert_std(t, 0.125 / math.sqrt(d * 2), "position embedding")
    weights = torch.cat([b.attn.qkv.weight.flatten() for b in model.blocks])
    assert_std(weights, rule(d), "q/k/v")
    assert_std(torch.cat([b.mlp.fc.weight.flatten() for b in model.blocks]), rule(d), "W_1")
    assert_std(torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]), rule(d) * depth, "W_p")
    assert_std(torch.cat([b.mlp.proj.weight.flatten() for b in model.blocks]), rule(cfg.d_ff) * depth, "W_2")
    assert (model.head.weight == 0).all(), "W_out must start at zero"
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert (p == 0).all(), f"{name} must start at zero"
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert (p == 1).all(), f"{name} must start at one"
    # a zero W_out means a uniform prediction: exactly 8 bits per byte
    assert abs(model.loss(torch.randint(0, 256, (1, 64))).item() - 8.0) < 1e-5


def test_chunked_loss_matches_unchunked():
    tokens = torch.randint(0, 256, (2, 45))
    results = []
    for chunk in (0, 7):
        torch.manual_seed(3)
        model = make_model(tiny(loss_chunk=chunk))
        loss = model.loss(tokens)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=0)
    for k in results[0][1]:
        torch.testing.assert_close(results[1][1][k], results[0][1][k], rtol=1e-10, atol=1e-13)
    # and both equal the cross-entropy of the full logits, in bits
    logits = model(tokens)
    bits = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) / math.log(2)
    torch.testing.assert_close(results[0][0], bits.detach(), rtol=1e-12, atol=0)


def test_loss_score_from_scores_the_tail():
    model = make_model(tiny())
    tokens = torch.randint(0, 256, (2, 40))
    logits = model(tokens)[:, 30:]
    bits = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 30:].flatten()) / math.log(2)
    torch.testing.assert_close(model.loss(tokens, score_from=30), bits, rtol=1e-12, atol=0)


def test_forward_shapes_uint8_and_short_sequences():
    model = make_model(tiny(), torch.float32)
    tokens = torch.randint(0, 256, (3, 48), dtype=torch.uint8)
    out = model(tokens)
    assert out.shape == (3, 48, 256) and out.dtype == torch.float32
    assert model(tokens[:, :1]).shape == (3, 1, 256)
    short = model(tokens[:, :20])  # a prefix gives the same logits as the full sequence's first 20 slots
    torch.testing.assert_close(short, out[:, :20], rtol=1e-5, atol=1e-5)
    assert set(model._layouts) == {48, 1, 20}, "layouts are built once per length"
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_autocast_bf16_cpu():
    model = make_model(tiny(), torch.float32).train()
    tokens = torch.randint(0, 256, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        loss = model.loss(tokens)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def train_losses(model, opt, tokens, steps):
    """Losses of `steps` optimizer steps on one batch."""
    losses = []
    for _ in range(steps):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_demo_sized_model_learns():
    """A few Adam steps on one repeated batch lower the loss (a smoke test of the training path)."""
    cfg = tiny(n_ctx=64, d_model=64, stride=8, summary=2, dropout=0.1)
    model = SparseTransformer(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    tokens = torch.arange(64).repeat(4, 1) % 7 * 30
    losses = train_losses(model, opt, tokens, 15)
    assert losses[0] == pytest.approx(8.0, abs=1e-4) and losses[-1] < 4.0, losses


def test_layer_layouts_follow_the_arrangement():
    lays = build_layer_layouts(tiny(pattern="strided", arrangement="interleaved", n_layer=4), 64)
    assert [lay.heads[0].describe() for lay in lays] == ["local(w=8)", "strided(l=8)"] * 2
    lays = build_layer_layouts(tiny(pattern="strided", arrangement="interleaved", n_layer=4, interleave_ratio=3), 64)
    assert [bool(lay.heads[0].stride) for lay in lays] == [False, False, False, True]
    split = build_layer_layouts(tiny(pattern="fixed", arrangement="split", num_verts=2), 64)[0]
    assert split.num_heads == 4
    assert [h.summary for h in split.heads] == [None, None, (8, 6, 8), (8, 4, 6)]
    merged = build_layer_layouts(tiny(pattern="fixed", num_verts=4, summary=2), 64)[0]
    assert [h.summary[1:] for h in merged.heads] == [(6, 8), (4, 6), (2, 4), (0, 2)]


def test_summary_line():
    model = SparseTransformer(tiny())
    line = model.summary()
    for part in ("2 layers", "4 heads", "params", "density", "at n=48", "FLOPs/token"):
        assert part in line, line


BAD = [
    (dict(n_head=5), "n_head"),
    (dict(qk_ratio=0.3), "qk_ratio"),
    (dict(qk_ratio=0.0), "qk_ratio"),
    (dict(stride=64), "stride"),
    (dict(summary=16), "summary"),
    (dict(num_verts=8), "num_verts"),
    (dict(num_verts=3, summary=2), "num_verts"),
    (dict(arrangement="split", n_head=2, num_verts=2), "num_verts"),
    (dict(pattern="strided", arrangement="split", n_head=1, d_model=32), "n_head"),
    (dict(pattern="butterfly"), "pattern"),
    (dict(arrangement="mixed"), "arrangement"),
    (dict(backend="cuda"), "backend"),
    (dict(backend="triton", n_head=32), "backend"),
    (dict(block_size=48), "block_size"),
    (dict(pos_emb="image", image_shape=(4, 4, 2)), "image_shape"),
    (dict(pos_emb="image"), "image_shape"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_layer=0), "n_layer"),
    (dict(d_ff=2.5), "d_ff"),
    (dict(loss_chunk=-1), "loss_chunk"),
    (dict(activation="relu"), "activation"),
    (dict(init_scheme="variance"), "init_scheme"),
]


@pytest.mark.parametrize("kw,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_config_raises(kw, field):
    """The message names the field and its value, then says what would work."""
    with pytest.raises(ValueError) as err:
        tiny(**kw)
    value = kw.get(field, tiny().image_shape if field == "image_shape" else None)
    assert str(err.value).startswith(f"{field}={value!r}: "), str(err.value)


def test_compiled_blocks_match_eager():
    """torch.compile of each block (train.compile) traces around the attention call and computes the same loss and
    gradients."""
    cfg = SparseTransformerConfig(n_ctx=64, n_layer=2, n_head=2, d_model=32, d_ff=64, pattern="strided",
                                  arrangement="merged", stride=8, backend="torch")
    torch.manual_seed(0)
    eager = SparseTransformer(cfg)
    torch.nn.init.normal_(eager.head.weight, std=0.1)  # W_out starts at zero, which would zero every block gradient
    compiled = SparseTransformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.blocks:
        block.compile()
    x = torch.randint(0, 256, (2, 64))
    le, lc = eager.loss(x), compiled.loss(x)
    le.backward()
    lc.backward()
    assert abs(le.item() - lc.item()) < 1e-5
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert a.grad.abs().max() > 0, name
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.gpu
def test_training_with_fused_dq_tracks_deterministic_mode():
    """A tiny strided model (merged heads: its transposed part adds dQ from the dK/dV kernel with atomics) trained on
    CUDA, and again in torch's deterministic mode (separate dQ kernels): the losses fall and agree to float32 noise,
    and deterministic mode repeats itself bit for bit."""

    def run(deterministic):
        torch.manual_seed(0)
        cfg = tiny(backend="triton", pattern="strided", arrangement="merged", n_ctx=512, stride=32, d_model=64,
                   d_ff=128)
        model = SparseTransformer(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        period = torch.randint(0, 16, (64,), device="cuda")
        tokens = period[torch.arange(512, device="cuda") % 64].expand(4, 512).contiguous()  # learnable: period 64
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            return train_losses(model, opt, tokens, 40)
        finally:
            torch.use_deterministic_algorithms(False)

    fused, det1, det2 = run(False), run(True), run(True)
    assert det1 == det2
    assert fused[-1] < 0.6 * fused[0]
    worst = max(abs(a - b) / b for a, b in zip(fused, det1))
    assert worst < 2e-2, f"fused-dQ training left deterministic training by {worst:.2e} (relative loss)"
