"""Low-overhead kernel launches: call a compiled Triton (or Gluon) kernel's launcher directly, skipping the per-call
binding.

`kernel[grid](*args, **constexprs)` binds and specializes every argument in Python on each call (tens of
microseconds for our ~40-argument kernels on the device machines' CPUs, longer than some of the kernels run). The
first call with a given key goes through Triton as usual (compiling if needed) and keeps the CompiledKernel it
returns; later calls with the same key launch it directly. The key is finer than Triton's specialization: the
constexprs and launch options, the device, the tensors' dtypes and their addresses modulo 16, and the scalar
arguments' exact values (strides, lengths, scale), so a key seen before always maps to the kernel Triton would pick.
Gluon kernels take their TMA descriptors as `Tma` parts (a TensorDescriptor is built only where Triton's own path
runs); they key on their base's dtype and alignment, block shape and layout. With Triton 3.6 (TMA_DIRECT) the direct
call encodes a descriptor once per address and geometry and reuses the encoding (no tensor is held), where Triton's
compiled launcher encodes every descriptor on every call; elsewhere the direct call hands Triton's launcher
TensorDescriptors.
Every call takes Triton's own path under TRITON_INTERPRET=1, with FAST = False (SPARSE_TRANSFORMER_FAST_LAUNCH=0), or
while anything Triton would honour per call is switched on: launch hooks (e.g. its proton profiler), pre-run hooks,
TRITON_DEBUG, an instrumentation mode. Launches run on the tensors' device (made current for the call if need be).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch


def triton_version() -> tuple | None:
    """(major, minor) of the installed Triton, or None for an unparsable (development) version."""
    import triton

    try:
        return tuple(int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return None


def _triton_at_least(major: int, minor: int) -> bool:
    version = triton_version()  # a development version takes Triton's own path
    return version is not None and version >= (major, minor)


# the direct call mirrors JITFunction.run of Triton 3.6 (checked against the 3.6.0 and 3.9.0 sources); older Triton
# versions always take Triton's own path
FAST = os.environ.get("SPARSE_TRANSFORMER_FAST_LAUNCH", "1") != "0" and _triton_at_least(3, 6)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_ENTRIES = 4096  # one entry per (kernel, settings, shapes); cleared when full (shapes seen once, e.g. decoding)
_COMPILED: dict = {}
SLOW = 0  # launches that went through Triton's own path (first calls of a key, per-call options, FAST off)
ENCODED = 0  # TMA descriptors the direct path encoded (a new address or geometry); hits reuse an encoding
_MAX_CODES = 4096  # encodings kept per compiled kernel (cleared when full): one per descriptor of each layer's call


class Tma(NamedTuple):
    """A Gluon TMA descriptor argument as its parts: a tensor and the element offset of the descriptor's start in
    it, the shape and strides the descriptor sees (tuples of ints), its block (box) shape and shared-memory layout."""

    base: torch.Tensor
    offset: int
    shape: tuple
    strides: tuple
    block: tuple
    layout: object

    def data_ptr(self) -> int:
        return self.base.data_ptr() + self.offset * self.base.element_size()

    def descriptor(self):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        view = self.base.as_strided(self.shape, self.strides, self.base.storage_offset() + self.offset)
        return TensorDescriptor(view, list(self.shape), list(self.strides), list(self.block), self.layout)


def launch(kernel, grid, tensors, scalars, constexprs):
    """kernel[grid](*tensors, *scalars, **constexprs): `tensors` the leading tensor (or TensorDescriptor) parameters,
    `scalars` the int / float parameters after them (together every runtime parameter, in order), `constexprs` the
    constexpr parameters (after those in the signature) plus num_warps / num_stages, always built in the same order
    for one kernel."""
    if _INTERPRET:
        kernel[grid](*_descriptors(tensors), *scalars, **constexprs)
        return
    dev = _tensor(tensors[0]).device.index
    if _current_device() != dev:  # Triton compiles for, loads on and launches into the current device
        with torch.cuda.device(dev):
            return launch(kernel, grid, tensors, scalars, constexprs)
    global SLOW
    if not FAST:
        SLOW += 1
        kernel[grid](*_descriptors(tensors), *scalars, **constexprs)
        return
    # (a plain tensor's key inline: this runs for every argument of every launch)
    key = (id(kernel), dev, *constexprs.values(),
           *[(t.dtype, t.data_ptr() & 15) if type(t) is _TENSOR else _arg_key(t) for t in tensors], *scalars)
    hit = _COMPILED.get(key)
    if hit is None or _per_call_options(kernel):
        SLOW += 1
        ck = kernel[grid](*_descriptors(tensors), *scalars, **constexprs)
        if ck is None:  # a JIT cache hook took the launch over
            return
        n_run = len(tensors) + len(scalars)
        tail = tuple(constexprs[p.name] for p in kernel.params[n_run:])  # constexpr values, in signature order
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        tma = _TmaLaunch.of(ck, tensors) if any(type(t) is Tma for t in tensors) else None
        _COMPILED[key] = (ck, ck.function, ck.packed_metadata, ck.run, tail, tma)
        return
    ck, fn, meta, run, tail, tma = hit
    gx, gy, gz = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
    if tma is None:
        run(gx, gy, gz, _stream(dev), fn, meta, None, None, None, *tensors, *scalars, *tail)
    elif tma.raw is None:  # Triton's compiled launcher encodes the descriptors
        run(gx, gy, gz, _stream(dev), fn, meta, None, None, None, *_descriptors(tensors), *scalars, *tail)
    else:
        tma.raw(gx, gy, gz, _stream(dev), fn, tma.coop, tma.pdl, None, None, meta, None, None, None,
                *tma.expand(tensors), *scalars, *tail)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side grids (triton.cdiv is a constexpr function: about 1.5 us a call in Triton 3.6 on this
    repository's CPU machine, against 0.02 for this)."""
    return -(-a // b)


def _descriptors(tensors):
    """The leading arguments as Triton takes them: each Tma as a TensorDescriptor."""
    return [t.descriptor() if type(t) is Tma else t for t in tensors]


# Triton's CUDA launcher whose layout _TmaLaunch mirrors: 3.6.0 (driver.py: wrap_handle_tensordesc's `inner` closes
# over the compiled module's launch, which takes 13 leading arguments, then each descriptor as make_tensordesc_arg
# expands it). None (SPARSE_TRANSFORMER_TMA_ONCE=0): Triton's launcher encodes every descriptor on every call.
# Read when a kernel's first launch is cached: after changing it, launcher.clear().
TMA_DIRECT = (3, 6) if os.environ.get("SPARSE_TRANSFORMER_TMA_ONCE", "1") != "0" else None


class _TmaLaunch:
    """A compiled Gluon kernel's own C launcher, with its descriptors' encodings cached by address and geometry.
    raw is None where the layout is not the one checked (another Triton, scratch memory, no descriptor metadata):
    then Triton's launcher encodes every call."""

    def __init__(self, raw, metas, coop, pdl):
        self.raw, self.metas, self.coop, self.pdl = raw, metas, coop, pdl
        self.codes: dict = {}

    @classmethod
    def of(cls, ck, tensors):
        """The kernel's direct launch where Triton's launcher is laid out as checked (TMA_DIRECT, read here: after a
        change, launcher.clear()), its descriptor parameters are exactly the Tma arguments' positions and each has
        its metadata; else one that hands Triton's launcher descriptors."""
        run = ck.run
        try:
            from triton.backends.nvidia import driver

            if TMA_DIRECT is None or triton_version() != TMA_DIRECT:
                raise LookupError
            inner = run.launch
            cells = {name: cell.cell_contents for name, cell in
                     zip(inner.__code__.co_freevars, inner.__closure__ or ())}
            raw, where = cells["launcher"], cells["tensordesc_indices"]
            metas = list(ck.metadata.tensordesc_meta or ())
            tma = {i for i, t in enumerate(tensors) if type(t) is Tma}
            if (driver._BASE_ARGS_FORMAT != "iiiKKppOOOOOO" or run.global_scratch_size or run.profile_scratch_size
                    or set(where) != tma or len(metas) != len(tma) or any(m is None for m in metas)
                    or not callable(raw)):
                raise LookupError
            return cls(raw, metas, run.launch_cooperative_grid, run.launch_pdl)
        except (LookupError, AttributeError, ValueError, TypeError, ImportError):
            return cls(None, None, None, None)

    def expand(self, tensors):
        """The kernel's leading arguments with each Tma as its encoding [descriptor, *shape, *strides]."""
        global ENCODED
        out, i = [], 0
        for t in tensors:
            if type(t) is not Tma:
                out.append(t)
                continue
            # dtype, block and layout are in the launch key that led to this kernel (_arg_key): equal at position i
            key = (i, t.data_ptr(), t.shape, t.strides)
            code = self.codes.get(key)
            if code is None:
                from triton.backends.nvidia.driver import make_tensordesc_arg

                if len(self.codes) >= _MAX_CODES:
                    self.codes.clear()
                code = self.codes[key] = make_tensordesc_arg(t.descriptor(), self.metas[i])
                ENCODED += 1
            out.extend(code)
            i += 1
        return out


def _tensor(arg):
    """The tensor behind a leading argument: itself, or a Tma's (or a Gluon TensorDescriptor's) base."""
    return arg if isinstance(arg, torch.Tensor) else arg.base


def _arg_key(arg):
    """What Triton specializes a tensor argument on (dtype, 16-byte alignment); for a TensorDescriptor also its block
    shape and shared-memory layout (its shape and strides are runtime arguments, encoded per launch)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() & 15
    if type(arg) is Tma:
        return arg.base.dtype, arg.data_ptr() & 15, arg.block, arg.layout
    return arg.base.dtype, arg.base.data_ptr() & 15, tuple(arg.block_shape), repr(arg.layout), arg.padding


_TENSOR = torch.Tensor


_CAPABILITY: dict = {}


def capability(device) -> tuple:
    """A CUDA device's compute capability (major, minor), cached per device index (asked on every call by the
    launch code)."""
    hit = _CAPABILITY.get(device.index)
    if hit is None:
        hit = _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)
    return hit


def _current_device():
    return torch.cuda.current_device()


def _stream(device_index):
    return torch._C._cuda_getCurrentRawStream(device_index)


def _per_call_options(kernel) -> bool:
    """Is anything on that Triton applies per call (hooks, debug mode, instrumentation)? Then launch through Triton."""
    return bool(getattr(kernel, "pre_run_hooks", None)) or triton_per_call_options()


def triton_per_call_options() -> bool:
    """Is any of Triton's global per-call options on (launch hooks such as its proton profiler, debug mode,
    instrumentation)? (replay.py launches directly then too.)"""
    from triton import knobs

    return (_active(knobs.runtime.launch_enter_hook) or _active(knobs.runtime.launch_exit_hook)
            or bool(knobs.runtime.debug) or bool(getattr(knobs.compilation, "instrumentation_mode", "")))


def _active(hook) -> bool:
    """Triton 3.5+ keeps an always-present (empty) HookChain: a hook is active only when the chain holds calls."""
    return hook is not None and getattr(hook, "calls", True) != []


def clear():
    _COMPILED.clear()
