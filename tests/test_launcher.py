"""The direct launcher's cache logic (launcher.launch), on the CPU with a stand-in for a Triton kernel: which calls
reuse a compiled kernel, and that the direct call passes every parameter in signature order. The GPU test
test_triton_attention.py::test_gpu_direct_launch_equals_triton_launch_and_respects_alignment runs it for real."""
import types

import pytest
import torch

pytest.importorskip("triton")
from sparse_transformer.attention.triton import launcher  # noqa: E402


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *args):
        self.log.append(("direct", args))


class FakeKernel:
    """Parameters a, b (tensors), s, n (scalars), then constexprs X, Y."""

    params = [types.SimpleNamespace(name=n) for n in ("a", "b", "s", "n", "X", "Y")]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return FakeCompiled(self.log)
        return call


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(launcher, "FAST", True)
    monkeypatch.setattr(launcher, "_INTERPRET", False)
    monkeypatch.setattr(launcher, "_stream", lambda dev: 7)
    monkeypatch.setattr(launcher, "_current_device", lambda: None)  # CPU tensors: device index None
    monkeypatch.setattr(launcher, "_per_call_options", lambda kernel: False)
    launcher.clear()
    yield
    launcher.clear()


@pytest.mark.parametrize("grid,xyz", [((7,), (7, 1, 1)), ((3, 5), (3, 5, 1)), ((2, 3, 4), (2, 3, 4))],
                         ids=["1-d", "2-d", "3-d"])
def test_second_call_goes_direct_with_every_parameter_in_order(fast, grid, xyz):
    kern = FakeKernel()
    a, b = torch.zeros(64), torch.zeros(64)
    cex = dict(Y=2, X=1, num_warps=4, num_stages=2)  # any order: the tail follows the signature
    launcher.launch(kern, grid, (a, b), (0.5, 128), cex)
    launcher.launch(kern, grid, (a, b), (0.5, 128), cex)
    assert [e[0] for e in kern.log] == ["triton", "direct"]
    assert kern.log[0][1:] == (grid, (a, b, 0.5, 128), cex)
    assert kern.log[1][1] == (*xyz, 7, "fn", "meta", None, None, None, a, b, 0.5, 128, 1, 2)


@pytest.mark.parametrize("change", ["scalar", "constexpr", "alignment", "dtype", "second dtype"])
def test_a_different_specialization_goes_through_triton(fast, change):
    kern = FakeKernel()
    buf = torch.zeros(80)
    a, b, s, cex = buf[:64], torch.zeros(64), (0.5, 128), dict(X=1, Y=2, num_warps=4, num_stages=2)
    launcher.launch(kern, (1, 1), (a, b), s, cex)
    if change == "scalar":
        s = (0.5, 129)  # 129 is not a multiple of 16: Triton would specialize differently
    elif change == "constexpr":
        cex = dict(cex, num_warps=8)
    elif change == "alignment":
        a = buf[1:65]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        a = torch.zeros(64, dtype=torch.float16)
    else:
        b = torch.zeros(64, dtype=torch.float16)
    launcher.launch(kern, (1, 1), (a, b), s, cex)
    assert [e[0] for e in kern.log] == ["triton", "triton"]


def _desc(base, block=(64, 16), layout="L1"):
    """A stand-in for a Gluon TensorDescriptor: the fields the launcher keys on."""
    return types.SimpleNamespace(base=base, shape=list(base.shape), strides=list(base.stride()),
                                 block_shape=list(block), layout=layout, padding="zero")


