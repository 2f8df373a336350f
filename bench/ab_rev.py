"""The library at another revision against the working tree's, in one process, in turn: per-kernel GPU time (median
of 5 profiled fwd+bwd) and graph-replayed fwd and fwd+bwd of each setup, in the order new, old, new, old, new (so
that neither side always runs first or last). Each side builds its own layout and calls its own sparse_attention on
the same q, k, v; before timing, the two sides' outputs and gradients are compared.
Usage (two steps: the device has no git history):
  python bench/ab_rev.py export REV      # here: REV's package as bench/.ab_old/sparse_transformer_old (git-ignored)
  python bench/ab_rev.py time [setup ...]  # on the device, carrying bench/.ab_old; JSON in $OUT or bench/results/
ORDER="new old new ..." sets the order; besides "new" and "old", a side "MOD.ATTR=EXPR" (e.g.
"forward.FOLD_KINDS=('gather','natural')") is the working tree with attribute ATTR of
sparse_transformer.attention.triton.MOD set to EXPR (evaluated in that module, no spaces) while that side runs, e.g.
"function.TUNING={**TUNING,('natural',64):{**TUNING[('natural',64)],'maxnreg':{}}}".
"""
import importlib
import os
import shutil
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OLD_DIR = os.path.join(HERE, ".ab_old")
OLD_NAME = "sparse_transformer_old"


def export(rev, dest=OLD_DIR):
    """REV's sparse_transformer package, renamed, under dest (the package imports itself relatively only)."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    root = os.path.dirname(HERE)
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(["git", "archive", rev, "sparse_transformer"], check=True, capture_output=True,
                             cwd=root).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        shutil.move(os.path.join(tmp, "sparse_transformer"), os.path.join(dest, OLD_NAME))
    with open(os.path.join(dest, "REV"), "w") as f:
        f.write(subprocess.run(["git", "rev-parse", rev], check=True, capture_output=True, text=True,
                               cwd=root).stdout)
    print("exported", rev, "to", os.path.join(dest, OLD_NAME))


def sides(dest=OLD_DIR):
    """{"new": (layouts, sparse_attention, clear_cache), "old": (...)}: the working tree's package and the one
    exported to dest."""
    sys.path.insert(0, dest)
    out = {}
    for side, name in (("new", "sparse_transformer"), ("old", OLD_NAME)):
        pkg = importlib.import_module(name)
        fn = importlib.import_module(name + ".attention.triton.function")
        out[side] = (importlib.import_module(name + ".layouts"), pkg.sparse_attention, fn.clear_cache)
    return out


def _patched(side):
    """(enter, leave) for a side "MOD.ATTR=EXPR" (see the usage); two no-ops for "new" and "old"."""
    if side in ("new", "old"):
        return (lambda: None), (lambda: None)
    if "=" not in side:
        raise ValueError(f"a side is new, old or MOD.ATTR=EXPR, got {side!r}")
    target, expr = side.split("=", 1)
    mod_name, attr = target.rsplit(".", 1)
    mod = importlib.import_module("sparse_transformer.attention.triton." + mod_name)
    was = getattr(mod, attr)
    return (lambda: setattr(mod, attr, eval(expr, vars(mod)))), (lambda: setattr(mod, attr, was))


def time_sides(names, order=tuple(os.environ.get("ORDER", "new old new old new").split())):
    sys.path.insert(0, HERE)
    from dev_probe import graph_ms, median_kernel_times, run_setups
    from sparse_transformer.bench import SETUPS

    both = sides()
    rev = open(os.path.join(OLD_DIR, "REV")).read().strip()

    def run_setup(name, rows):
        B, H, n, D, make, _ = SETUPS[name]
        q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        go = torch.randn_like(q)
        calls = {}
        for side in dict.fromkeys(order):
            lay_mod, attend, clear = both["old" if side == "old" else "new"]
            lay = _layout(lay_mod, make)
            calls[side] = (lambda lay=lay, attend=attend: attend(q, k, v, lay, backend="triton"), clear,
                           *_patched(side))
        grads = {}
        for side, (f, clear, enter, leave) in calls.items():  # outputs and gradients, side by side
            enter()
            clear()
            o = f()
            o.backward(go)
            grads[side] = [o.detach().float()] + [t.grad.float() for t in (q, k, v)]
            q.grad = k.grad = v.grad = None
            del o  # (an output kept alive keeps its AccumulateGrad nodes, of the default stream: graph capture fails)
            clear()
            leave()
        ref = grads.get("old") or next(iter(grads.values()))
        diffs = {side: max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(g, ref))
                 for side, g in grads.items()}
        print(f"{name:12s} largest relative difference of O, dQ, dK, dV from old: {diffs}", flush=True)
        for side in order:
            f, clear, enter, leave = calls[side]
            fb = lambda f=f: f().backward(go)  # noqa: E731
            enter()
            clear()  # tables and graphs built anew per variant, as dev_probe does
            try:
                names_k, ks = median_kernel_times(fb, 5)
                q.grad = k.grad = v.grad = None
                g_fwd, g_fb = graph_ms(f), graph_ms(fb)
                q.grad = k.grad = v.grad = None
            finally:
                clear()
                leave()
            rows.append(dict(setup=name, side=side, rev=rev if side == "old" else "worktree", kernels=names_k, us=ks,
                             graph_fwd_ms=g_fwd, graph_fwdbwd_ms=g_fb, max_rel_diff=diffs[side]))
            print(f"{name:12s} {side[:24]:24s} graph fwd {g_fwd:.4f} fwd+bwd {g_fb:.4f} ms | "
                  + " ".join(f"{x:7.1f}" for x in ks), flush=True)

    return run_setups(names, run_setup, "ab-rev")


def _layout(lay_mod, make):
    """The setup's layout built by lay_mod (each side's own layouts module): SETUPS' maker re-run with its globals
    pointing there."""
    g = dict(make.__globals__, layouts=lay_mod)
    return type(make)(make.__code__, g, make.__name__, make.__defaults__, make.__closure__)()


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["export"] and len(args) == 2:
        export(args[1])
    elif args[:1] == ["time"]:
        from sparse_transformer.bench import SETUPS as _S

        time_sides(args[1:] or list(_S))
    else:
        sys.exit(__doc__)
