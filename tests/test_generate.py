"""Cached decoding against full forward passes: same greedy tokens, logits within 1e-5 in fp32, every pattern."""
import os

import pytest
import torch

from sparse_transformer import SparseTransformer
from sparse_transformer.decoding import sample_logits
from sparse_transformer.model import SparseTransformerConfig

CASES = [
    dict(pattern="strided", arrangement="merged"),
    dict(pattern="strided", arrangement="interleaved"),
    dict(pattern="strided", arrangement="split"),
    dict(pattern="fixed", arrangement="merged"),
    dict(pattern="fixed", arrangement="interleaved", num_verts=2),
    dict(pattern="fixed", arrangement="split"),
    dict(pattern="dense"),
    dict(pattern="local"),
    dict(pattern="strided", arrangement="merged", pos_emb="image", image_shape=(4, 4, 3), n_ctx=48, stride=12),
]


def _model(backend="torch", **kw):
    args = dict(n_ctx=64, n_layer=3, n_head=2, d_model=32, d_ff=64, qk_ratio=0.5, stride=8, summary=2,
                backend=backend)
    args.update(kw)
    model = SparseTransformer(SparseTransformerConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialized output head would make every logit equal
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("t", [0, 5])
def test_cached_greedy_equals_full_passes(kw, t):
    model = _model(**kw)
    n = model.cfg.n_ctx
    prefix = torch.randint(0, 256, (2, t))
    fast = model.generate(prefix, n - t, temperature=0)
    slow = model.generate(prefix, n - t, temperature=0, use_cache=False)
    assert fast.shape == (2, n) and torch.equal(fast[:, :t], prefix)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_step_logits_equal_forward_logits(kw):
    model = _model(**kw)
    n = model.cfg.n_ctx
    tokens = torch.randint(0, 256, (3, n))
    with torch.no_grad():
        full = model(tokens)  # (B, n, V)
        cache = model.new_cache(3)
        model.hidden(tokens[:, :7], cache=cache)  # prefill slots 0..6, then step the rest
        for s in range(7, n):
            step = model.decode_step(tokens[:, s - 1], s, cache)
            err = (step - full[:, s]).abs().max().item()
            assert err <= 1e-5, f"slot {s}: max logit error {err:.2e}"
        first = model.decode_step(tokens[:, 0], 0, model.new_cache(3))  # slot 0 reads the start vector
        assert (first - full[:, 0]).abs().max().item() <= 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kw", [CASES[0], CASES[4]], ids=["strided-merged", "fixed-interleaved-verts"])
def test_triton_decode_in_model_interpreter(kw):
    pytest.importorskip("triton")
    ours = _model("triton", n_ctx=32, n_layer=2, **{k: v for k, v in kw.items() if k != "n_ctx"})
    ref = _model("torch", n_ctx=32, n_layer=2, **{k: v for k, v in kw.items() if k != "n_ctx"})
    ref.load_state_dict(ours.state_dict())
    prefix = torch.randint(0, 256, (2, 3))
    assert torch.equal(ours.generate(prefix, 29, temperature=0, cuda_graph=False),
                       ref.generate(prefix, 29, temperature=0, use_cache=False))
    # a device position (what a CUDA graph replays) gives the same logits as an int position
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        a, b = ours.new_cache(2), ours.new_cache(2)
        for s in range(32):
            la = ours.decode_step(tokens[:, s - 1], s, a)
            lb = ours.decode_step(tokens[:, s - 1], torch.tensor([s]), b)
            assert torch.equal(la, lb), s


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "dense"])
def test_cuda_graph_decode_any_training_backend(backend):
    """Decoding does not follow the training backend: every config samples through the graph-safe path."""
    model = _model(backend).cuda()
    prefix = torch.randint(0, 256, (2, 4), device="cuda")
    out = model.generate(prefix, 30, temperature=0, cuda_graph=True)
    assert torch.equal(out, model.generate(prefix, 30, temperature=0, cuda_graph=False))