@pytest.mark.parametrize("change", [None, "base", "block", "layout", "alignment", "dtype"])
def test_tensor_descriptors_key_on_their_specialization(fast, change):
    """Gluon kernels take TensorDescriptors: a new base of the same kind goes direct (the compiled launcher encodes
    each descriptor per call); another block shape, layout, alignment or dtype goes through Triton."""
    kern = FakeKernel()
    buf = torch.zeros(80, 16)
    a, b = _desc(buf[:64]), torch.zeros(64)
    cex = dict(X=1, Y=2, num_warps=4)
    launcher.launch(kern, (1, 1), (a, b), (0.5, 128), cex)
    a2 = {None: a, "base": _desc(torch.zeros(64, 16)), "block": _desc(buf[:64], (32, 16)),
          "layout": _desc(buf[:64], layout="L2"), "alignment": _desc(buf.view(-1)[1:1025].view(64, 16)),
          "dtype": _desc(torch.zeros(64, 16, dtype=torch.float16))}[change]
    launcher.launch(kern, (1, 1), (a2, b), (0.5, 128), cex)
    assert [e[0] for e in kern.log] == ["triton", "direct" if change in (None, "base") else "triton"]
    if change == "base":
        assert kern.log[1][1][9] is a2  # the descriptor itself reaches the compiled launcher


def test_per_call_options_or_switch_off_always_go_through_triton(fast, monkeypatch):
    kern = FakeKernel()
    a = torch.zeros(64)
    launcher.launch(kern, (1, 1), (a, a), (0.5, 1), dict(X=1, Y=2))
    monkeypatch.setattr(launcher, "_per_call_options", lambda kernel: True)
    launcher.launch(kern, (1, 1), (a, a), (0.5, 1), dict(X=1, Y=2))
    monkeypatch.setattr(launcher, "_per_call_options", lambda kernel: False)
    monkeypatch.setattr(launcher, "FAST", False)
    launcher.launch(kern, (1, 1), (a, a), (0.5, 1), dict(X=1, Y=2))
    assert [e[0] for e in kern.log] == ["triton"] * 3


def test_per_call_options_reads_triton_knobs(monkeypatch):
    from triton import knobs

    kern = FakeKernel()
    assert not launcher._per_call_options(kern)  # Triton's defaults: nothing per call
    monkeypatch.setattr(knobs.runtime, "debug", True)
    assert launcher._per_call_options(kern)
    monkeypatch.setattr(knobs.runtime, "debug", False)
    kern.pre_run_hooks = [print]
    assert launcher._per_call_options(kern)


def test_a_jit_cache_hook_that_takes_the_launch_over_is_not_cached(fast):
    calls = []

    class Hooked(FakeKernel):
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append(1)  # returns None, as Triton does when its cache hook returns True

    kern = Hooked()
    a = torch.zeros(64)
    for _ in range(2):
        launcher.launch(kern, (1, 1), (a, a), (0.5, 1), dict(X=1, Y=2))
    assert len(calls) == 2 and not launcher._COMPILED


def test_hook_detection_reads_an_empty_chain_as_no_hook():
    chain = types.SimpleNamespace(calls=[])
    assert not launcher._active(None) and not launcher._active(chain)
    assert launcher._active(types.SimpleNamespace(calls=[print])) and launcher._active(print)


def _bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


def _tma(base, offset=0, block=(16, 16), rows=None, strides=None):
    """A Tma over base's last two dims from element `offset` (a real shared-memory layout, as gluon_gather builds
    them); rows and strides default to the rest of base, row-major."""
    from sparse_transformer.attention.triton.gluon_gather import _layout

    D = base.shape[-1]
    rows = base.numel() // D - offset // D if rows is None else rows
    return launcher.Tma(base, offset, (rows, D), strides or (D, 1), block, _layout(block, base.dtype))


