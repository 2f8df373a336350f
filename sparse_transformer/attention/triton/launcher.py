"""Low-overhead kernel launches: call a compiled Triton (or Gluon) kernel's launcher directly, skipping the per-call
binding.

`kernel[grid](*args, **constexprs)` binds and specializes every argument in Python on each call (tens of
microseconds for our ~40-argument kernels on the device machines' CPUs, longer than some of the kernels run). The
first call with a given key goes through Triton as usual (compiling if needed) and keeps the CompiledKernel it
returns; later calls with the same key launch it directly. The key is finer than Triton's specialization: the
constexprs and launch options, the device, the tensors' dtypes and their addresses modulo 16, and the scalar
arguments' exact values (strides, lengths, scale), so a key seen before always maps to the kernel Triton would pick.
Gluon kernels' TensorDescriptor arguments key on their base's dtype and alignment, block shape and layout; the
compiled launcher encodes each one's TMA descriptor per call, as on Triton's path.
Every call takes Triton's own path under TRITON_INTERPRET=1, with FAST = False (SPARSE_TRANSFORMER_FAST_LAUNCH=0), or
while anything Triton would honour per call is switched on: launch hooks (e.g. its proton profiler), pre-run hooks,
TRITON_DEBUG, an instrumentation mode. Launches run on the tensors' device (made current for the call if need be).
"""
from __future__ import annotations

import os

import torch


def _triton_at_least(major: int, minor: int) -> bool:
    import triton

    try:
        return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)
    except ValueError:  # an unparsable (development) version: take Triton's own path
        return False


# the direct call mirrors JITFunction.run of Triton 3.6 (checked against the 3.6.0 and 3.9.0 sources); older Triton
# versions always take Triton's own path
FAST = os.environ.get("SPARSE_TRANSFORMER_FAST_LAUNCH", "1") != "0" and _triton_at_least(3, 6)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_ENTRIES = 4096  # one entry per (kernel, settings, shapes); cleared when full (shapes seen once, e.g. decoding)
_COMPILED: dict = {}
SLOW = 0  # launches that went through Triton's own path (first calls of a key, per-call options, FAST off)


def launch(kernel, grid, tensors, scalars, constexprs):
    """kernel[grid](*tensors, *scalars, **constexprs): `tensors` the leading tensor (or TensorDescriptor) parameters,
    `scalars` the int / float parameters after them (together every runtime parameter, in order), `constexprs` the
    constexpr parameters (after those in the signature) plus num_warps / num_stages, always built in the same order
    for one kernel."""
    if _INTERPRET:
        kernel[grid](*tensors, *scalars, **constexprs)
        return
    dev = _tensor(tensors[0]).device.index
    if _current_device() != dev:  # Triton compiles for, loads on and launches into the current device
        with torch.cuda.device(dev):
            return launch(kernel, grid, tensors, scalars, constexprs)
    global SLOW
    if not FAST:
        SLOW += 1
        kernel[grid](*tensors, *scalars, **constexprs)
        return
    key = (id(kernel), dev, *constexprs.values(), *[_arg_key(t) for t in tensors], *scalars)
    hit = _COMPILED.get(key)
    if hit is None or _per_call_options(kernel):
        SLOW += 1
        ck = kernel[grid](*tensors, *scalars, **constexprs)
        if ck is None:  # a JIT cache hook took the launch over
            return
        n_run = len(tensors) + len(scalars)
        tail = tuple(constexprs[p.name] for p in kernel.params[n_run:])  # constexpr values, in signature order
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        _COMPILED[key] = (ck, ck.function, ck.packed_metadata, ck.run, tail)
        return
    ck, fn, meta, run, tail = hit
    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _stream(dev), fn, meta, None, None,
        None, *tensors, *scalars, *tail)


def _tensor(arg):
    """The tensor behind a leading argument: itself, or a (Gluon) TensorDescriptor's base."""
    return arg if isinstance(arg, torch.Tensor) else arg.base


def _arg_key(arg):
    """What Triton specializes a tensor argument on (dtype, 16-byte alignment); for a TensorDescriptor also its block
    shape and shared-memory layout (its shape and strides are runtime arguments, encoded per launch)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15
    return arg.base.dtype, arg.base.data_ptr() & 15, tuple(arg.block_shape), repr(arg.layout), arg.padding


def _current_device():
    return torch.cuda.current_device()


def _stream(device_index):
    return torch._C._cuda_getCurrentRawStream(device_index)


def _per_call_options(kernel) -> bool:
    """Is anything on that Triton applies per call (hooks, debug mode, instrumentation)? Then launch through Triton."""
    from triton import knobs

    return (_active(knobs.runtime.launch_enter_hook) or _active(knobs.runtime.launch_exit_hook)
            or bool(getattr(kernel, "pre_run_hooks", None)) or bool(knobs.runtime.debug)
            or bool(getattr(knobs.compilation, "instrumentation_mode", "")))


def _active(hook) -> bool:
    """Triton 3.5+ keeps an always-present (empty) HookChain: a hook is active only when the chain holds calls."""
    return hook is not None and getattr(hook, "calls", True) != []


def clear():
    _COMPILED.clear()
