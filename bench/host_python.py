"""Our Python's share of one attention call: sparse_attention(backend="triton") fwd+bwd with the kernel launches
stubbed out, on CPU tensors (no GPU, no interpreter), so only the wrapper's own host work is timed. The same shapes as
`bench/dev_probe.py micro` (strided n=256, l=16, one head of width 64); with --gluon also the fixed pattern (n=1024,
l=128, c=32, two heads, bf16) through the Triton gathered kernels' host code and through the Gluon kernels' (on the
CPU their eligibility is forced: layout checks, descriptor parts and launch keys run as on a Hopper GPU). With
--launcher the launches are not stubbed but go through launcher.launch's cached direct path (its keys, and the TMA
encodings' cache on Triton 3.6), with stand-ins for the compiled kernels and their C launchers.
Usage: python bench/host_python.py [reps] [--gluon] [--launcher]"""
import sys
import time
import types

import torch

from sparse_transformer import layouts, sparse_attention
from sparse_transformer.attention.plan import GATHER
from sparse_transformer.attention.triton import backward, block_backward, forward, gluon_gather, launcher, replay


def per_call_us(lay, shape, dtype, reps):
    """Median over 5 rounds of reps calls of one fwd+bwd's host time, us."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    go = torch.randn_like(q)

    def fb():
        sparse_attention(q, k, v, lay, backend="triton").backward(go)
        q.grad = k.grad = v.grad = None  # the CPU additions would swamp the host work

    fb()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fb()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(times)[2]


class _Compiled:
    """A compiled kernel as launcher.launch keeps it: Triton 3.6's run (its `launch` closes over the C launcher and
    the descriptor positions, as _TmaLaunch.of reads them), no-op launchers."""

    def __init__(self, where):
        launcher = lambda *args: None  # noqa: E731 (the names Triton's closure uses)
        tensordesc_indices = set(where)

        def inner(*args):
            return launcher(*args, tensordesc_indices)

        self.function, self.packed_metadata = "fn", "meta"
        self.run = _Run(inner)
        self.metadata = types.SimpleNamespace(tensordesc_meta=[{} for _ in where])


class _Run:
    """The compiled kernel's launcher object (calls do nothing)."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid = launch_pdl = False

    def __init__(self, inner):
        self.launch = inner

    def __call__(self, *args):
        pass


class _Kernel:
    """Stands in for a JIT kernel on its first (Triton-path) call; the key is the real kernel's signature."""

    def __init__(self, kernel):
        self.params = kernel.params

    def __getitem__(self, grid):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        return lambda *args, **kw: _Compiled([i for i, a in enumerate(args) if isinstance(a, TensorDescriptor)])


def _through_launcher():
    """Route every launch through launcher.launch's direct path with stand-ins (no GPU)."""
    from triton.backends.nvidia import driver

    kernels = {}

    def launch(kernel, grid, tensors, scalars, constexprs):
        launcher.launch(kernels.setdefault(kernel, _Kernel(kernel)), grid, tensors, scalars, constexprs)

    launcher.FAST, launcher._INTERPRET, launcher.TMA_DIRECT = True, False, launcher.triton_version()
    launcher._stream = lambda dev: 7
    launcher._current_device = lambda: None  # CPU tensors' device index
    launcher._per_call_options = lambda kernel: False
    driver._BASE_ARGS_FORMAT = "iiiKKppOOOOOO"
    driver.make_tensordesc_arg = lambda desc, meta, *rest: ["map", *desc.shape, *desc.strides]
    return launch


def main(reps: int, gluon: bool, through_launcher: bool) -> None:
    replay.ENABLED = False  # the direct launches' host code (CPU tensors posing as CUDA ones below: no graphs here)
    launch = _through_launcher() if through_launcher else (lambda *args, **kwargs: None)
    for module in (forward, backward, block_backward, gluon_gather):
        module.launch_kernel = launch
    us = per_call_us(layouts.strided(256, 16), (1, 1, 256, 64), torch.float32, reps)
    print(f"our Python per fwd+bwd, kernels stubbed: median {us:.0f} us over 5 x {reps} calls")
    if not gluon:
        return
    fixed = layouts.fixed(1024, 128, 32)
    us = per_call_us(fixed, (1, 2, 1024, 64), torch.bfloat16, reps)
    print(f"fixed pattern, Triton gathered kernels' host code: median {us:.0f} us")
    forward.gluon_for = lambda q, seg: gluon_gather if seg.kind == GATHER else None
    forward._GLUON[:] = [gluon_gather]  # the backward asks gluon_module() (None off Triton 3.6)
    launcher._CAPABILITY[None] = (9, 0)  # CPU tensors' device index
    torch.Tensor.is_cuda = property(lambda self: True)  # what eligible() asks first; nothing else here reads it
    try:
        us = per_call_us(fixed, (1, 2, 1024, 64), torch.bfloat16, reps)
    finally:
        del torch.Tensor.is_cuda
    print(f"fixed pattern, Gluon kernels' host code (eligibility forced): median {us:.0f} us")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 2000, "--gluon" in sys.argv[1:], "--launcher" in sys.argv[1:])
