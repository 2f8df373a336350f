"""Shared test helpers: seeding, random q/k/v, the FlashAttention-style error bound against the fp64 reference."""
import gc
import os
import random

import numpy as np
import pytest
import torch

from sparse_transformer.attention.reference import attention_ref


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """After each GPU test, hand this process's cached CUDA memory back: GPU tests run in up to 14 processes at once
    (pytest -n), and the fp64 references of the long fp32 cases hold several GiB each (a run on an H200 kept 4-16 GiB
    cached per process and ran out of memory)."""
    yield
    if "gpu" in request.keywords and torch.cuda.is_available() and torch.cuda.is_initialized():
        _drop_graphs()  # (tests that count launches would see a replay of an earlier test's graph instead)
        gc.collect()
        torch.cuda.empty_cache()


def _drop_graphs():
    """Drop the attention's CUDA graphs of replayed launches (attention/triton/replay.py), if Triton is here."""
    try:
        from sparse_transformer.attention.triton import replay
    except ImportError:
        return
    replay.clear()


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "interpreter" in item.keywords and not interp:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 set before Python starts"))


def make_qkv(B, H, n, D, dtype, device="cpu", requires_grad=True):
    return [torch.randn(B, H, n, D, dtype=dtype, device=device, requires_grad=requires_grad) for _ in range(3)]


def check_against_reference(fn, q, k, v, layout, floor):
    """Run fn(q, k, v, layout) -> (out, lse) and check out, lse, dq, dk, dv against the float64 reference.

    Pass if max|ours - ref64| <= 2 * max|same-dtype dense - ref64| + floor (FlashAttention's test), per tensor, by name.
    """
    out, lse = fn(q, k, v, layout)
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out.to(acc) * g.to(acc)).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_ref(q64, k64, v64, layout)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), (q64, k64, v64))
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    low, _ = attention_ref(qd, kd, vd, layout, upcast=False)  # the dtype's own error, computed densely
    low_grads = torch.autograd.grad((low.to(acc) * g.to(acc)).sum(), (qd, kd, vd))
    names = ["out", "dq", "dk", "dv"]
    for name, ours, ref_t, low_t in zip(names, [out, *grads], [ref, *ref_grads], [low, *low_grads]):
        assert torch.isfinite(ours).all(), f"{name}: non-finite values"
        err = (ours.double() - ref_t).abs().max().item()
        bound = 2 * (low_t.double() - ref_t).abs().max().item() + floor
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~fin), "lse: rows with no key must be -inf, and only those"
    if fin.any():
        assert (lse[fin].double() - ref_lse[fin]).abs().max().item() <= 1e-2 + floor, "lse mismatch"
    empty = ~fin
    if empty.any():
        assert (out[empty] == 0).all(), "rows with no key must give zero"
