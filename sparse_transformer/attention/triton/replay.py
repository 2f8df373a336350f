"""Replay a call's kernel launches from a CUDA graph (on by default; SPARSE_TRANSFORMER_GRAPHS=0 turns it off).

An eager fwd+bwd of ours launches 4-6 kernels, and on the device machines' CPUs the Python around those launches
costs more than the GPU time of the smaller setups (BENCHMARKS.md: 0.7-1.2 ms of host time per fwd+bwd at n = 12288,
against 0.42-0.98 ms of GPU time). A CUDA graph launches the same kernels for a few microseconds of host time.

`run(head, tensors, keep, launch_all)` keys a call on `head` (what picks the launches: the layout's launch list,
scale, flags) and every tensor the kernels touch (address, dtype, shape, strides):
- the first call with a key launches as usual and notes the key;
- the second captures `launch_all` into a graph (on a side stream, errors local to this thread), then replays it;
- later ones replay it. The kernels read and write the tensors at those addresses, whatever tensor lives there now,
  so replaying is exact: the same kernels with the same arguments.
So a loop that reuses its buffers (training steps under the caching allocator, benchmarks) replays from its second
call on. Calls launch as usual inside someone else's capture (bench graph mode, torch.compile's cudagraphs), on
tensors of a device other than the current one, while torch's profiler records (it would see one graph launch instead
of our kernels), and while Triton's per-call options are on (launch hooks such as its profiler, debug mode:
launcher.triton_per_call_options).

Memory: every noted key keeps `keep` alive (the launch list: its tables are kernel arguments); each graph also keeps a
private memory pool with whatever its launches allocated. They allocate nothing: the autograd wrapper makes every
buffer before it calls run, the Gluon path's copy of a strided q included (function._rows_q), and what the launch
code makes once (the Gluon path's per-head offset table) is made on a key's first, direct call. At most MAX_GRAPHS keys
are kept (SPARSE_TRANSFORMER_GRAPHS_MAX, default 1024: a graph's pool stays empty, the graph is a few kernel nodes),
the least recently used dropped first; a loop with more keys than that per turn (a model of over 341 layers with
recomputation: 3 keys per layer) drops each key before it comes again and never replays.
Settings read at launch time (TUNING, ONE_LOOP, GLUON_GATHER, ...) are baked into a graph: after changing one,
function.clear_cache() (which clears these too). One lock serializes the calls that take this path (its cache and the
one side stream per device are shared by threads). A capture that fails (something in the launches that a graph cannot
hold) warns once and turns replay off for the process.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict

import torch

from .launcher import triton_per_call_options

ENABLED = os.environ.get("SPARSE_TRANSFORMER_GRAPHS", "1") != "0"
MAX_GRAPHS = int(os.environ.get("SPARSE_TRANSFORMER_GRAPHS_MAX", "1024"))  # the cifar10 preset: 128 layers, 384 keys
CAPTURES = 0  # graphs captured (tests)
REPLAYS = 0  # calls served by a replay
CALLS = 0  # calls of run, replayed or not (benchmarks count the share that replayed)
_ENTRIES: OrderedDict = OrderedDict()  # key -> _Entry
_STREAMS: dict = {}  # device index -> side stream for captures
_LOCK = threading.RLock()  # (re-entered: a failed capture clears the cache under it)


class _Entry:
    __slots__ = ("keep", "result", "graph")

    def __init__(self, keep, result):
        self.keep, self.result, self.graph = keep, result, None


def run(head: tuple, tensors, keep, launch_all):
    """launch_all()'s result, its launches made directly or replayed from a graph of them (see the module's
    docstring). tensors: every tensor the launches read or write (the first one's device runs them)."""
    global CALLS
    CALLS += 1
    if (not ENABLED or not tensors[0].is_cuda or torch.cuda.is_current_stream_capturing()
            or tensors[0].device.index != torch.cuda.current_device()  # (a graph replays on the current device)
            or torch.autograd._profiler_enabled() or triton_per_call_options()):
        return launch_all()
    key = (*head, *[(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors])
    with _LOCK:
        return _run(key, tensors[0].device, keep, launch_all)


def _run(key, device, keep, launch_all):
    global REPLAYS
    entry = _ENTRIES.get(key)
    if entry is None:
        result = launch_all()  # (raising: no key noted)
        _ENTRIES[key] = _Entry(keep, result)
        if len(_ENTRIES) > MAX_GRAPHS:
            _ENTRIES.popitem(last=False)
        return result
    _ENTRIES.move_to_end(key)
    if entry.graph is None:
        captured = _capture(device, launch_all)
        if captured is None:  # replay is off from now on
            _ENTRIES.pop(key, None)
            return launch_all()
        entry.graph, entry.result = captured  # the result of the launches the graph holds
    entry.graph.replay()
    REPLAYS += 1
    return entry.result


def _capture(device, launch_all):
    """(a CUDA graph of launch_all's launches, captured and not run, and launch_all's result), or None where the
    capture failed: then a warning, and replay off for the process."""
    global CAPTURES, ENABLED
    current = torch.cuda.current_stream(device)
    side = _STREAMS.get(device.index)
    if side is None:
        side = _STREAMS[device.index] = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(current)  # (orders the side stream's own earlier work, if any; nothing runs while capturing)
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                result = launch_all()
            finally:
                graph.capture_end()
    except RuntimeError as e:  # an invalidated capture (capture_end raises), or a launch that failed inside it
        try:  # torch's capture_end raises before it hands the allocator back from the graph's pool
            torch._C._cuda_endAllocateToPool(device.index, graph.pool())
        except Exception:  # noqa: BLE001 (best effort: replay goes off either way)
            pass
        ENABLED = False
        clear()
        warnings.warn(f"sparse_transformer: capturing the attention's launches in a CUDA graph failed ({e}); "
                      "SPARSE_TRANSFORMER_GRAPHS replay is off for this process", RuntimeWarning, stacklevel=3)
        return None
    finally:
        current.wait_stream(side)
    CAPTURES += 1
    return graph, result


def clear():
    """Drop every graph and noted key (function.clear_cache calls this)."""
    with _LOCK:
        _ENTRIES.clear()
