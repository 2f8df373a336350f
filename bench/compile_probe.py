"""Compile our training kernels for an H100/H200 (sm_90) on any machine, no GPU needed, and report what the compiler
made of each: registers per thread and spills (ptxas -v, the ptxas bundled with Triton), shared memory, and counts of
wgmma / mma.sync / cp.async / atomic instructions in the PTX. A cheap first filter before device time: a tile setting
that spills or needs too much shared memory need not be timed. Usage:
python bench/compile_probe.py                     # every (kind, head dim, pass) of the current TUNING
python bench/compile_probe.py 32x32/4/2 64x64/4/3  # those settings (BMxBN/warps/stages) for every kind and pass, d=64
SPARSE_TRANSFORMER_ONE_LOOP=0|1 python bench/compile_probe.py  # every pass split / one loop (default: Pass.one_loop)
MAXNREG=96 python bench/compile_probe.py  # every pass under this register cap (default: TUNING's; MAXNREG=0: none)
PTX_DIR=dir python bench/compile_probe.py  # also write each pass's PTX there (to compare two versions of a kernel)
The device has Triton 3.6; another version compiles differently (a venv with that wheel gives its numbers)."""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse_transformer.attention.triton import function as fn
from sparse_transformer.attention.triton.backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
from sparse_transformer.attention.triton.common import one_loop, one_loop_default
from sparse_transformer.attention.triton import backward as bwd_mod
from sparse_transformer.attention.triton import forward as fwd_mod
from sparse_transformer.attention.triton.forward import _attn_fwd_kernel

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
KINDS = {"natural": 0, "transposed": 1, "gather": 2}
N, H, NK_GATHER, L, C = 65536, 8, 8192, 256, 32  # the fixed-64k shapes; the transposed part as strided-64k's


