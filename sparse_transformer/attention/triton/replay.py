"""Replay a call's kernel launches from a CUDA graph (SPARSE_TRANSFORMER_GRAPHS=1; off by default).

An eager fwd+bwd of ours launches 4-6 kernels, and on the device machines' CPUs the Python around those launches
costs more than the GPU time of the smaller setups (BENCHMARKS.md: 0.7-1.2 ms of host time per fwd+bwd at n = 12288,
against 0.42-0.98 ms of GPU time). A CUDA graph launches the same kernels for a few microseconds of host time.

`run(head, tensors, keep, launch_all)` keys a call on `head` (what picks the launches: the layout's launch list,
scale, flags) and every tensor the kernels touch (address, dtype, shape, strides):
- the first call with a key launches as usual and notes the key;
- the second captures `launch_all` into a graph (on a side stream, errors local to this thread), then replays it;
- later ones replay it. The kernels read and write the tensors at those addresses, whatever tensor lives there now,
  so replaying is exact: the same kernels with the same arguments.
A loop that reuses its buffers (training steps under the caching allocator, benchmarks) hits from its third step on.
Calls inside someone else's capture (bench graph mode, torch.compile's cudagraphs), and calls on tensors of a device
other than the current one, launch as usual.

Each graph keeps `keep` alive (the launch list: its tables are kernel arguments) and a private memory pool that holds
whatever the launches allocated (the Gluon path's copy of a non-contiguous q). At most MAX_GRAPHS graphs are kept, the
least recently used dropped first. Settings read at launch time (TUNING, ONE_LOOP, GLUON_GATHER, ...) are baked into a
graph: after changing one, function.clear_cache() (which clears these too).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

ENABLED = os.environ.get("SPARSE_TRANSFORMER_GRAPHS", "0") == "1"
MAX_GRAPHS = 128  # a training step of a 30-layer model with recomputation: 90 keys (forward twice, backward once)
CAPTURES = 0  # graphs captured (tests)
REPLAYS = 0  # calls served by a replay
_ENTRIES: OrderedDict = OrderedDict()  # key -> _Entry
_STREAMS: dict = {}  # device index -> side stream for captures


class _Entry:
    __slots__ = ("keep", "result", "graph", "failed")

    def __init__(self, keep, result):
        self.keep, self.result, self.graph, self.failed = keep, result, None, False


def run(head: tuple, tensors, keep, launch_all):
    """launch_all()'s result, its launches made directly or replayed from a graph of them (see the module's
    docstring). tensors: every tensor the launches read or write (the first one's device runs them)."""
    global REPLAYS
    if (not ENABLED or not tensors[0].is_cuda or torch.cuda.is_current_stream_capturing()
            or tensors[0].device.index != torch.cuda.current_device()):  # (a graph replays on the current device)
        return launch_all()
    key = (*head, *[(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors])
    entry = _ENTRIES.get(key)
    if entry is None:
        result = launch_all()
        _ENTRIES[key] = _Entry(keep, result)
        if len(_ENTRIES) > MAX_GRAPHS:
            _ENTRIES.popitem(last=False)
        return result
    _ENTRIES.move_to_end(key)
    if entry.failed:
        return launch_all()
    if entry.graph is None:
        graph = _capture(tensors[0].device, launch_all)
        if graph is None:  # something in the launches cannot be captured: never try this key again
            entry.failed = True
            return launch_all()
        entry.graph = graph
    entry.graph.replay()
    REPLAYS += 1
    return entry.result


def _capture(device, launch_all):
    """A CUDA graph of launch_all's launches (captured, not run), or None where capturing failed."""
    global CAPTURES
    current = torch.cuda.current_stream(device)
    side = _STREAMS.get(device.index)
    if side is None:
        side = _STREAMS[device.index] = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    side.wait_stream(current)  # the capture must not start before the work it follows is queued
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launch_all()
            finally:
                graph.capture_end()
    except RuntimeError:
        return None
    finally:
        current.wait_stream(side)
    CAPTURES += 1
    return graph


def clear():
    """Drop every graph and noted key (function.clear_cache calls this)."""
    _ENTRIES.clear()
