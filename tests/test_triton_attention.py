"""Triton kernels against the float64 reference: tiny shapes in the interpreter (CI), the full matrix on a GPU."""
import os

import pytest
import torch

from conftest import check_against_reference, make_qkv
from sparse_transformer import layouts

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
triton = pytest.importorskip("triton")
from sparse_transformer.attention.triton.function import sparse_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(block_m=None, block_n=None):
    return lambda q, k, v, lay: sparse_attention_triton(q, k, v, lay, block_m=block_m, block_n=block_n)


def _views(B, n, heads, D, dtype):
    """q, k, v [B, heads, n, D] as views of one [B, n, 3, heads, D] projection on the GPU (a model's strides)."""
    qkv = torch.randn(B, n, 3, heads, D, dtype=dtype, device="cuda")
    return tuple(qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))


def _check_fresh(q, k, v, lay, floor):
    """check_against_reference on launch tables built for the settings the test patched, dropped after."""
    from sparse_transformer.attention.triton import function

    function.clear_cache()
    try:
        check_against_reference(_run(), q, k, v, lay, floor=floor)
    finally:
        function.clear_cache()


def _record(monkeypatch, module, name, pick):
    """Wrap module.name: each call appends pick(args, kwargs) to the returned list, then runs the original."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(pick(a, kw)) or real(*a, **kw))
    return calls


def _empty_row_blocks(nb):
    m = torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    if nb > 1:
        m[1] = False  # block row 1 sees no key at all
    return m


SMALL = [
    ("dense-n33", lambda: layouts.dense(33)),
    ("local-n50-w7", lambda: layouts.local(50, 7)),
    ("strided-both-n97-l10", lambda: layouts.strided(97, 10)),
    ("strided-a2-n100-l10", lambda: layouts.strided(100, 10, "strided")),
    ("fixed-both-n97-l16-c4", lambda: layouts.fixed(97, 16, 4)),
    ("fixed-summary-n97-l16-c4", lambda: layouts.fixed(97, 16, 4, "summary")),
    ("fixed-verts4-n130-l32-c8", lambda: layouts.fixed(130, 32, 8, heads=4, num_verts=4)),
    ("split-heads-n97-l10", lambda: layouts.stack([layouts.strided(97, 10, "local"), layouts.strided(97, 10, "strided")])),
    ("custom-empty-row-n100", lambda: layouts.from_blocks(_empty_row_blocks(4), 32, n=100)),
    ("single-key-rows-n1", lambda: layouts.fixed(1, 4, 1)),
    ("mixed-heads-n97", lambda: layouts.stack([layouts.strided(97, 10), layouts.fixed(97, 16, 4)])),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make", SMALL, ids=[c[0] for c in SMALL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreter_matches_reference(name, make, dtype):
    lay = make()
    H = 2 if lay.num_heads == 1 else lay.num_heads
    q, k, v = make_qkv(1, H, lay.n, 16, dtype)
    check_against_reference(_run(16, 16), q, k, v, lay, floor=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make", SMALL, ids=[c[0] for c in SMALL])
@pytest.mark.parametrize("one", [True, False], ids=["one-loop", "split"])
def test_interpreter_one_loop(name, make, one, monkeypatch):
    """forward.ONE_LOOP and backward.ONE_LOOP forced on (full and partial tiles in one loop, the element rule behind a
    runtime branch) and off (an unmasked loop, then a masked one) against the reference, on every small layout; every
    kernel must have run that way (explicit tiles: the generic backward always, no block kernel). By default each
    pass picks by its stage count (common.one_loop), so the other tests run a mix of both."""
    from sparse_transformer.attention.triton import backward, forward

    monkeypatch.setattr(forward, "ONE_LOOP", one)
    monkeypatch.setattr(backward, "ONE_LOOP", one)
    ran = _record(monkeypatch, forward, "launch_kernel", lambda a, kw: a[4].get("ONE_LOOP"))
    ran_bwd = _record(monkeypatch, backward, "launch_kernel", lambda a, kw: a[4].get("ONE_LOOP"))
    lay = make()
    H = 2 if lay.num_heads == 1 else lay.num_heads
    check_against_reference(_run(16, 16), *make_qkv(1, H, lay.n, 16, torch.float32), lay, floor=1e-5)
    assert ran and set(ran) == {one} and ran_bwd and set(ran_bwd) == {one}


@pytest.mark.interpreter
def test_one_loop_rule(monkeypatch):
    """By default a pass runs one loop exactly when it pipelines (2+ stages) and TUNING does not keep it split (the
    gathered dK/dV); forcing either way overrides it, and each kernel launches with its pass's choice."""
    from sparse_transformer.attention.triton import backward, forward
    from sparse_transformer.attention.triton.common import one_loop
    from sparse_transformer.attention.triton.function import TUNING, clear_cache, get_launches

    assert one_loop(None, True) and not one_loop(None, False) and one_loop(True, False) and not one_loop(False, True)
    lay = layouts.fixed(97, 16, 4)  # a natural band, then the gathered summary part
    launches = get_launches(lay, 16, torch.device("cpu"), 16, 16)
    assert [launch.seg.kind for launch in launches] == ["natural", "gather"]
    for launch in launches:
        split = TUNING[(launch.seg.kind, 64)].get("split", ())
        for name in ("fwd", "dq", "dkdv"):
            p = getattr(launch, name)
            assert p.one_loop == (p.stages >= 2 and name not in split), (launch.seg.kind, name)
    assert not launches[1].dkdv.one_loop and launches[1].fwd.one_loop  # the gathered dK/dV stays split
    assert not launches[0].dkdv.one_loop and launches[0].fwd.one_loop  # the band's 1-stage dK/dV too
    monkeypatch.setattr(forward, "ONE_LOOP", None)
    monkeypatch.setattr(backward, "ONE_LOOP", None)
    ran = _record(monkeypatch, forward, "launch_kernel", lambda a, kw: a[4].get("ONE_LOOP"))
    ran_bwd = _record(monkeypatch, backward, "launch_kernel", lambda a, kw: (a[0].__name__, a[4].get("ONE_LOOP")))
    q, k, v = make_qkv(1, 2, lay.n, 16, torch.float32)
    check_against_reference(_run(16, 16), q, k, v, lay, floor=1e-5)
    assert ran == [launch.fwd.one_loop for launch in launches]
    want = [("_attn_bwd_dq_kernel", launch.dq.one_loop) for launch in launches]
    want += [("_attn_bwd_dkdv_kernel", launch.dkdv.one_loop) for launch in launches]
    assert sorted(ran_bwd) == sorted(want)
    # the band's forward on 1 stage and its dQ on 2: each launch must carry its own pass's choice
    tuned = dict(TUNING[("natural", 64)], fwd=TUNING[("natural", 64)]["fwd"][:3] + (1,))
    monkeypatch.setitem(TUNING, ("natural", 64), tuned)
    clear_cache()
    try:
        launches = get_launches(lay, 16, torch.device("cpu"), 16, 16)
        assert not launches[0].fwd.one_loop and launches[0].dq.one_loop
    finally:
        clear_cache()  # no launch built from the patched TUNING outlives the test


@pytest.mark.interpreter
def test_interpreter_maxnreg(monkeypatch):
    """TUNING's per-pass register caps reach exactly that pass's launches (as Triton's maxnreg) and change nothing
    computed: on Hopper with the Triton they were measured with (both patched in here) the window band's and the
    transposed forwards on their tuned tiles with 16-bit inputs; none off Hopper (the CPU here), on other tiles (chosen
    or shrunk to short chunks), with fp32, on the fixed pattern's block band, with WIN_ALONE off (the band's), or where
    TUNING has none."""
    from sparse_transformer.attention.triton import backward, forward, function
    from sparse_transformer.attention.triton.function import TUNING

    lay = layouts.strided(640, 10)  # the window band, then the transposed part in chunks of 64 (its 64 x 32 tiles)
    q, k, v = make_qkv(1, 1, lay.n, 16, torch.float16)
    ran = _record(monkeypatch, forward, "launch_kernel", lambda a, kw: a[4].get("maxnreg"))
    ran_bwd = _record(monkeypatch, backward, "launch_kernel", lambda a, kw: a[4].get("maxnreg"))
    _check_fresh(q, k, v, lay, 2e-3)
    assert ran == [None, None] and ran_bwd and set(ran_bwd) == {None}  # not Hopper
    ran.clear()
    ran_bwd.clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(function, "MAXNREG_TRITON", tuple(int(x) for x in triton.__version__.split(".")[:2]))
    caps = function._register_caps
    monkeypatch.setattr(function, "_register_caps", lambda cfg, device, *rule: caps(cfg, "cuda", *rule))
    _check_fresh(q, k, v, lay, 2e-3)
    assert ran == [96, 88] and ran_bwd and set(ran_bwd) == {None}
    ran.clear()
    _check_fresh(*make_qkv(1, 1, lay.n, 16, torch.float32), lay, 1e-5)
    assert ran == [None, None]  # fp32
    try:
        function.clear_cache()
        fwd = lambda *a: [launch.fwd.maxnreg for launch in function.get_launches(*a)]  # noqa: E731
        assert fwd(lay, 16, "cpu") == [96, 88]
        assert fwd(lay, 16, "cpu", 32, 32) == [None, None]  # explicit tiles
        assert fwd(layouts.strided(97, 10), 16, "cpu") == [96, None]  # chunks of 10: the transposed tile shrinks
        assert fwd(layouts.fixed(640, 64, 16), 16, "cpu") == [None, None]  # the block band, the gathered summary
        monkeypatch.setattr(function, "WIN_ALONE", False)
        function.clear_cache()
        assert fwd(lay, 16, "cpu") == [None, 88]
        monkeypatch.setattr(function, "WIN_ALONE", True)
        monkeypatch.setattr(function, "MAXNREG_TRITON", (3, 0))
        function.clear_cache()
        assert fwd(lay, 16, "cpu") == [None, None]  # another Triton
        monkeypatch.setattr(function, "MAXNREG_TRITON", tuple(int(x) for x in triton.__version__.split(".")[:2]))
        for kind in ("natural", "transposed"):
            monkeypatch.setitem(TUNING, (kind, 64), {kk: vv for kk, vv in TUNING[(kind, 64)].items()
                                                     if kk != "maxnreg"})
        function.clear_cache()
        assert fwd(lay, 16, "cpu") == [None, None]
    finally:
        function.clear_cache()