def compile_kernel(kernel, args, consts, warps, stages, maxnreg=None):
    """args: name -> pointer type ('*bf16') or a value, specialized as Triton's launcher would (ints equal to 1 become
    constants, multiples of 16 are marked divisible; pointers 16-byte aligned)."""
    sig, cex, attrs = {}, dict(consts), {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(args[name], str):
            sig[name], attrs[(i,)] = args[name], [["tt.divisibility", 16]]
        elif isinstance(args[name], float):
            sig[name] = "fp32"
        elif args[name] == 1:
            sig[name], cex[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if args[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, constexprs=cex, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    maxnreg = int(os.environ["MAXNREG"]) if os.environ.get("MAXNREG") else maxnreg
    if maxnreg:  # a register cap per thread (Triton's maxnreg launch option)
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def ptxas_report(ptx):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", err)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    if "C7512" in err or "C7514" in err or "C7515" in err:  # ptxas made asynchronous wgmma synchronous (C7512: for
        # want of registers, as under a register cap): the pipelining is lost
        print("  ptxas: wgmma serialized: " + err[err.find("C75"):][:160].replace("\n", " "), flush=True)
    return (int(regs.group(1)) if regs else -1), (f"{spill.group(1)}/{spill.group(2)}" if spill else "?")


def passes(kind, d, setting, pass_name):
    """(kernel, runtime args, constexprs) of one pass of one segment kind."""
    bm, bn = setting[:2]
    split = fn.TUNING.get((kind, d), {}).get("split", ())
    default = one_loop_default(setting, "fused" if pass_name.startswith("fused") else pass_name, split)
    nk = NK_GATHER if kind == "gather" else N
    flags = dict(KIND=KINDS[kind], IEEE=False, HAS_DENSE=False, HAS_BLK=False,
                 HAS_WIN=(1 + fn.WIN_ALONE * (1 + fn.RULE_KEYS)) * (kind == "natural"),  # the window band (2, 3:
                 # its only rule; 3 without the key-validity mask)
                 HAS_STR=(1 + fn.RULE_KEYS) * (kind == "transposed"), HAS_SUM=kind == "gather", BLOCK_M=bm,
                 BLOCK_N=bn, HEAD_DIM=d)
    strides = {f"stride_{t}{x}": v for t in "qkvo" for x, v in zip("bhn", (H * N * d, N * d, d))}
    common = dict(strides, H=H, N=N, NQ=N, NK=nk, TH=1, SEG_L=L, SEG_C=C if kind == "gather" else N // L,
                  GROUP=H)
    tensors = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", lse_ptr="*fp32", mid_ptr="*i32", idx_ptr="*i32",
                   prm_ptr="*i32")
    if pass_name == "fwd":
        return _attn_fwd_kernel, dict(tensors, o_ptr="*bf16", row_ptr="*i32", qk_scale=0.18, NQB=N // bm, **common), \
            dict(flags, T_ON_X=False, MERGE=True, FOLD=kind in fwd_mod.FOLD_KINDS,
                 ONE_LOOP=one_loop(fwd_mod.ONE_LOOP, default))
    tensors.update(do_ptr="*bf16", delta_ptr="*fp32", qk_scale=0.18, sm_scale=0.125)
    if pass_name == "dq":
        return _attn_bwd_dq_kernel, dict(tensors, o_ptr="*bf16", dq_ptr="*bf16", row_ptr="*i32", NQB=N // bm,
                                         **common), dict(flags, T_ON_X=False, ACCUM=True, DELTA=False,
                                                               ONE_LOOP=one_loop(bwd_mod.ONE_LOOP, default))
    return _attn_bwd_dkdv_kernel, dict(tensors, dq_ptr="*fp32", dk_ptr="*bf16", dv_ptr="*bf16", col_ptr="*i32",
                                       stride_gb=H * N * d, stride_gh=N * d, stride_gn=d, NKB=nk // bn, **common), \
        dict(flags, T_ON_X=False, ACCUM=True, FUSE_DQ=pass_name.startswith("fused"),
             ONE_LOOP=one_loop(bwd_mod.ONE_LOOP, default))


def probe(kind, d, pass_name, setting, default=False):
    """default: a pass of TUNING, compiled with TUNING's register cap where it has one (the device is Hopper; on the
    window band, as compile_probe models the natural kind)."""
    kernel, args, consts = passes(kind, d, setting, pass_name)
    tag = f"{kind:10s} d={d:<3d} {pass_name:5s} {setting[0]}x{setting[1]}/{setting[2]}/{setting[3]}"
    try:
        caps = fn.caps_for(fn.TUNING.get((kind, d), {}), consts["KIND"], consts["HAS_WIN"]) if default else {}
        cap = fn.cap_on_tile(caps.get(pass_name), *setting[:2])
        k = compile_kernel(kernel, args, consts, setting[2], setting[3], cap)
    except Exception as e:  # e.g. out of shared memory
        print(f"{tag:40s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
        return
    ptx = k.asm["ptx"]
    if os.environ.get("PTX_DIR"):
        name = re.sub(r"[^A-Za-z0-9=._-]+", "_", tag.strip()) + ".ptx"
        with open(os.path.join(os.environ["PTX_DIR"], name), "w") as f:
            f.write(ptx)
    regs, spills = ptxas_report(ptx)
    atomics = len(re.findall(r"\b(?:red|atom)[.]global", ptx))  # outside the f-string: Python < 3.12
    if os.environ.get("MAXNREG") or cap:
        tag += f" cap {os.environ.get('MAXNREG') or cap}"
    print(f"{tag:40s} regs {regs:4d}  spill st/ld {spills:7s}  smem {k.metadata.shared // 1024:4d} KiB  "
          f"wgmma {ptx.count('wgmma.mma_async'):3d}  mma.sync {len(re.findall(r'mma[.]sync', ptx)):3d}  "
          f"cp.async {ptx.count('cp.async'):3d}  atomics {atomics}", flush=True)


def main(settings):
    print(f"triton {triton.__version__}, target sm_90")
    if not settings:
        for (kind, d), cfg in fn.TUNING.items():
            for pass_name in ("fwd", "dq", "dkdv", "fused", "fused_ragged"):
                if cfg.get(pass_name) is not None:
                    probe(kind, d, pass_name, cfg[pass_name], default=True)
        return
    for text in settings:
        tiles, warps, stages = text.split("/")
        bm, bn = (int(x) for x in tiles.split("x"))
        for kind in KINDS:
            for pass_name in ("fwd", "dq", "dkdv", "fused"):
                probe(kind, 64, pass_name, (bm, bn, int(warps), int(stages)))


if __name__ == "__main__":
    main(sys.argv[1:])