@pytest.mark.gpu
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cuda_graph_decode_matches_eager(kw):
    model = _model("auto", **kw).cuda()
    prefix = torch.randint(0, 256, (4, 6), device="cuda")
    g = torch.Generator("cuda")
    a = model.generate(prefix, 40, generator=g.manual_seed(1), cuda_graph=True)
    b = model.generate(prefix, 40, generator=g.manual_seed(1), cuda_graph=False)
    assert torch.equal(a, b)
    # bf16 cached decoding against fp32 full passes: the step's logits stay close
    tokens = torch.randint(0, 256, (2, model.cfg.n_ctx), device="cuda")
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.hidden(tokens[:, :5], cache=cache)
            steps = [model.decode_step(tokens[:, s - 1], s, cache) for s in range(5, model.cfg.n_ctx)]
    err = (torch.stack(steps, 1) - full[:, 5:]).abs().max().item()
    assert err < 0.1 * full.abs().max().item(), err


@pytest.mark.parametrize("kw", [CASES[1], CASES[4], CASES[6]], ids=["strided-interleaved", "fixed-verts", "dense"])
def test_compiled_decode_step_equals_eager(kw):
    """Blocks through torch.compile (the cache write and the attention outside the graph) give the eager logits and
    write the same cache."""
    model = _model(**kw)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        eager, compiled = model.new_cache(2), model.new_cache(2)
        for s in range(12):
            a = model.decode_step(tokens[:, s - 1], s, eager)
            b = model.decode_step(tokens[:, s - 1], s, compiled, compiled=True)
            assert (a - b).abs().max().item() <= 1e-5, f"slot {s}"
    for x, y in zip(eager.k + eager.v, compiled.k + compiled.v):
        assert torch.allclose(x, y, atol=1e-6) and x[:, :, :12].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [CASES[0], CASES[4], CASES[6]], ids=["strided-merged", "fixed-verts", "dense"])
def test_compiled_cuda_graph_decode_matches_eager(kw):
    model = _model("auto", **kw).cuda()
    prefix = torch.randint(0, 256, (3, 5), device="cuda")
    g = torch.Generator("cuda")
    a = model.generate(prefix, 30, generator=g.manual_seed(2), cuda_graph=True, compile=True)
    b = model.generate(prefix, 30, generator=g.manual_seed(2), cuda_graph=True)
    assert torch.equal(a, b)


def test_sample_logits_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample_logits(logits, top_k=1, generator=g).tolist() == [1, 0]
    draws = torch.stack([sample_logits(logits, top_k=2, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 3}  # only the two likeliest ids, both seen
    draws = torch.stack([sample_logits(logits, top_p=0.5, generator=g) for _ in range(100)])
    assert set(draws[:, 0].tolist()) == {1}  # id 1 alone holds >= 0.5 of row 0's mass
    a = sample_logits(logits.repeat(50, 1), generator=torch.Generator().manual_seed(3))
    b = sample_logits(logits.repeat(50, 1), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_logits(logits, **bad)


def test_generate_rejects_bad_input():
    model = _model()
    assert torch.equal(model.generate(torch.ones(2, 3, dtype=torch.long), 0), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, cuda_graph=True)
    with pytest.raises(ValueError, match="cache holds"):
        model.hidden(torch.zeros(2, 10, dtype=torch.long), cache=model.new_cache(2, 5))
    with pytest.raises(ValueError, match="cache length"):
        model.new_cache(1, 0)
    with pytest.raises(TypeError, match="pos must be"):
        model.decode_step(torch.zeros(1, dtype=torch.long), torch.tensor(3), model.new_cache(1))
    with pytest.raises(ValueError, match="n_ctx"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 60)
    with pytest.raises(ValueError, match="batch"):
        model.generate(torch.zeros(10, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="values"):
        model.generate(torch.full((1, 2), 300), 3)