LONG_PARTS = [  # parts longer than the sequence, past the kernels' int32 parameters (the plan clamps them to n)
    ("local-w2^32", lambda: layouts.local(50, 2**32 + 5)),
    ("strided-l2^31", lambda: layouts.strided(60, 2**31 + 7)),
    ("fixed-local-l2^31", lambda: layouts.fixed(40, 2**31 + 3, 4, "local")),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make", LONG_PARTS, ids=[c[0] for c in LONG_PARTS])
def test_interpreter_parts_longer_than_the_sequence(name, make):
    lay = make()
    check_against_reference(_run(16, 16), *make_qkv(1, 2, lay.n, 16, torch.float32), lay, floor=1e-5)


WIN_CASES = [  # (name, layout, HAS_WIN of its natural segment with function.WIN_ALONE)
    ("local-n50-w7", lambda: layouts.local(50, 7), 2),
    ("strided-both-n97-l10", lambda: layouts.strided(97, 10), 2),  # the band, then the transposed part
    ("split-heads-n97-l10", lambda: layouts.stack([layouts.strided(97, 10, "local"),
                                                   layouts.strided(97, 10, "strided")]), 2),  # a head with W = 0
    ("mixed-heads-n97", lambda: layouts.stack([layouts.strided(97, 10), layouts.fixed(97, 16, 4)]), 1),  # + blocks
    ("dense-n33", lambda: layouts.dense(33), 0),
    ("negative-window-head-n40", lambda: layouts.stack([  # a head built with window < 0 sees nothing from it (the
        layouts.local(40, 5), layouts.Layout(40, (layouts.HeadPattern(window=-3),))]), 2),  # plan makes it 0)
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make,want", WIN_CASES, ids=[c[0] for c in WIN_CASES])
def test_interpreter_window_alone(name, make, want, monkeypatch):
    """A natural segment whose only rule is the window tests it as one unsigned compare (HAS_WIN=2; heads without a
    window see nothing from it); with other rules, or function.WIN_ALONE off, the general rule (HAS_WIN=1). Both
    match the reference and give the same bits."""
    from sparse_transformer.attention.triton import backward, forward, function

    lay = make()
    H = 2 if lay.num_heads == 1 else lay.num_heads
    q, k, v = make_qkv(1, H, lay.n, 16, torch.float32)
    go = torch.randn_like(q)
    outs = []
    for alone, keys in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(function, "WIN_ALONE", alone)
        monkeypatch.setattr(function, "RULE_KEYS", keys)
        ran_f = _record(monkeypatch, forward, "launch_kernel", lambda a, kw: (a[4]["KIND"], a[4]["HAS_WIN"]))
        ran_b = _record(monkeypatch, backward, "launch_kernel", lambda a, kw: (a[4]["KIND"], a[4]["HAS_WIN"]))
        _check_fresh(q, k, v, lay, 1e-5)
        function.clear_cache()
        o = sparse_attention_triton(q, k, v, lay, block_m=16, block_n=16)[0]
        grads = torch.autograd.grad(o, (q, k, v), go)
        function.clear_cache()
        outs.append((o.detach(), *grads))
        ran = ran_f + ran_b
        natural = {w for kind, w in ran if kind == 0}
        expect = min(want, 1) if not alone else 3 if want == 2 and keys else want
        assert natural == ({expect} if any(kind == 0 for kind, _ in ran) else set()), ran
        assert want == 0 or any(kind == 0 for kind, _ in ran_b), ran_b  # the backward's too
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


RULE_KEY_CASES = [  # (name, layout, tiles): transposed chunks straddling tiles, n not a multiple of the stride
    ("strided-n97-l10", lambda: layouts.strided(97, 10), (16, 16)),
    ("strided-n100-l7-32x16", lambda: layouts.strided(100, 7), (32, 16)),  # tiles longer than the chunks of 15
    ("strided-only-n90-l12", lambda: layouts.strided(90, 12, "strided"), (16, 32)),  # the transposed part first
    ("local-n77-w9", lambda: layouts.local(77, 9), (16, 16)),
    ("strided-n64-l8-aligned", lambda: layouts.strided(64, 8), (16, 16)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make,tiles", RULE_KEY_CASES, ids=[c[0] for c in RULE_KEY_CASES])
def test_interpreter_rule_keys(name, make, tiles, monkeypatch):
    """function.RULE_KEYS: the window band's partial tiles without the key-validity mask (HAS_WIN=3) and the
    transposed part's rule against each query's chunk start (HAS_STR=2, the dK/dV kernels against each key's chunk
    end), again without that mask. On explicit tiles (so the generic transposed dQ and fused dK/dV kernels run, not the
    block kernel) it matches the reference and gives the same bits as the rule with divisions and the mask."""
    from sparse_transformer.attention.triton import backward, forward, function

    lay = make()
    q, k, v = make_qkv(2, 2, lay.n, 16, torch.float32)
    go = torch.randn_like(q)
    outs = []
    for keys in (True, False):
        monkeypatch.setattr(function, "RULE_KEYS", keys)
        flags = lambda a, kw: (a[4]["KIND"], a[4]["HAS_WIN"], a[4]["HAS_STR"])  # noqa: E731
        ran = _record(monkeypatch, forward, "launch_kernel", flags)
        ran_b = _record(monkeypatch, backward, "launch_kernel", flags)
        function.clear_cache()
        try:
            check_against_reference(_run(*tiles), q, k, v, lay, floor=1e-5)
            o = sparse_attention_triton(q, k, v, lay, block_m=tiles[0], block_n=tiles[1])[0]
            outs.append((o.detach(), *torch.autograd.grad(o, (q, k, v), go)))
        finally:
            function.clear_cache()
        kinds = {kind: (w, s) for kind, w, s in ran + ran_b}
        if 1 in kinds:
            assert kinds[1][1] == (2 if keys else 1), kinds
        if 0 in kinds:
            assert kinds[0][0] == (3 if keys else 2), kinds
        assert any(kind == 1 for kind, _, _ in ran_b) or 1 not in kinds, ran_b  # the transposed backward ran
    for a, b in zip(*outs):
        assert torch.equal(a, b)


BLOCK_CASES = [  # (name, layout, head dim): block-causal bands the one-kernel backward takes (block_backward)
    ("fixed-n97-l16-c4", lambda: layouts.fixed(97, 16, 4), 16),  # one tile per block, the last block cut by n
    ("fixed-n130-l32-c8-verts", lambda: layouts.fixed(130, 32, 8, heads=2, num_verts=2), 32),  # per-head summaries
    ("local-n100-l32", lambda: layouts.fixed(100, 32, 8, "local"), 16),  # the band alone: it stores every row
    ("fixed-n300-l128-c32-d128", lambda: layouts.fixed(300, 128, 32), 128),  # d=128: 64-row tiles, two per block
    ("fixed-n200-l64-c16", lambda: layouts.fixed(200, 64, 16), 32),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make,D", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreter_block_backward_matches_reference(name, make, D, dtype, monkeypatch):
    """The block-causal band's one-kernel backward (dQ, dK, dV and Delta, the later summary part reading its Delta)
    against the reference; it must have run, in place of the band's dQ and dK/dV kernels."""
    from sparse_transformer.attention.triton import block_backward, function

    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: a[-3])
    generic = _record(monkeypatch, function, "attn_backward", lambda a, kw: kw["first"])
    lay = make()
    q, k, v = make_qkv(1, 2, lay.n, D, dtype)
    check_against_reference(_run(), q, k, v, lay, floor=1e-5 if dtype == torch.float32 else 2e-3)
    assert ran == [lay.heads[0].block] and True not in generic


@pytest.mark.gpu
@pytest.mark.parametrize("n,L", [(1025, 128), (4096, 256), (700, 64), (300, 48)])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype,tile,stages", [(torch.bfloat16, 64, 1), (torch.float16, 64, 1),
                                               (torch.float32, 64, 1), (torch.bfloat16, 128, 1),
                                               (torch.bfloat16, 64, 2), (torch.float32, 64, 2),
                                               (torch.float16, 64, None)],
                         ids=["bf16", "fp16", "fp32", "bf16-tile128", "bf16-2-stages", "fp32-2-stages", "fp16-default"])
def test_gpu_block_backward_matches_reference(n, L, D, dtype, tile, stages, monkeypatch):
    """The block-causal band's one-kernel backward on the GPU (both tile limits: 128-row tiles spill but must stay
    exact; 1 and 2 pipeline stages, and the module's default), q / k / v as views of one projection; it must have
    run."""
    from sparse_transformer.attention.triton import block_backward

    if stages and stages > 1 and D > 64:
        pytest.skip("head dims over 64 always run 1 stage (block_backward.block_backward)")
    monkeypatch.setattr(block_backward, "MAX_TILE", tile)
    if stages is not None:
        monkeypatch.setattr(block_backward, "STAGES", stages)
    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: a[-3])
    _check_fresh(*_views(2, n, 3, D, dtype), layouts.fixed(n, L, 16), FLOOR[dtype])
    assert ran == [L]


@pytest.mark.gpu
@pytest.mark.parametrize("n,L", [(3072, 96), (3000, 96), (6100, 64), (6144, 64), (8192, 32), (5000, 64)])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype,stages", [(torch.bfloat16, 1), (torch.float16, 1), (torch.float32, 1),
                                          (torch.bfloat16, 2), (torch.bfloat16, None), (torch.float16, None),
                                          (torch.float32, None)],
                         ids=["bf16", "fp16", "fp32", "bf16-2-stages", "bf16-default", "fp16-default", "fp32-default"])
