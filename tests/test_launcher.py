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


def _tma(base, offset=0, block=(16, 16)):
    """A Tma over base's last two dims (a real shared-memory layout, as gluon_gather builds them)."""
    from sparse_transformer.attention.triton.gluon_gather import _layout

    rows = base.numel() // base.shape[-1] - offset // base.shape[-1]
    return launcher.Tma(base, offset, (rows, base.shape[-1]), (base.shape[-1], 1), block,
                        _layout(block, base.dtype))


class FakeRun:
    """A compiled kernel's launcher as Triton 3.6 builds it: `launch` closes over the C launcher."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, log):
        launcher = lambda *args: log.append(("raw", args))  # noqa: E731 (the name Triton's closure uses)

        def inner(*args):  # wrap_handle_tensordesc's closure
            return launcher(*args)

        self.launch = inner
        self.log = log

    def __call__(self, *args):
        self.log.append(("direct", args))


class FakeTmaKernel(FakeKernel):
    """Parameters a (a descriptor), b (a tensor), s, n, then X, Y; compiled with descriptor metadata."""

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            ck = FakeCompiled(self.log)
            ck.run = FakeRun(self.log)
            ck.metadata = types.SimpleNamespace(tensordesc_meta=[{"swizzle": 128}])
            return ck
        return call


@pytest.fixture
def tma_direct(fast, monkeypatch):
    """The direct path as on Triton 3.6, with make_tensordesc_arg counted and stood in for (it needs a GPU)."""
    import triton
    from triton.backends.nvidia import driver

    encoded = []

    def encode(desc, meta, *rest):
        encoded.append((desc.base.data_ptr(), tuple(desc.shape), meta))
        return [f"map{len(encoded)}", *desc.shape, *desc.strides]

    monkeypatch.setattr(launcher, "TMA_DIRECT", tuple(int(x) for x in triton.__version__.split(".")[:2]))
    monkeypatch.setattr(driver, "_BASE_ARGS_FORMAT_LEN", 13, raising=False)
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
    assert [e[1] for e in tma_direct] == [(64, 16), (64, 16), (48, 16)] and tma_direct[0][2] == {"swizzle": 128}
    raw = kern.log[1][1]  # grid, stream, function, cooperative, pdl, 2 scratches, packed metadata, 3 hooks, args
    assert raw == (3, 1, 1, 7, "fn", False, True, None, None, "meta", None, None, None, "map1", 64, 16, 16, 1, b,
                   0.5, 128, 1, 2)
    assert [e[1][13] for e in kern.log[2:]] == ["map2", "map1", "map3"]
    for codes in (entry[-1].codes for entry in launcher._COMPILED.values()):  # no tensor is held
        assert not any(isinstance(v, torch.Tensor) for code in codes.values() for v in code)


def test_tma_arguments_without_the_checked_launcher_go_through_triton_s_launcher(tma_direct, monkeypatch):
    """On another Triton version (or with scratch memory) the direct call hands Triton's compiled launcher
    TensorDescriptors, which it encodes itself."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    monkeypatch.setattr(launcher, "TMA_DIRECT", None)
    kern = FakeTmaKernel()
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