class FakeRun:
    """A compiled kernel's launcher as Triton 3.6 builds it: `launch` closes over the C launcher and the set of
    descriptor parameter positions."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, log, where):
        launcher = lambda *args: log.append(("raw", args))  # noqa: E731 (the names Triton's closure uses)
        tensordesc_indices = set(where)

        def inner(*args):  # wrap_handle_tensordesc's closure (never called on the direct path)
            return launcher(*args, tensordesc_indices)

        self.launch = inner
        self.log = log

    def __call__(self, *args):
        self.log.append(("direct", args))


class FakeTmaKernel(FakeKernel):
    """Leading parameters as the calls give them (descriptors at `where`), then s, n, X, Y; compiled with one
    metadata entry per descriptor ({"swizzle": its position})."""

    def __init__(self, where=(0,), leading=2):
        super().__init__()
        self.where = where
        self.params = [types.SimpleNamespace(name=f"t{i}") for i in range(leading)] + FakeKernel.params[2:]

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            ck = FakeCompiled(self.log)
            ck.run = FakeRun(self.log, self.where)
            ck.metadata = types.SimpleNamespace(tensordesc_meta=[{"swizzle": i} for i in self.where])
            return ck
        return call


@pytest.fixture
def tma_direct(fast, monkeypatch):
    """The direct path as on Triton 3.6, with make_tensordesc_arg counted and stood in for (it needs a GPU)."""
    from triton.backends.nvidia import driver

    encoded = []

    def encode(desc, meta, *rest):
        encoded.append((desc.base.data_ptr(), tuple(desc.shape), tuple(desc.strides), meta))
        return [f"map{len(encoded)}", *desc.shape, *desc.strides]

    monkeypatch.setattr(launcher, "TMA_DIRECT", launcher.triton_version())
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", "iiiKKppOOOOOO", raising=False)
    monkeypatch.setattr(driver, "make_tensordesc_arg", encode)
    return encoded


def test_tma_arguments_reach_triton_as_descriptors_then_go_raw_with_one_encoding_per_address(tma_direct):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kern = FakeTmaKernel()
    x, y, b = _bf16(64, 16), _bf16(64, 16), torch.zeros(64)
    cex = dict(X=1, Y=2, num_warps=4)
    for base, offset in ((x, 0), (x, 0), (y, 0), (x, 0), (x, 256)):
        launcher.launch(kern, (3,), (_tma(base, offset), b), (0.5, 128), cex)
    kinds = [e[0] for e in kern.log]
    assert kinds == ["triton", "raw", "raw", "raw", "raw"]
    first = kern.log[0][2][0]  # Triton's own path got a TensorDescriptor over the same memory
    assert isinstance(first, TensorDescriptor) and first.base.data_ptr() == x.data_ptr() and first.shape == [64, 16]
    # encoded on the first raw call of each (address, geometry): x, y, then x 256 elements (16 rows) further on
    assert [e[0] for e in tma_direct] == [x.data_ptr(), y.data_ptr(), x.data_ptr() + 256 * 2]
    assert [e[1] for e in tma_direct] == [(64, 16), (64, 16), (48, 16)] and tma_direct[0][3] == {"swizzle": 0}
    raw = kern.log[1][1]  # grid, stream, function, cooperative, pdl, 2 scratches, packed metadata, 3 hooks, args
    assert raw == (3, 1, 1, 7, "fn", False, True, None, None, "meta", None, None, None, "map1", 64, 16, 16, 1, b,
                   0.5, 128, 1, 2)
    assert [e[1][13] for e in kern.log[2:]] == ["map2", "map1", "map3"]
    for codes in (entry[-1].codes for entry in launcher._COMPILED.values()):  # no tensor is held
        assert not any(isinstance(v, torch.Tensor) for code in codes.values() for v in code)


@pytest.mark.parametrize("change", ["offset", "shape", "strides"])
def test_tma_encoding_is_not_reused_across_offset_shape_or_strides(tma_direct, change):
    """The same base with another start (a summary offset moves only the descriptor's start: the kernel's key is the
    same), or the same address with another shape or strides, gets its own encoding."""
    kern = FakeTmaKernel()
    x, b = _bf16(64, 16), torch.zeros(64)
    a = _tma(x, rows=32)
    a2 = {"offset": _tma(x, 16 * 16, rows=32), "shape": _tma(x, rows=48),
          "strides": _tma(x, rows=32, strides=(32, 1))}[change]
    for t in (a, a, a2, a2, a):
        launcher.launch(kern, (3,), (t, b), (0.5, 128), dict(X=1, Y=2))
    assert [e[0] for e in kern.log] == ["triton"] + ["raw"] * 4
    assert [e[1][13] for e in kern.log[1:]] == ["map1", "map2", "map2", "map1"]
    want = {"offset": (x.data_ptr() + 512, (32, 16), (16, 1)), "shape": (x.data_ptr(), (48, 16), (16, 1)),
            "strides": (x.data_ptr(), (32, 16), (32, 1))}[change]
    assert tma_direct[1][:3] == want


def test_two_tma_arguments_each_get_their_own_metadata_in_order(tma_direct):
    kern = FakeTmaKernel(where=(0, 2), leading=3)
    x, y, b = _bf16(64, 16), _bf16(32, 16), torch.zeros(64)
    for _ in range(2):
        launcher.launch(kern, (3,), (_tma(x), b, _tma(y)), (0.5, 128), dict(X=1, Y=2))
    assert [e[0] for e in kern.log] == ["triton", "raw"]
    assert [(e[0], e[3]) for e in tma_direct] == [(x.data_ptr(), {"swizzle": 0}), (y.data_ptr(), {"swizzle": 2})]
    assert kern.log[1][1][13:] == ("map1", 64, 16, 16, 1, b, "map2", 32, 16, 16, 1, 0.5, 128, 1, 2)
    # the same descriptor in both places: each place encodes it with its own metadata
    launcher.launch(kern, (3,), (_tma(x), b, _tma(x)), (0.5, 128), dict(X=1, Y=2))
    assert tma_direct[2] == (x.data_ptr(), (64, 16), (16, 1), {"swizzle": 2})
    assert kern.log[2][1][13] == "map1" and kern.log[2][1][19] == "map3"


@pytest.mark.parametrize("why", ["version", "scratch", "no metadata", "positions", "argument layout"])
def test_tma_arguments_without_the_checked_launcher_go_through_triton_s_launcher(tma_direct, monkeypatch, why):
    """Another Triton version (or scratch memory, a descriptor without metadata, descriptor positions other than
    the Tma arguments', another leading-argument layout): the direct call hands Triton's compiled launcher
    TensorDescriptors, which it encodes itself."""
    from triton.backends.nvidia import driver
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    kern = FakeTmaKernel(where=(1,) if why == "positions" else (0,))
    if why == "version":
        monkeypatch.setattr(launcher, "TMA_DIRECT", None)
    elif why == "scratch":
        monkeypatch.setattr(FakeRun, "global_scratch_size", 64)
    elif why == "argument layout":
        monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT", "iiiKKppOOOO")
    elif why == "no metadata":
        kern.where = ()
    x, b = _bf16(64, 16), torch.zeros(64)
    for _ in range(2):
        launcher.launch(kern, (3,), (_tma(x), b), (0.5, 128), dict(X=1, Y=2))
    assert [e[0] for e in kern.log] == ["triton", "direct"] and not tma_direct
    desc = kern.log[1][1][9]
    assert isinstance(desc, TensorDescriptor) and desc.base.data_ptr() == x.data_ptr() and desc.block_shape == [16, 16]


def test_tma_keys_on_alignment_and_block():
    x = _bf16(64, 16)
    assert launcher._arg_key(_tma(x)) == launcher._arg_key(_tma(_bf16(64, 16)))
    assert launcher._arg_key(_tma(x, 16)) == launcher._arg_key(_tma(x))  # 32 bytes on: still 16-byte aligned
    assert launcher._arg_key(_tma(x, 2)) != launcher._arg_key(_tma(x))
    assert launcher._arg_key(_tma(x, block=(32, 16))) != launcher._arg_key(_tma(x))