def test_gpu_block_backward_transposed_matches_reference(n, L, D, dtype, stages, monkeypatch):
    """The merged strided pattern's transposed chunks (C = 32, 32 cut by n, 96 cut by n, 96, 256, and 79 on cut tiles)
    through the block kernel on the GPU, q / k / v as views of one projection; it must have run for that segment."""
    from sparse_transformer.attention.triton import block_backward

    if stages and stages > 1 and D > 64:
        pytest.skip("head dims over 64 always run 1 stage (block_backward.block_backward)")
    if stages is not None:  # None: the module's defaults (STAGES, RAGGED)
        monkeypatch.setattr(block_backward, "STAGES", stages)
    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: a[-3])
    _check_fresh(*_views(2, n, 2, D, dtype), layouts.strided(n, L), FLOOR[dtype])
    C = -(-n // L)
    assert ran == ([C] if block_backward.block_tile(C, D, transposed=True) else [])  # C = 256 at d=128: generic


@pytest.mark.gpu
@pytest.mark.parametrize("n,L", [(3072, 96), (3000, 96), (6144, 64), (8192, 32), (5000, 64)])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_block_backward_first_chunks_matches_reference(n, L, D, dtype, monkeypatch):
    """Strided-only layers (the transposed segment first, block_backward.FIRST_CHUNKS) through the block kernel on the
    GPU, q / k / v as views of one projection; it must have run where it has a tile."""
    from sparse_transformer.attention.triton import block_backward

    monkeypatch.setattr(block_backward, "FIRST_CHUNKS", True)
    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: a[-3])
    _check_fresh(*_views(2, n, 2, D, dtype), layouts.strided(n, L, "strided"), FLOOR[dtype])
    C = -(-n // L)
    assert ran == ([C] if block_backward.block_tile(C, D, transposed=True) else [])


@pytest.mark.interpreter
@pytest.mark.parametrize("make,fuses", [(lambda: layouts.fixed(97, 16, 4), [False, False]),
                                        (lambda: layouts.strided(320, 10), [False, True])], ids=["fixed", "strided"])
def test_interpreter_block_backward_switched_off(make, fuses, monkeypatch):
    """SPARSE_TRANSFORMER_BLOCK_BWD=0 (block_backward.BLOCK_BWD): the generic dQ and dK/dV kernels take the band,
    and the fused dK/dV kernel (atomic dQ) the transposed chunks."""
    from sparse_transformer.attention.triton import block_backward, function

    monkeypatch.setattr(block_backward, "BLOCK_BWD", False)
    monkeypatch.setattr(block_backward, "block_backward", lambda *a, **kw: pytest.fail("the block kernel ran"))
    fused = _record(monkeypatch, function, "attn_backward", lambda a, kw: a[-1])
    lay = make()
    _check_fresh(*make_qkv(1, 2, lay.n, 16, torch.float32), lay, 1e-5)
    assert fused == fuses  # per segment: did its dK/dV kernel add dQ with atomics


def test_block_length_only_for_exact_block_bands():
    """Launch.block: the first segment's block length where it is exactly block-causal for every head with a tile
    that divides it; None for windows, dense heads, mixed lengths, lengths no tile divides, or explicit tiles."""
    from sparse_transformer.attention.triton.function import get_launches

    def block(lay, D=64, **kw):
        return get_launches(lay, D, "cpu", **kw)[0].block

    assert block(layouts.fixed(1000, 128, 32)) == 128 and block(layouts.fixed(1000, 256, 32), 128) == 256
    assert block(layouts.fixed(1000, 48, 16)) == 48 and block(layouts.fixed(1000, 24, 8)) is None  # tiles of 16
    assert block(layouts.strided(1000, 32)) is None  # a sliding window
    assert block(layouts.stack([layouts.fixed(1000, 128, 32, "local"), layouts.fixed(1000, 64, 32, "local")])) is None
    assert block(layouts.stack([layouts.fixed(1000, 128, 32), layouts.dense(1000)])) is None
    assert block(layouts.fixed(1000, 128, 32), block_m=32, block_n=32) is None
    assert block(layouts.fixed(1000, 512, 32)) is None and block(layouts.fixed(1000, 128, 32), D=256) is None
    custom = layouts.stack([layouts.fixed(256, 64, 16, "local"), layouts.from_blocks(torch.ones(4, 4, dtype=torch.bool),
                                                                                   64, n=256)])
    assert block(custom) is None  # custom tiles in the band's segment
    assert all(launch.block is None for launch in get_launches(layouts.fixed(1000, 128, 32), 64, "cpu")[1:])


STRIDED_BLOCK_CASES = [  # (name, layout, head dim): transposed strided chunks the block kernel takes (C = ceil(n / L))
    ("strided-n317-l10", lambda: layouts.strided(317, 10), 16),  # C = 32, one tile per chunk, the last row cut by n
    ("strided-n480-l10-d32", lambda: layouts.strided(480, 10), 32),  # C = 48: three 16-row tiles per chunk
    ("split-heads-n320-l10", lambda: layouts.stack([layouts.strided(320, 10, "local"),
                                                    layouts.strided(320, 10, "strided")]), 16),  # one head without it,
    # one with the diagonal (no band to hold it)
    ("mixed-heads-n160", lambda: layouts.stack([layouts.strided(160, 10), layouts.fixed(160, 16, 4)]), 16),  # a
    # gathered summary after it
    ("strict-and-not-n320-l10", lambda: layouts.stack([layouts.strided(320, 10), layouts.strided(320, 10, "strided")]),
     16),  # one head's band holds the diagonal, the other head's chunks keep it
    ("strided-n97-l10-cut", lambda: layouts.strided(97, 10), 16),  # C = 10 on one cut 16-row tile
    ("strided-n250-l10-cut", lambda: layouts.strided(250, 10), 16),  # C = 25 on one cut 32-row tile
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make,D", STRIDED_BLOCK_CASES, ids=[c[0] for c in STRIDED_BLOCK_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreter_block_backward_transposed_matches_reference(name, make, D, dtype, monkeypatch):
    """The transposed strided chunks through the block kernel (adding to the band's dQ, dK, dV, reading its Delta)
    against the reference; it must have run for that segment, and no fused (atomic) dK/dV kernel."""
    from sparse_transformer.attention.triton import block_backward, function

    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: (a[-3], a[-1].seg.kind))
    fused = _record(monkeypatch, function, "attn_backward", lambda a, kw: a[-1])
    lay = make()
    q, k, v = make_qkv(2, 2 if lay.num_heads == 1 else lay.num_heads, lay.n, D, dtype)
    _check_fresh(q, k, v, lay, 1e-5 if dtype == torch.float32 else 2e-3)
    assert ran == [(-(-lay.n // 10), "transposed")] and True not in fused


QUERY_TILE_CASES = [  # (name, layout, head dim, key tile, query tile) where the block kernel's key tile is 32 or 64
    ("fixed-n200-l64-c16-q32", lambda: layouts.fixed(200, 64, 16), 32, 64, 32),  # two query tiles per key tile
    ("fixed-n200-l64-c16-q16", lambda: layouts.fixed(200, 64, 16), 32, 64, 16),  # four, the last block cut by n
    ("fixed-n130-l32-c8-verts-q16", lambda: layouts.fixed(130, 32, 8, heads=2, num_verts=2), 32, 32, 16),
    ("strided-n250-l10-q16", lambda: layouts.strided(250, 10), 16, 32, 16),  # C = 25 on one cut 32-row key tile
    ("strided-n620-l10-q16", lambda: layouts.strided(620, 10), 16, 64, 16),  # C = 62: 64-row key tile, 4 query tiles
    ("split-heads-n640-l10-q32", lambda: layouts.stack([layouts.strided(640, 10, "local"),
                                                        layouts.strided(640, 10, "strided")]), 16, 64, 32),
    # two key tiles per block: the later key tile's query tiles start past the block's first ones
    ("fixed-n300-l128-c16-q32", lambda: layouts.fixed(300, 128, 16), 16, 64, 32),  # the last block cut to 44 rows
    ("strided-n670-l7-q32", lambda: layouts.strided(670, 7), 16, 64, 32),  # C = 96 on two cut 64-row key tiles
    ("strided-only-n670-l7-q32", lambda: layouts.strided(670, 7, "strided"), 16, 64, 32),  # first chunks, C = 96
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,make,D,tile,tq", QUERY_TILE_CASES, ids=[c[0] for c in QUERY_TILE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreter_block_backward_query_tile(name, make, D, tile, tq, dtype, monkeypatch):
    """QUERY_TILE: query tiles shorter than the key tiles (keys as the rows of the products, dQ = dS K) in the block
    kernel, natural band and transposed chunks, against the reference; the launch must have used those tiles."""
    from sparse_transformer.attention.triton import block_backward

    monkeypatch.setattr(block_backward, "QUERY_TILE", tq)
    monkeypatch.setattr(block_backward, "RAGGED", True)
    tiles = _record(monkeypatch, block_backward, "launch_kernel", lambda a, kw: (a[4]["TILE"], a[4]["TQ"]))
    lay = make()
    q, k, v = make_qkv(1, 2, lay.n, D, dtype)
    _check_fresh(q, k, v, lay, 1e-5 if dtype == torch.float32 else 2e-3)
    assert tiles == [(tile, tq)]


@pytest.mark.gpu
@pytest.mark.parametrize("make", [lambda: layouts.fixed(1025, 128, 16), lambda: layouts.fixed(700, 64, 16),
                                  lambda: layouts.strided(3000, 96), lambda: layouts.strided(6100, 64),
                                  lambda: layouts.strided(6100, 64, "strided")],
                         ids=["fixed-n1025-l128", "fixed-n700-l64", "strided-n3000-l96", "strided-n6100-l64",
                              "strided-only-n6100-l64"])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("tq,cap", [(32, 168), (16, 144), (32, None)], ids=["q32-cap168", "q16-cap144", "q32"])
def test_gpu_block_backward_query_tile(make, D, dtype, tq, cap, monkeypatch):
    """QUERY_TILE on the GPU with the register caps it is timed with (MAXNREG, d=64 on 64-row key tiles, 16-bit
    inputs on Hopper only), natural bands, transposed chunks (C = 32, 96 cut by n, 96 first), q / k / v as views of
    one projection; the launches must have used those tiles and caps."""
    import triton

    from sparse_transformer.attention.triton import block_backward

    monkeypatch.setattr(block_backward, "QUERY_TILE", tq)
    monkeypatch.setattr(block_backward, "MAXNREG", {(64, 64, tq): cap} if cap else {})
    runs = _record(monkeypatch, block_backward, "launch_kernel",
                   lambda a, kw: (a[4]["TILE"], a[4]["TQ"], a[4].get("maxnreg")))
    lay = make()
    _check_fresh(*_views(2, lay.n, 2, D, dtype), lay, FLOOR[dtype])
    assert runs
    capped = (dtype != torch.float32 and torch.cuda.get_device_capability()[0] == 9
              and triton.__version__.startswith("3.6."))  # where the caps were measured
    for tile, used_tq, used_cap in runs:
        assert used_tq == (tq if tile > tq else tile)
        want = cap if (capped and D == 64 and tile == 64 and used_tq == tq) else None
        assert used_cap == want


def test_query_tile_rule(monkeypatch):
    """query_tile: QUERY_TILES' 32-row query tiles beside 64-row key tiles at d=64 only where the caps apply and the
    block has at most two key tiles; QUERY_TILE forces a length, kept only where it is at least 16, smaller than the
    key tile and divides it."""
    from sparse_transformer.attention.triton import block_backward

    monkeypatch.setattr(block_backward, "QUERY_TILE", None)
    qt = block_backward.query_tile
    assert qt(64, 64, 96, True) == 32 and qt(64, 64, 128, True) == 32  # strided-12k's chunks, fixed-12k's blocks
    assert qt(64, 64, 256, True) == 64 and qt(64, 64, 96, False) == 64  # longer blocks; fp32 / not Hopper
    assert qt(64, 128, 128, True) == 64 and qt(32, 32, 96, True) == 32  # other head dims, other tiles
    assert qt(32, 64, 64, True) == 32  # a 32-row key tile at d=64: no shorter query tile
    monkeypatch.setattr(block_backward, "QUERY_TILE", 32)
    assert [qt(t, 64, 1024, False) for t in (16, 32, 64)] == [16, 32, 32]
    monkeypatch.setattr(block_backward, "QUERY_TILE", 8)
    assert qt(64, 64, 128, True) == 64


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [470, 480])
def test_interpreter_block_backward_transposed_cut_tiles(n, monkeypatch):
    """RAGGED: chunks longer than a tile on cut tiles (C = 47 and 48 on two 32-row tiles, MAX_TILE = 32)."""
    from sparse_transformer.attention.triton import block_backward

    monkeypatch.setattr(block_backward, "RAGGED", True)
    monkeypatch.setattr(block_backward, "MAX_TILE", 32)
    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: a[-3])
    _check_fresh(*make_qkv(1, 2, n, 16, torch.float32), layouts.strided(n, 10), 1e-5)
    assert ran == [-(-n // 10)] and block_backward.block_tile(ran[0], 16, True) == 32


@pytest.mark.interpreter
@pytest.mark.parametrize("n,L,D", [(317, 10, 16), (480, 10, 32), (97, 10, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreter_block_backward_first_chunks(n, L, D, dtype, monkeypatch):
    """A strided-only layer (the transposed segment first, every head; block_backward.FIRST_CHUNKS, on by default)
    through the block kernel, which stores every row's dQ, dK and dV (two batches); off, the generic kernels run."""
    from sparse_transformer.attention.triton import block_backward, function

    ran = _record(monkeypatch, block_backward, "block_backward", lambda a, kw: kw["first"])
    generic = _record(monkeypatch, function, "attn_backward", lambda a, kw: kw["first"])
    lay = layouts.strided(n, L, "strided")
    q, k, v = make_qkv(2, 2, n, D, dtype)
    for on in (True, False):
        monkeypatch.setattr(block_backward, "FIRST_CHUNKS", on)
        ran.clear(), generic.clear()
        _check_fresh(q, k, v, lay, 1e-5 if dtype == torch.float32 else 2e-3)
        assert (ran, generic) == (([True], []) if on else ([], [True]))


def test_block_length_of_transposed_chunks(monkeypatch):
    """Launch.block of a transposed segment: its chunk length C where the block kernel has a tile for it (cut tiles
    where none divides C); None for a first transposed segment with a head that lacks it (its rows would go
    unwritten), chunks longer than 4 tiles, head dims over 128, or explicit tiles."""
    from sparse_transformer.attention.triton import block_backward
    from sparse_transformer.attention.triton.function import get_launches

    monkeypatch.setattr(block_backward, "RAGGED", False)

    def blocks(lay, D=64, **kw):
        return [launch.block for launch in get_launches(lay, D, "cpu", **kw)]

    assert blocks(layouts.strided(12288, 128)) == [None, 96] and blocks(layouts.strided(65536, 256)) == [None, 256]
    assert blocks(layouts.strided(3072, 96), 128) == [None, 32] and blocks(layouts.strided(3000, 96)) == [None, 32]
    assert blocks(layouts.strided(1000, 10)) == [None, 100]  # C = 100: cut 64-row tiles (no tile divides it)
    assert block_backward.block_tile(100, 64, True) == 64 and block_backward.block_tile(10, 64, True) == 16
    assert block_backward.block_tile(96, 64, True) == 32 and block_backward.block_tile(100, 64) is None
    assert blocks(layouts.strided(65536, 128)) == [None, None]  # C = 512: more than 4 tiles of 64
    assert blocks(layouts.strided(1024, 32, "strided")) == [32]  # first, every head (runs unless FIRST_CHUNKS is off)
    mixed = layouts.stack([layouts.strided(1024, 32, "strided"), layouts.fixed(1024, 32, 8, "summary")])
    assert blocks(mixed) == [None, None]  # first, a head without it: its rows would go unwritten
    assert blocks(layouts.strided(12288, 128), 256) == [None, None]
    assert blocks(layouts.strided(8192, 64), 128) == [None, 128] and blocks(layouts.strided(16384, 64)) == [None, 256]
    assert blocks(layouts.strided(16384, 64), 128) == [None, None]  # C = 256: more than 4 tiles of 32 at d=128
    assert blocks(layouts.strided(12288, 128), block_m=32, block_n=32) == [None, None]


@pytest.fixture
def fuse_dq(request, monkeypatch):
    """The segment kinds whose dK/dV kernel adds dQ with atomics (on its dK/dV tiles): "all", "none" or one kind. The
    default TUNING (the transposed kind only) is what the other tests run."""
    from sparse_transformer.attention.triton import function as fn

    for key, cfg in fn.TUNING.items():
        on = request.param == "all" or request.param == key[0]
        monkeypatch.setitem(fn.TUNING, key, dict(cfg, fused=cfg["dkdv"] if on else None))
    fn.clear_cache()
    yield request.param
    fn.clear_cache()


@pytest.mark.interpreter
@pytest.mark.parametrize("fuse_dq", ["all", "none"], indirect=True)
@pytest.mark.parametrize("name,make", SMALL, ids=[c[0] for c in SMALL])
def test_interpreter_fused_dq_either_way_matches_reference(name, make, fuse_dq):
    lay = make()
    H = 2 if lay.num_heads == 1 else lay.num_heads
    q, k, v = make_qkv(1, H, lay.n, 16, torch.float32)
    check_against_reference(_run(16, 16), q, k, v, lay, floor=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("fuse_dq", ["gather"], indirect=True)
def test_interpreter_last_kind_fused_after_unfused_matches_reference(fuse_dq):
    """Natural, transposed (unfused) and gathered (fused) segments. The default TUNING's order, a fused transposed
    part before an unfused gathered one (whose dQ kernel must add, not overwrite), runs in the tests above."""
    lay = dict(SMALL)["mixed-heads-n97"]()
    q, k, v = make_qkv(1, 2, lay.n, 16, torch.float32)
    check_against_reference(_run(16, 16), q, k, v, lay, floor=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [0.3, -0.25, 1e-46], ids=["positive", "negative", "zero-in-fp32"])
def test_interpreter_explicit_scale_either_sign(scale):
    """The gathered forward folds a positive scale into its exponent (max of raw scores, then scaled); a negative one,
    or one that is 0 in fp32 (-inf * 0 = NaN), must not take that path. scale * (q . k) equals the reference's default
    1/sqrt(D) on q scaled by scale * sqrt(D)."""
    from sparse_transformer.attention.reference import attention_ref

    lay = layouts.fixed(70, 16, 4)
    q, k, v = make_qkv(1, 2, 70, 16, torch.float64)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention_triton(q32, k32, v32, lay, scale=scale, block_m=16, block_n=16)
    ref, ref_lse = attention_ref(q * (scale * 4.0), k, v, lay)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out.double() * g).sum(), (q32, k32, v32))
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip((out, lse, *grads), (ref, ref_lse, *ref_grads)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
def test_interpreter_rectangular_tiles_and_head_dim_32():
    lay = layouts.fixed(70, 16, 8)
    q, k, v = make_qkv(2, 1, 70, 32, torch.float32)
    check_against_reference(_run(32, 16), q, k, v, lay, floor=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("group,max_y", [(1, 65535), (4, 65535), (10, 65535), (10, 2)],
                         ids=["head-major", "groups-of-2", "all-heads", "tiles-on-x"])
def test_interpreter_program_order_matches_reference(group, max_y, monkeypatch):
    """Every program grid covers each tile of each head once: B x H = 10 heads one after another, in groups of 2 (4
    rounds down to a divisor), all together, and with the tiles on x (the grid for more tiles than y allows), on band,
    transposed and gathered parts."""
    from sparse_transformer.attention.triton import grid

    monkeypatch.setattr(grid, "HEAD_GROUP", group)
    monkeypatch.setattr(grid, "MAX_GRID_Y", max_y)
    lay = dict(SMALL)["mixed-heads-n97"]()
    q, k, v = make_qkv(5, 2, lay.n, 16, torch.float32)
    check_against_reference(_run(16, 16), q, k, v, lay, floor=1e-5)


def test_program_grid_groups_heads_evenly_and_moves_long_tile_lists_to_x(monkeypatch):
    """Host logic only: the heads per group divide B x H (the L2 rule for dK/dV), the grid covers every head, more
    tiles than y allows go on x, and too many heads for z is a clear error."""
    from sparse_transformer.attention.triton import grid

    cpu = torch.device("cpu")  # the interpreter's device: the H100 / H200 L2 size (50 MB) stands in
    assert grid.program_grid(96, 16) == ((16, 96, 1), 16, False)  # forward / dQ: every head
    assert grid.program_grid(48, 16, 2 * 12288 * 64 * 2, cpu) == ((16, 48, 1), 16, False)  # fixed-12k dK/dV: 3 MB
    assert grid.program_grid(128, 8, 2 * 65536 * 64 * 2, cpu) == ((2, 128, 4), 2, False)  # fixed-64k: 16.8 MB
    assert grid.program_grid(10, 10, 20 << 20, cpu)[:2] == ((2, 10, 5), 2)  # 2 fit and divide 10
    assert grid.program_grid(10, 7, 1 << 40, cpu)[:2] == ((1, 10, 7), 1)
    assert grid.program_grid(70000, 16) == ((70000, 1, 16), 16, True)
    with pytest.raises(ValueError, match="too many"):
        grid.program_grid(10, 65537, 1 << 40, cpu)  # a prime: groups of 1, 65537 on z
    monkeypatch.setattr(grid, "HEAD_GROUP", 4)
    assert grid.program_grid(96, 10)[:2] == ((2, 96, 5), 2)  # the override rounds down to a divisor


@pytest.mark.interpreter
@pytest.mark.parametrize("smem_kib,want", [(None, 64), (227, 64), (99, 32)], ids=["cpu", "sm90", "sm89"])
def test_fused_tile_fits_the_shared_memory(smem_kib, want, monkeypatch):
    """With d=128 the fused tile (64x64, 8 warps) needs 129 KiB of shared memory; devices that give a block less (e.g.
    99 KiB on sm_86 / sm_89) get the 32x32 tiling (host logic only)."""
    from sparse_transformer.attention.triton import function as fn

    monkeypatch.setattr(fn, "_smem_per_block", lambda device: None if smem_kib is None else smem_kib << 10)
    fn.clear_cache()
    launches = fn.get_launches(layouts.strided(8192, 64), 128, torch.device(DEVICE))  # chunks of 128: aligned
    fn.clear_cache()
    assert (launches[1].fused.tab.bm, launches[1].fused.tab.bn) == (want, want)


@pytest.mark.interpreter
@pytest.mark.parametrize("n,stride,want", [(12288, 128, 32), (8192, 64, 64), (3072, 96, 32)],
                         ids=["chunks-of-96", "chunks-of-128", "chunks-of-32"])
def test_fused_tile_fits_the_chunks(n, stride, want):
    """The transposed part's fused dK/dV runs 64x64 tiles where its chunks (n / stride slots) are a multiple of 64 and
    the ragged tiling (32x32) where they would straddle tiles (host logic: tables only, no kernel runs)."""
    from sparse_transformer.attention.triton import function as fn

    fn.clear_cache()
    launches = fn.get_launches(layouts.strided(n, stride), 64, torch.device(DEVICE))
    assert [launch.seg.kind for launch in launches] == ["natural", "transposed"]
    assert launches[0].fused is None  # the first segment keeps its dQ kernel
    tab = launches[1].fused.tab
    assert (tab.bm, tab.bn) == (want, want)
    bm, bn = fn.TUNING[("transposed", 64)]["fwd"][:2]  # the forward's tile, shrunk to fit chunks shorter than it
    C = launches[1].seg.C
    fwd = (bm, bn) if C >= max(bm, bn) else (1 << (C.bit_length() - 1),) * 2
    assert (launches[1].fwd.tab.bm, launches[1].fwd.tab.bn) == fwd


# ---- GPU: the full matrix (run on the device with `pytest -m gpu`) ----------------------------------------------------
GPU_LAYOUTS = [
    ("dense", lambda n: layouts.dense(n)),
    ("strided-both-l32", lambda n: layouts.strided(n, 32)),
    ("strided-a2-l48", lambda n: layouts.strided(n, 48, "strided")),
    ("strided-a1-l64", lambda n: layouts.strided(n, 64, "local")),
    ("fixed-both-l64-c16", lambda n: layouts.fixed(n, 64, 16)),
    ("fixed-summary-l128-c32", lambda n: layouts.fixed(n, 128, 32, "summary")),
    ("fixed-verts-l64-c16", lambda n: layouts.fixed(n, 64, 16, heads=4, num_verts=4)),
    ("split", lambda n: layouts.stack([layouts.strided(n, 32, "local")] * 2 + [layouts.strided(n, 32, "strided")] * 2)),
    ("custom-empty-row", lambda n: layouts.from_blocks(_empty_row_blocks(-(-n // 128)), 128, n=n)),
    ("mixed-heads", lambda n: layouts.stack([layouts.strided(n, 32)] * 2 + [layouts.fixed(n, 64, 16)] * 2)),
]
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 255, 1025])
@pytest.mark.parametrize("name,make", GPU_LAYOUTS, ids=[c[0] for c in GPU_LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_matches_reference(n, name, make, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    lay = make(n)
    q, k, v = make_qkv(2, 4, n, 64, dtype, device="cuda")
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("name,make", [GPU_LAYOUTS[i] for i in (0, 1, 2, 4, 7, 8)],
                         ids=[GPU_LAYOUTS[i][0] for i in (0, 1, 2, 4, 7, 8)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("block", [True, False], ids=["block-bwd", "no-block-bwd"])
@pytest.mark.parametrize("one", [True, False], ids=["one-loop", "split"])
def test_gpu_one_loop(name, make, D, dtype, block, one, monkeypatch):
    """forward.ONE_LOOP and backward.ONE_LOOP forced on / off on the GPU (the default tiles, n cut), against the
    float64 reference; with the block kernel off, the strided layouts' transposed part runs the dK/dV kernel with
    fused (atomic) dQ, where masked loads and atomics on queries past n matter. Every generic kernel must have run
    that way, and the fused one where expected."""
    from sparse_transformer.attention.triton import backward, block_backward, forward

    monkeypatch.setattr(forward, "ONE_LOOP", one)
    monkeypatch.setattr(backward, "ONE_LOOP", one)
    monkeypatch.setattr(block_backward, "BLOCK_BWD", block)
    ran = _record(monkeypatch, backward, "launch_kernel", lambda a, kw: (a[4]["ONE_LOOP"], a[4].get("FUSE_DQ")))
    ran_fwd = _record(monkeypatch, forward, "launch_kernel", lambda a, kw: a[4]["ONE_LOOP"])
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_fresh(*make_qkv(2, 4, 1025, D, dtype, device="cuda"), make(1025), FLOOR[dtype])
    # (a strided-only layer with the block kernel on runs no generic backward kernel)
    assert ran_fwd and set(ran_fwd) == {one} and all(loop == one for loop, _ in ran)
    assert ran or (block and name.startswith("strided-a2"))
    if not block and name.startswith(("strided-both", "split")):
        assert (one, True) in ran  # the fused dK/dV with atomic dQ ran that way


@pytest.mark.gpu
@pytest.mark.parametrize("name,make,want", [(*GPU_LAYOUTS[1], [96, 88]), (*GPU_LAYOUTS[3], [96]),
                                            (*GPU_LAYOUTS[4], [None]), (*GPU_LAYOUTS[7], [96, 88])],
                         ids=[GPU_LAYOUTS[i][0] for i in (1, 3, 4, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_maxnreg(name, make, want, dtype, monkeypatch):
    """The default register caps on the forwards (TUNING's "maxnreg", on Hopper with Triton 3.6: the window band's
    and the transposed part's on their tuned tiles, 16-bit inputs; not the fixed pattern's block band, not fp32)
    against the float64 reference, n cut, chunks of 129 (64 x 32 tiles); the Triton forwards ran with exactly those
    caps."""
    from sparse_transformer.attention.triton import forward, function

    if torch.cuda.get_device_capability()[0] != 9 or not triton.__version__.startswith(
            ".".join(map(str, function.MAXNREG_TRITON)) + "."):
        pytest.skip("the caps apply on Hopper with the Triton they were measured with")
    ran = _record(monkeypatch, forward, "launch_kernel", lambda a, kw: a[4].get("maxnreg"))
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_fresh(*make_qkv(1, 4, 4097, 64, dtype, device="cuda"), make(4097), FLOOR[dtype])
    if dtype == torch.float32 or want == [None]:  # fp32: no caps; fixed: the gathered part may run Gluon
        assert ran and set(ran) == {None}
    else:
        assert ran == want


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 128])
@pytest.mark.parametrize("name,make", [GPU_LAYOUTS[1], GPU_LAYOUTS[4], GPU_LAYOUTS[8]],
                         ids=[GPU_LAYOUTS[i][0] for i in (1, 4, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_head_dims(D, name, make, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    lay = make(777)
    q, k, v = make_qkv(1, 4, 777, D, dtype, device="cuda")
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[dtype])


@pytest.mark.gpu
def test_gpu_non_contiguous_views():
    """q, k, v as the model makes them: views of one [B, N, 3, H, D] projection, transposed."""
    lay = layouts.fixed(300, 64, 16)
    qkv = torch.randn(2, 300, 3, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(32, 32), (64, 64), (128, 64), (64, 32), (128, 128)])
@pytest.mark.parametrize("name,make", [GPU_LAYOUTS[1], GPU_LAYOUTS[2], GPU_LAYOUTS[4]],
                         ids=[GPU_LAYOUTS[i][0] for i in (1, 2, 4)])
def test_gpu_tile_sizes(tiles, name, make):
    lay = make(777)
    q, k, v = make_qkv(1, 2, 777, 64, torch.bfloat16, device="cuda")
    check_against_reference(_run(*tiles), q, k, v, lay, floor=FLOOR[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_dq", ["all", "none"], indirect=True)
@pytest.mark.parametrize("n", [1025])
@pytest.mark.parametrize("name,make", GPU_LAYOUTS, ids=[c[0] for c in GPU_LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_fused_dq_either_way_matches_reference(n, name, make, dtype, fuse_dq):
    torch.backends.cuda.matmul.allow_tf32 = False
    lay = make(n)
    q, k, v = make_qkv(2, 4, n, 64, dtype, device="cuda")
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("group,max_y", [(2, 65535), (3, 65535), (8, 4)],
                         ids=["groups-of-2", "3-rounds-to-2", "tiles-on-x"])
@pytest.mark.parametrize("name,make", [c for c in GPU_LAYOUTS if c[0] in ("fixed-both-l64-c16", "strided-both-l32",
                                                                         "mixed-heads")],
                         ids=["fixed-both-l64-c16", "strided-both-l32", "mixed-heads"])
def test_gpu_program_grids_match_reference(group, max_y, name, make, monkeypatch):
    """The compiled kernels on every program grid through the direct launcher: heads in groups (z > 1), and the tiles
    on x (the grid for more tiles than y allows, forced here by a small limit)."""
    from sparse_transformer.attention.triton import grid

    monkeypatch.setattr(grid, "HEAD_GROUP", group)
    monkeypatch.setattr(grid, "MAX_GRID_Y", max_y)
    lay = make(1025)
    q, k, v = make_qkv(2, 4, 1025, 64, torch.bfloat16, device="cuda")
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("n,L", [(1025, 128), (4096, 256), (300, 128)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("views", [False, True], ids=["contiguous", "views"])
def test_gpu_gluon_gather_matches_reference(n, L, D, dtype, views, monkeypatch):
    """The Gluon forward, dQ and dK / dV of the gathered summary part (forward.GLUON_GATHER, Hopper only), merged into
    or added to the band's results; all three kernels must have run (the launch count grows by 3 per call). With
    views, q, k and v are views of one [B, n, 3, H, D] projection, as in the model: the kernels read K's and V's
    summary rows in place, and q is copied."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    from sparse_transformer.attention.triton import forward, gluon_gather

    monkeypatch.setattr(forward, "GLUON_GATHER", True)
    before = gluon_gather.LAUNCHES
    lay = layouts.fixed(n, L, 32)
    for _ in range(2):  # fresh inputs; the second call's launches go through the direct launcher
        q, k, v = make_qkv(2, 3, n, D, dtype, device="cuda")
        if views:
            q, k, v = _views(2, n, 3, D, dtype)
            assert not k.is_contiguous()
        check_against_reference(_run(), q, k, v, lay, floor=FLOOR[dtype])
    assert gluon_gather.LAUNCHES >= before + 2 * (2 + gluon_gather.DKDV)


class _MisalignedGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on as a contiguous view 2 bytes into a buffer (not 16-byte
    aligned)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        out = torch.empty(g.numel() + 1, dtype=g.dtype, device=g.device)[1:].view(g.shape)
        out.copy_(g)
        assert out.is_contiguous() and out.data_ptr() % 16 != 0
        return out


@pytest.mark.gpu
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned-dO", "misaligned-dO"])
def test_gpu_gluon_backward_follows_the_forward_and_checks_do(misaligned, monkeypatch):
    """The backward takes the Gluon kernels where the forward did (it reuses the forward's decision for q, k, v) and
    dO is 16-byte aligned; a misaligned dO sends the gathered part's backward to the Triton kernels. Both ways
    match the reference."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    from sparse_transformer.attention.triton import forward, gluon_gather

    monkeypatch.setattr(forward, "GLUON_GATHER", True)
    lay = layouts.fixed(1024, 128, 32)

    def run(q, k, v, lay):
        o, lse = sparse_attention_triton(q, k, v, lay)
        return (_MisalignedGrad.apply(o) if misaligned else o), lse

    checks = _record(monkeypatch, gluon_gather, "eligible", lambda a, kw: 1)
    for _ in range(2):  # the second call's launches go through the direct launcher
        before = gluon_gather.LAUNCHES
        check_against_reference(run, *make_qkv(2, 3, 1024, 64, torch.bfloat16, device="cuda"), lay,
                                floor=FLOOR[torch.bfloat16])
        assert gluon_gather.LAUNCHES - before == (1 if misaligned else 2 + gluon_gather.DKDV)
    assert len(checks) == 2  # the forward's only: the backward reuses its decision


@pytest.mark.gpu
@pytest.mark.parametrize("n,L,D", [(4096, 256, 64), (1025, 128, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_triton_gather_without_gluon(n, L, D, dtype, monkeypatch):
    """With the Gluon kernels off (SPARSE_TRANSFORMER_GLUON=0), the shapes they would take run the Triton gathered
    kernels, which must match the reference too (on Hopper the Gluon path takes these shapes by default)."""
    from sparse_transformer.attention.triton import forward, gluon_gather

    monkeypatch.setattr(forward, "GLUON_GATHER", False)
    before = gluon_gather.LAUNCHES
    lay = layouts.fixed(n, L, 32)
    q, k, v = make_qkv(2, 3, n, D, dtype, device="cuda")
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[dtype])
    assert gluon_gather.LAUNCHES == before


def _assert_two_runs_bit_equal():
    """Output and gradients of two identical fixed-pattern calls are bit-equal."""
    lay = layouts.fixed(2048, 128, 32)
    q, k, v = make_qkv(2, 4, 2048, 64, torch.bfloat16, device="cuda")
    outs = []
    for _ in range(2):
        o, _ = sparse_attention_triton(q, k, v, lay)
        outs.append((o, *torch.autograd.grad(o.float().sum(), (q, k, v))))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_unfused_layouts_are_bit_reproducible():
    """The fixed pattern fuses no dQ by default: its gradients repeat bit for bit without deterministic mode."""
    _assert_two_runs_bit_equal()


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_dq", ["all"], indirect=True)
def test_gpu_deterministic_mode_is_bit_reproducible(fuse_dq):
    """torch.use_deterministic_algorithms(True) turns the dQ atomics off: two backward passes are bit-equal."""
    torch.use_deterministic_algorithms(True)
    try:
        _assert_two_runs_bit_equal()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.interpreter
def test_interpreter_non_contiguous_views():
    lay = layouts.strided(40, 8)
    qkv = torch.randn(1, 40, 3, 2, 16, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    check_against_reference(_run(16, 16), q, k, v, lay, floor=1e-5)


@pytest.mark.gpu
def test_gpu_direct_launch_equals_triton_launch_and_respects_alignment():
    """The direct launcher (launcher.FAST) gives bit-equal results to Triton's own launch path, and a misaligned view
    after an aligned call of the same shape gets its own compiled kernel (the key holds the 16-byte alignment)."""
    from sparse_transformer.attention.triton import launcher

    lay = layouts.fixed(500, 64, 16)
    q, k, v = make_qkv(2, 4, 500, 64, torch.bfloat16, device="cuda")
    g = torch.randn_like(q)
    results = []
    try:
        for fast in (False, True, True):
            launcher.FAST = fast
            o, lse = sparse_attention_triton(q, k, v, lay)
            results.append((o, lse, *torch.autograd.grad(o, (q, k, v), g)))
        for a, b, c in zip(*results):
            assert torch.equal(a, b) and torch.equal(a, c)
        # the same shapes, but q / k / v start 2 bytes past a 16-byte boundary
        buf = torch.randn(3, 2 * 4 * 500 * 64 + 1, device="cuda", dtype=torch.bfloat16)
        qm, km, vm = (buf[i, 1:].view(2, 4, 500, 64).requires_grad_() for i in range(3))
        assert qm.data_ptr() % 16 != 0
        check_against_reference(_run(), qm, km, vm, lay, floor=FLOOR[torch.bfloat16])
    finally:
        launcher.FAST = True


@pytest.mark.gpu
@pytest.mark.parametrize("verts", [1, 2], ids=["one-offset", "per-head-offsets"])
def test_gpu_gluon_direct_launch_encodes_each_address_and_equals_triton_launch(verts, monkeypatch):
    """The Gluon kernels' direct launches (launcher.Tma: descriptors encoded once per address and geometry) give
    bit-equal outputs and gradients to Triton's own launch path, on two sets of q, k, v, dO (another address must get
    its own encoding, never the first set's) and on the first set again (its encodings reused)."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    import triton

    from sparse_transformer.attention.triton import forward, gluon_gather, launcher

    monkeypatch.setattr(forward, "GLUON_GATHER", True)
    monkeypatch.setattr(gluon_gather, "HEAD_OFFSETS", True)
    launcher.clear()  # no compiled kernel or encoding from an earlier test in this process
    lay = layouts.fixed(1024, 128, 32, heads=2, num_verts=verts)
    sets = [(*make_qkv(2, 2, 1024, 64, torch.bfloat16, device="cuda"),
             torch.randn(2, 2, 1024, 64, dtype=torch.bfloat16, device="cuda")) for _ in range(2)]

    def run(q, k, v, g):
        o, lse = sparse_attention_triton(q, k, v, lay)
        return (o, lse, *torch.autograd.grad(o, (q, k, v), g))

    launches, encoded = gluon_gather.LAUNCHES, launcher.ENCODED
    monkeypatch.setattr(launcher, "FAST", False)
    want = [run(*qkvg) for qkvg in sets]
    monkeypatch.setattr(launcher, "FAST", True)
    got = [run(*qkvg) for qkvg in (*sets, *sets, sets[0])]
    for i, res in enumerate(got):
        for a, b in zip(res, want[i % 2]):
            assert torch.equal(a, b)
    assert gluon_gather.LAUNCHES == launches + 3 * 7  # forward, dQ and dK / dV on every call
    if launcher.TMA_DIRECT == (3, 6) and triton.__version__.startswith("3.6."):  # elsewhere Triton encodes them
        # 11 descriptors per fwd+bwd (forward q, k, v; dQ and dK / dV q, dO, k, v each); a kernel's first fast call
        # is Triton's own, so set one encodes on its second call, set two on its first, and then nothing new
        assert launcher.ENCODED - encoded == 2 * 11


@pytest.mark.gpu
def test_gpu_gluon_direct_launch_tells_summary_offsets_apart(monkeypatch):
    """Two layouts whose only difference is the summary offset (rows 96..128 or 64..96 of each 128-row block) share
    the Gluon kernels' compiled entries (the offset moves only the descriptors' start), so only the encodings'
    addresses keep them apart: each must match Triton's own launch path, called in turn on the same inputs."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    from sparse_transformer.attention.triton import forward, gluon_gather, launcher

    monkeypatch.setattr(forward, "GLUON_GATHER", True)
    launcher.clear()
    lays = [layouts.Layout(1024, (layouts.HeadPattern(block=128, summary=(128, lo, lo + 32)),), name=f"lo={lo}")
            for lo in (96, 64)]
    q, k, v = make_qkv(2, 2, 1024, 64, torch.bfloat16, device="cuda")
    g = torch.randn_like(q)

    def run(lay):
        o, lse = sparse_attention_triton(q, k, v, lay)
        return (o, lse, *torch.autograd.grad(o, (q, k, v), g))

    launches = gluon_gather.LAUNCHES
    monkeypatch.setattr(launcher, "FAST", False)
    want = [run(lay) for lay in lays]
    monkeypatch.setattr(launcher, "FAST", True)
    got = [run(lays[i % 2]) for i in range(5)]
    assert not torch.equal(want[0][0], want[1][0])  # the two layouts do differ
    for i, res in enumerate(got):
        for a, b in zip(res, want[i % 2]):
            assert torch.equal(a, b)
    assert gluon_gather.LAUNCHES == launches + 3 * 7


@pytest.mark.parametrize("n,L,lo,c", [(1000, 128, 96, 32), (4096, 256, 224, 32), (300, 128, 100, 16),
                                       (1000, 256, 128, 128), (1000, 128, 0, 1)])
def test_gluon_summary_view_holds_the_summary_rows(n, L, lo, c):
    """summary_view: rows lo .. lo + c of every whole L-row block, in order, read in place from a strided view (the
    Gluon kernels' K and V through a 5-D TMA descriptor; Gluon itself needs a Hopper GPU)."""
    from sparse_transformer.attention.triton.gluon_gather import summary_box, summary_view

    x = torch.randn(2, n, 3, 3, 8)[:, :, 1].transpose(1, 2)  # k of a [B, n, qkv, H, D] projection: offset, strided
    got = summary_view(x, L, lo, c)
    rows = torch.tensor([b * L + lo + j for b in range(n // L) for j in range(c)])
    assert got.shape == (2, 3, n // L, c, 8) and got.data_ptr() == x[:, :, lo:].data_ptr()
    assert torch.equal(got.reshape(2, 3, -1, 8), x[:, :, rows])
    assert summary_box(c, 64) == ((64 // c, c) if c <= 64 else (1, 64))
    with pytest.raises(AssertionError):
        summary_box(48, 64)


def test_gluon_summary_fits_only_what_tma_reads():
    """summary_fits: c must divide the 64-key tile or be a multiple of it, and the view's start and strides multiples
    of 16 bytes; a size-one dimension's stride does not count (summary_view gives it a dense one)."""
    from sparse_transformer.attention.triton.gluon_gather import summary_fits, summary_view

    x = torch.randn(2, 3, 1024, 64, dtype=torch.bfloat16)
    assert summary_fits(x, 128, 96, 32, 64) and summary_fits(x, 256, 128, 128, 64) and summary_fits(x, 128, 0, 8, 64)
    assert not summary_fits(x, 128, 80, 48, 64)  # 64-key tiles straddle 48-row blocks unevenly
    odd = torch.randn(2, 1024, 2 * 3 * 64 + 4, dtype=torch.bfloat16)[:, :, :3 * 64].view(2, 1024, 3, 64)
    assert not summary_fits(odd.transpose(1, 2), 128, 96, 32, 64)  # a row stride of 388 elements: 776 bytes
    assert not summary_fits(x.transpose(2, 3).contiguous().transpose(2, 3), 128, 96, 32, 64)  # D not contiguous
    shared = torch.randn(2, 1, 1024, 64, dtype=torch.bfloat16).expand(2, 3, 1024, 64)  # one K for every head
    assert not summary_fits(shared, 128, 96, 32, 64)  # stride 0: the Triton kernels take it
    one = torch.randn(1, 1, 1024, 64, dtype=torch.bfloat16).as_strided((1, 1, 1024, 64), (3, 5, 64, 1))
    assert summary_fits(one, 128, 96, 32, 64)
    assert summary_view(one, 128, 96, 32).stride()[:2] == (8 * 32 * 64, 8 * 32 * 64)


def test_gluon_path_is_not_taken_off_hopper(monkeypatch):
    """The Gluon dispatch gives nothing for CPU tensors, for non-gathered segments, or when switched off."""
    from sparse_transformer.attention.plan import GATHER
    from sparse_transformer.attention.triton import forward
    from sparse_transformer.attention.triton.function import get_launches

    segs = {launch.seg.kind: launch.seg for launch in get_launches(layouts.fixed(512, 128, 32), 64, "cpu")}
    assert GATHER in segs and len(segs) == 2
    q = torch.randn(1, 2, 512, 64)
    assert all(forward.gluon_for(q, seg) is None for seg in segs.values())
    if torch.cuda.is_available():
        qc = q.cuda()
        assert forward.gluon_for(qc, segs[GATHER]) is not None
        assert all(forward.gluon_for(qc, seg) is None for kind, seg in segs.items() if kind != GATHER)
        monkeypatch.setattr(forward, "GLUON_GATHER", False)
        assert forward.gluon_for(qc, segs[GATHER]) is None


@pytest.mark.parametrize("version,env,runs", [((3, 6), "", True), ((3, 9), "", False), ((3, 9), "1", True),
                                              (None, "", False)])
def test_gluon_runs_only_on_checked_triton_versions(version, env, runs, monkeypatch):
    """Gluon's API changes between Triton releases: by default the Gluon kernels run only on the versions they were
    checked on (forward.GLUON_TRITON); SPARSE_TRANSFORMER_GLUON=1 tries them on any."""
    from sparse_transformer.attention.triton import forward

    monkeypatch.setattr(forward, "_GLUON", [])
    monkeypatch.setattr(forward, "_GLUON_ENV", env)
    monkeypatch.setattr(forward, "_triton_version", lambda: version)
    module = forward.gluon_module()
    assert (module is not None) == runs
    if runs:
        assert module.__name__.endswith("gluon_gather")


def _gluon_edge_layout(case):
    """(layout, Gluon launches expected per fwd+bwd) for the edge cases of the Gluon path."""
    if case == "c128-l256":  # summary wider than a 64-key tile
        return layouts.fixed(1100, 256, 128), 3
    if case == "c48":  # tiles of 64 summary keys would straddle blocks unevenly: the Triton kernels
        return layouts.fixed(1000, 128, 48), 0
    if case == "c8":  # a tile of 64 summary keys holds eight blocks' summaries
        return layouts.fixed(1100, 128, 8), 3
    if case == "lo-inside":  # summary columns 64..95 of each block, not its last ones
        return layouts.Layout(1000, (layouts.HeadPattern(block=128, summary=(128, 64, 96)),)), 3
    if case == "two-blocks":  # one block of queries sees one block of summary keys
        return layouts.fixed(200, 128, 32), 3
    if case == "n-below-l":  # no query sees a summary key: nothing to launch
        return layouts.fixed(100, 128, 32), 0
    assert case == "num-verts-2"  # heads with different summary columns: the Triton kernels
    return layouts.fixed(1000, 128, 32, heads=2, num_verts=2), 0


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["c128-l256", "c48", "c8", "lo-inside", "two-blocks", "n-below-l", "num-verts-2",
                                  "dkdv-off", "odd-stride-kv"])
def test_gpu_gluon_gather_edge_cases(case, monkeypatch):
    """The Gluon path on the layouts its masks and scatter must get right, and where it must step aside (K / V whose
    strides TMA cannot read: the Triton kernels); with dK / dV off (SPARSE_TRANSFORMER_GLUON_DKDV=0) the Triton dK /
    dV kernel adds to the band's."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    from sparse_transformer.attention.triton import forward, gluon_gather

    monkeypatch.setattr(forward, "GLUON_GATHER", True)
    monkeypatch.setattr(gluon_gather, "HEAD_OFFSETS", False)  # num-verts-2 takes the Triton kernels
    if case == "dkdv-off":
        monkeypatch.setattr(gluon_gather, "DKDV", False)
        lay, launches = layouts.fixed(1025, 128, 32), 2
    elif case == "odd-stride-kv":
        lay, launches = layouts.fixed(1025, 128, 32), 0
    else:
        lay, launches = _gluon_edge_layout(case)
    before = gluon_gather.LAUNCHES
    q, k, v = make_qkv(2, 2, lay.n, 64, torch.bfloat16, device="cuda")
    if case == "odd-stride-kv":  # rows of 2 * 2 * 64 + 4 elements: not a multiple of 16 bytes
        kv = torch.randn(2, lay.n, 2 * 2 * 64 + 4, dtype=torch.bfloat16, device="cuda")[:, :, :256]
        k, v = (kv.view(2, lay.n, 2, 2, 64)[:, :, i].transpose(1, 2).requires_grad_() for i in range(2))
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[torch.bfloat16])
    assert gluon_gather.LAUNCHES == before + launches


@pytest.mark.gpu
@pytest.mark.parametrize("n,L,c,heads,verts", [(1025, 128, 32, 4, 4), (4096, 256, 32, 4, 2), (1100, 256, 128, 2, 2),
                                                (1000, 128, 8, 4, 4)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("views", [False, True], ids=["contiguous", "views"])
def test_gpu_gluon_per_head_offsets(n, L, c, heads, verts, D, views, monkeypatch):
    """gluon_gather.HEAD_OFFSETS: heads with different summary offsets (num_verts > 1, as the enwik8
    preset) through the Gluon kernels, each head's offset added to the row coordinate; all three kernels must run."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    from sparse_transformer.attention.triton import forward, gluon_gather

    monkeypatch.setattr(forward, "GLUON_GATHER", True)
    monkeypatch.setattr(gluon_gather, "HEAD_OFFSETS", True)
    lay = layouts.fixed(n, L, c, heads=heads, num_verts=verts)
    before = gluon_gather.LAUNCHES
    q, k, v = make_qkv(2, heads, n, D, torch.bfloat16, device="cuda")
    if views:
        q, k, v = _views(2, n, heads, D, torch.bfloat16)
    check_against_reference(_run(), q, k, v, lay, floor=FLOOR[torch.bfloat16])
    assert gluon_gather.LAUNCHES == before + 3


def test_gluon_per_head_offsets_only_when_switched_on(monkeypatch):
    """The host side of HEAD_OFFSETS: a segment whose heads share one summary offset gives that int either way; one
    whose heads differ gives None (the Triton kernels) unless switched on, then an int32 table of the heads'
    offsets; and its K / V must fit a descriptor of whole blocks."""
    from sparse_transformer.attention.plan import GATHER
    from sparse_transformer.attention.triton import gluon_gather
    from sparse_transformer.attention.triton.function import get_launches

    monkeypatch.setattr(gluon_gather, "HEAD_OFFSETS", False)  # whatever SPARSE_TRANSFORMER_GLUON_HEADS says

    def seg(lay):
        return [launch.seg for launch in get_launches(lay, 64, "cpu") if launch.seg.kind == GATHER][0]

    one, verts = seg(layouts.fixed(1024, 128, 32)), seg(layouts.fixed(1024, 128, 32, heads=4, num_verts=4))
    assert gluon_gather._offsets_of(one, "cpu") == 96 and gluon_gather._offsets_of(verts, "cpu") is None
    monkeypatch.setattr(gluon_gather, "HEAD_OFFSETS", True)
    assert gluon_gather._offsets_of(one, "cpu") == 96
    table = gluon_gather._offsets_of(verts, "cpu")
    assert table.dtype == torch.int32 and table.tolist() == [96, 64, 32, 0]
    assert gluon_gather._offsets_of(verts, "cpu") is table  # built once
    x = torch.randn(2, 4, 1024, 64, dtype=torch.bfloat16)
    assert gluon_gather.summary_fits(x, 128, table, 32, 64)
    odd = torch.randn(2, 1024, 4 * 64 + 4, dtype=torch.bfloat16)[:, :, :256].view(2, 1024, 4, 64).transpose(1, 2)
    assert not gluon_gather.summary_fits(odd, 128, table, 32, 64)  # rows of 260 elements: 520 bytes
    d = gluon_gather.summary_desc(x, 128, table, 32, 64)  # whole blocks from row 0, boxes of two 32-row summaries
    assert list(d.shape) == [2, 4, 8, 128, 64] and list(d.block) == [1, 1, 2, 32, 64]
    assert d.data_ptr() == x.data_ptr()
    d = gluon_gather.summary_desc(x, 128, 96, 32, 64)  # one offset: the view starts at row 96, 32 rows per block
    assert list(d.shape) == [2, 4, 8, 32, 64] and d.data_ptr() == x[:, :, 96:].data_ptr()
    view = d.descriptor().base  # the TensorDescriptor Triton's own path gets: over summary_view's rows
    assert view.data_ptr() == d.data_ptr() and torch.equal(view, gluon_gather.summary_view(x, 128, 96, 32))
    summary = seg(layouts.fixed(1024, 128, 32, "summary", heads=4, num_verts=4))  # no band: never this path
    assert gluon_gather._segment_offsets(summary) == (None, None)


@pytest.mark.parametrize("case", ["c128-l256", "c48", "c8", "lo-inside", "two-blocks", "n-below-l", "num-verts-2"])
def test_gluon_edge_layouts_are_valid(case):
    """The GPU edge-case layouts build, and the torch backend's output and gradients match the reference on them
    (small heads; the log-sum-exp is the reference's own, the torch backend returns none)."""
    from sparse_transformer.attention import sparse_attention
    from sparse_transformer.attention.reference import attention_ref

    lay, _ = _gluon_edge_layout(case)
    q, k, v = make_qkv(1, 2 if case == "num-verts-2" else 1, lay.n, 8, torch.float64)
    check_against_reference(lambda *a: (sparse_attention(*a, backend="torch"), attention_ref(*a)[1].detach()),
                            q, k, v, lay, floor=1e-9)


@pytest.mark.parametrize("case,lo", [("c128-l256", 128), ("c48", 80), ("c8", 120), ("lo-inside", 64),
                                     ("two-blocks", 96), ("num-verts-2", None)])
def test_gluon_summary_offset_of_the_edge_layouts(case, lo):
    """The host side of the Gluon path's choice: the gathered segment after a band, and its one summary offset (None
    where heads differ, so the Triton kernels take it)."""
    from sparse_transformer.attention.plan import GATHER
    from sparse_transformer.attention.triton import gluon_gather
    from sparse_transformer.attention.triton.function import get_launches

    lay, _ = _gluon_edge_layout(case)
    segs = [launch.seg for launch in get_launches(lay, 64, "cpu")]
    assert [s.kind == GATHER for s in segs] == [False, True]
    assert gluon_gather._segment_offsets(segs[1])[0] == lo


GRAPH_LAYOUTS = [("fixed", lambda: layouts.fixed(2048, 128, 32)), ("strided", lambda: layouts.strided(2048, 128)),
                 ("fixed-views", lambda: layouts.fixed(2048, 128, 32))]


@pytest.mark.gpu
@pytest.mark.parametrize("name,make", GRAPH_LAYOUTS, ids=[c[0] for c in GRAPH_LAYOUTS])
def test_gpu_graph_replay_equals_direct_launches(name, make, monkeypatch):
    """Graph replay (replay.ENABLED, on by default): in a loop over the same tensors a call whose tensors repeat
    captures its forward and backward launches and later ones replay them. Outputs and gradients are bit-equal to
    direct launches on every call, also after q's values change in place (same address). The captures allocate
    nothing (a graph's private pool would keep it): with views, q is not contiguous (the model's strides) and the
    Gluon path's copy of it is made before the capture (function._rows_q)."""
    from sparse_transformer.attention.triton import function, replay

    lay = make()
    if name.endswith("views"):
        q, k, v = _views(2, 2048, 4, 64, torch.bfloat16)
    else:
        q, k, v = make_qkv(2, 4, 2048, 64, torch.bfloat16, device="cuda")
    g = torch.randn(q.shape, device="cuda", dtype=q.dtype)

    def call():
        o, _ = sparse_attention_triton(q, k, v, lay)
        return [t.clone() for t in (o, *torch.autograd.grad(o, (q, k, v), g))]  # clones: this call's buffers go

    function.clear_cache()
    monkeypatch.setattr(replay, "ENABLED", False)
    want = call()
    monkeypatch.setattr(replay, "ENABLED", True)
    captures, allocations = replay.CAPTURES, []
    capture = replay._capture

    def counted(device, launch_all):  # allocations by the launches while captured (in the graph's private pool;
        # not torch's own at a process's first capture: the RNG state it registers with the graph)
        def measured():
            before = torch.cuda.memory_stats()["allocation.all.allocated"]
            out = launch_all()
            allocations.append(torch.cuda.memory_stats()["allocation.all.allocated"] - before)
            return out

        return capture(device, measured)

    monkeypatch.setattr(replay, "_capture", counted)

    def until_replayed():
        """Calls until one replays both directions, each checked against `want`. Each call's buffers are freed
        before the next, and the allocator mostly gives the next call the same addresses, but not always (blocks
        carved from its segments can move), so a key may need a few calls to come back."""
        for _ in range(8):
            before = replay.REPLAYS
            got = call()
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            if replay.REPLAYS - before == 2:  # forward and backward replayed
                return
            del got
        pytest.fail("no call replayed both directions in 8 calls over the same tensors")

    try:
        until_replayed()
        assert replay.CAPTURES - captures >= 2 and allocations and set(allocations) == {0}
        with torch.no_grad():
            q.mul_(0.5)
            v.add_(1.0)
        monkeypatch.setattr(replay, "ENABLED", False)
        want = call()  # direct launches on the new values
        monkeypatch.setattr(replay, "ENABLED", True)
        until_replayed()  # replayed on the new values
    finally:
        function.clear_cache()


@pytest.mark.gpu
def test_gpu_graph_replay_stays_out_of_a_user_capture(monkeypatch):
    """Inside someone else's CUDA-graph capture (the benchmark's graph mode) calls launch directly: two calls with
    the same buffers in one user capture note no key and capture nothing of ours, and the user's graph replays the
    direct launch's output."""
    from sparse_transformer.attention.triton import function, replay

    lay = layouts.strided(2048, 128)
    q, k, v = make_qkv(2, 4, 2048, 64, torch.bfloat16, device="cuda")
    function.clear_cache()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (tables, compiled kernels) off the graph path
        for _ in range(2):
            sparse_attention_triton(q, k, v, lay)
    torch.cuda.current_stream().wait_stream(side)
    monkeypatch.setattr(replay, "ENABLED", True)
    monkeypatch.setattr(replay, "_capture", lambda *a: pytest.fail("captured inside the user's capture"))
    out = {}
    try:
        noted, replays = len(replay._ENTRIES), replay.REPLAYS
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sparse_attention_triton(q, k, v, lay)  # its buffers return to the capture's pool for the second
            out["o"], _ = sparse_attention_triton(q, k, v, lay)
        assert len(replay._ENTRIES) == noted and replay.REPLAYS == replays
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(replay, "ENABLED", False)
        want, _ = sparse_attention_triton(q, k, v, lay)
        assert torch.equal(out["o"], want)
    finally:
        function.clear_cache()
