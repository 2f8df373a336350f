"""The CUDA-graph replay of a call's launches (attention/triton/replay.py): which calls launch, capture or replay, on
the CPU with stand-ins for tensors and graphs. test_triton_attention.py::test_gpu_graph_replay_* run it for real."""
import pytest
import torch

pytest.importorskip("triton")
from sparse_transformer.attention.triton import replay  # noqa: E402

_REAL_CAPTURE = replay._capture


class FakeTensor:
    """What replay.run reads of a tensor: is_cuda, device, address, dtype, shape, strides."""

    is_cuda = True
    device = torch.device("cpu")

    def __init__(self, ptr, shape=(2, 3)):
        self.ptr, self.dtype, self.shape = ptr, torch.bfloat16, torch.Size(shape)

    def data_ptr(self):
        return self.ptr

    def stride(self):
        return (self.shape[1], 1)


class FakeGraph:
    def __init__(self, log, launch_all):
        self.log, self.launch_all = log, launch_all

    def replay(self):
        self.log.append("replay")
        self.launch_all()  # what the graph's kernels do


@pytest.fixture
def graphs(monkeypatch):
    """replay switched on, with captures that record instead of capturing; yields the log."""
    log = []

    def capture(device, launch_all):
        log.append("capture")
        return FakeGraph(log, lambda: log.append("kernels")), "r"

    monkeypatch.setattr(replay, "ENABLED", True)
    monkeypatch.setattr(replay, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (the CPU torch has no CUDA)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)  # FakeTensor's device index
    replay.clear()
    yield log
    replay.clear()


def _call(log, tensors, head=("fwd", 1, 0.125), result="r"):
    return replay.run(head, tensors, None, lambda: log.append("launch") or result)


def test_second_call_captures_and_replays_later_ones_replay(graphs):
    t = [FakeTensor(1024), FakeTensor(2048)]
    assert [_call(graphs, t) for _ in range(4)] == ["r"] * 4  # the first call's result on every replay
    assert graphs == ["launch", "capture", "replay", "kernels", "replay", "kernels", "replay", "kernels"]


def _half(t):
    t.dtype = torch.float16
    return t


def _strided(t):
    t.stride = lambda: (1, t.shape[0])
    return t


@pytest.mark.parametrize("change", ["address", "shape", "dtype", "strides", "head"])
def test_anything_in_the_key_that_changes_starts_over(graphs, change):
    t = [FakeTensor(1024), FakeTensor(2048)]
    _call(graphs, t)
    _call(graphs, t)
    graphs.clear()
    head = ("fwd", 1, 0.125)
    other = {"address": ([FakeTensor(1024), FakeTensor(4096)], head),
             "shape": ([FakeTensor(1024), FakeTensor(2048, (3, 2))], head),
             "dtype": ([FakeTensor(1024), _half(FakeTensor(2048))], head),
             "strides": ([FakeTensor(1024), _strided(FakeTensor(2048))], head),
             "head": (t, ("fwd", 1, 0.25))}[change]
    _call(graphs, *other)
    _call(graphs, *other)
    assert graphs == ["launch", "capture", "replay", "kernels"]


def test_a_failed_capture_launches_directly_from_then_on(graphs, monkeypatch):
    def fail(device, launch_all):  # as _capture does on a failure (its own test below)
        graphs.append("capture")
        monkeypatch.setattr(replay, "ENABLED", False)

    monkeypatch.setattr(replay, "_capture", fail)
    t, u = [FakeTensor(1024)], [FakeTensor(4096)]
    for args in (t, u, t, t, u, u):
        _call(graphs, args)
    assert graphs == ["launch", "launch", "capture", "launch", "launch", "launch", "launch"]


def test_a_first_call_that_raises_notes_no_key(graphs):
    t = [FakeTensor(1024)]
    with pytest.raises(ValueError):
        replay.run(("fwd", 1, 0.125), t, None, lambda: (_ for _ in ()).throw(ValueError("bad input")))
    _call(graphs, t)
    assert graphs == ["launch"]


class _Stream:
    def wait_stream(self, other):
        pass


class _CudaGraph:
    """torch.cuda.CUDAGraph as capture sees it; capture_end raises when `invalid` (an invalidated capture)."""

    invalid = False

    def capture_begin(self, capture_error_mode):
        assert capture_error_mode == "thread_local"

    def capture_end(self):
        if self.invalid:
            raise RuntimeError("operation not permitted when stream is capturing")

    def pool(self):
        return (0, 1)

    def replay(self):
        self.log.append("replay")


@pytest.mark.parametrize("invalid", [False, True], ids=["captured", "invalidated"])
def test_capture_returns_the_graph_or_warns_and_switches_replay_off(graphs, monkeypatch, invalid):
    import contextlib

    monkeypatch.setattr(replay, "_capture", _REAL_CAPTURE)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("G", (_CudaGraph,), dict(invalid=invalid, log=graphs)))
    monkeypatch.setattr(replay, "_STREAMS", {})
    t = [FakeTensor(1024)]
    _call(graphs, t)
    captures = replay.CAPTURES
    if invalid:
        with pytest.warns(RuntimeWarning, match="replay is off"):
            assert _call(graphs, t) == "r"  # launched directly after the failed capture
        assert not replay.ENABLED and not replay._ENTRIES and replay.CAPTURES == captures
        assert graphs == ["launch", "launch", "launch"]  # noted; inside the failed capture; directly
    else:
        assert _call(graphs, t) == "r" and replay.ENABLED and replay.CAPTURES == captures + 1
        assert graphs == ["launch", "launch", "replay"]  # noted; inside the capture; the graph's replay


def test_while_torch_profiler_records_calls_launch(graphs):
    t = [FakeTensor(1024)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        for _ in range(3):
            _call(graphs, t)
    assert graphs == ["launch"] * 3 and not replay._ENTRIES
    _call(graphs, t)
    _call(graphs, t)
    assert graphs[3:] == ["launch", "capture", "replay", "kernels"]


def test_a_strided_q_is_copied_before_the_launches_only_for_the_gluon_kernels(monkeypatch):
    """function._rows_q: the Gluon path's copy of a strided q is made before replay.run (so outside any graph),
    only where a gathered segment may take those kernels; a contiguous q is never copied."""
    from sparse_transformer import layouts
    from sparse_transformer.attention.triton import function

    fixed = function.get_launches(layouts.fixed(256, 64, 16), 64, "cpu")
    strided = function.get_launches(layouts.strided(256, 64), 64, "cpu")
    qkv = torch.randn(1, 256, 3, 2, 64)
    q = qkv[:, :, 0].transpose(1, 2)  # [1, 2, 256, 64], the model's strides
    assert function._rows_q(q, fixed) is q  # on the CPU no Gluon kernel runs

    class Hopper:
        @staticmethod
        def runs_on(q):
            return True

    monkeypatch.setattr(function, "gluon_for", lambda q, seg: Hopper if seg.kind == "gather" else None)
    got = function._rows_q(q, fixed)
    assert got is not q and got.is_contiguous() and torch.equal(got, q)
    assert function._rows_q(q, strided) is q  # no gathered segment
    contiguous = q.contiguous()
    assert function._rows_q(contiguous, fixed) is contiguous
    monkeypatch.setattr(Hopper, "runs_on", staticmethod(lambda q: False))  # e.g. fp32, or not a Hopper GPU
    assert function._rows_q(q, fixed) is q


def test_off_cpu_another_device_triton_hooks_or_inside_a_capture_always_launch(graphs, monkeypatch):
    t = [FakeTensor(1024)]
    monkeypatch.setattr(replay, "ENABLED", False)
    for _ in range(3):
        _call(graphs, t)
    monkeypatch.setattr(replay, "ENABLED", True)
    cpu = [torch.zeros(4)]
    for _ in range(3):
        _call(graphs, cpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for _ in range(3):
        _call(graphs, t)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    monkeypatch.setattr(replay, "triton_per_call_options", lambda: True)  # e.g. Triton's profiler hooks
    for _ in range(3):
        _call(graphs, t)
    monkeypatch.setattr(replay, "triton_per_call_options", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for _ in range(3):
        _call(graphs, t)
    assert graphs == ["launch"] * 15


def test_least_recently_used_keys_are_dropped(graphs, monkeypatch):
    monkeypatch.setattr(replay, "MAX_GRAPHS", 2)
    a, b, c = ([FakeTensor(p)] for p in (1024, 2048, 4096))
    for t in (a, b, a, c):  # a used again (captured) before c arrives: b is dropped
        _call(graphs, t)
    graphs.clear()
    _call(graphs, a)  # kept: replayed
    _call(graphs, b)  # forgotten: launched and noted again
    _call(graphs, b)
    assert graphs == ["replay", "kernels", "launch", "capture", "replay", "kernels"]


def test_clear_cache_drops_the_graphs(graphs):
    from sparse_transformer.attention.triton import function

    t = [FakeTensor(1024)]
    _call(graphs, t)
    _call(graphs, t)
    function.clear_cache()
    graphs.clear()
    _call(graphs, t)
    assert graphs == ["launch"]
