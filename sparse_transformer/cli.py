"""`sparse-transformer` command line: demo, train, eval, sample, layout, bench, model.

Each subcommand lives in its own module with `add_arguments(parser)` and `main(args) -> int`; this file only wires
them. Run `sparse-transformer <command> --help` for the flags.
"""
from __future__ import annotations

import argparse
import sys


def _layout_arguments(p: argparse.ArgumentParser):
    p.add_argument("pattern", choices=["fixed", "strided", "local", "dense", "image"], help="which pattern")
    p.add_argument("--n", type=int, default=256, help="sequence length")
    p.add_argument("--stride", type=int, default=16, help="the paper's l (strided / fixed; local: the window)")
    p.add_argument("--summary", type=int, default=4, help="the paper's c (fixed)")
    p.add_argument("--part", default="both", help="local | strided | summary | both (image: row | column | both)")
    p.add_argument("--heads", type=int, default=1, help="heads (fixed with --num-verts > 1)")
    p.add_argument("--num-verts", type=int, default=1, help="distinct summary sub-blocks across heads (fixed)")
    p.add_argument("--head", type=int, default=0, help="which head to draw")
    p.add_argument("--image", default="8x8x3", help="HxWxC for the image pattern")
    p.add_argument("--query", type=int, default=None, help="the query row to highlight")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[32, 64, 128], help="tile sizes to report")
    p.add_argument("--png", default=None, help="write the picture here")


def make_layout(args):
    from . import layouts

    if args.pattern == "fixed":
        return layouts.fixed(args.n, args.stride, args.summary, args.part, heads=args.heads, num_verts=args.num_verts)
    if args.pattern == "strided":
        return layouts.strided(args.n, args.stride, args.part)
    if args.pattern == "local":
        return layouts.local(args.n, args.stride)
    if args.pattern == "image":
        h, w, c = (int(x) for x in args.image.lower().split("x"))
        return layouts.image(h, w, c, args.part)
    return layouts.dense(args.n)


def _layout_main(args) -> int:
    from .pictures import draw_layout, tile_report

    lay = make_layout(args)
    print(tile_report(lay, args.block_sizes))
    if args.png:
        print(f"wrote {draw_layout(lay, args.png, query=args.query, head=args.head)}")
    return 0


def _model_arguments(p: argparse.ArgumentParser):
    p.add_argument("preset", help="a preset name (demo, cifar10, enwik8, imagenet64, audio-1m, ...)")


def _model_main(args) -> int:
    import torch

    from . import SparseTransformer, load_preset

    cfg = load_preset(args.preset)
    with torch.device("meta"):
        model = SparseTransformer(cfg)
    print(model.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import bench, demo, evaluate, sample, train

    parser = argparse.ArgumentParser(prog="sparse-transformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [
        ("demo", "train, evaluate and sample the demo preset on CPU (no download)", demo.add_arguments, demo.main),
        ("train", "train a preset (rerun the same command to resume from --out)", train.add_arguments, train.main),
        ("eval", "bits per dim of a checkpoint on a split", evaluate.add_arguments, evaluate.main),
        ("sample", "sample images (PNG), image completions, audio (WAV) or text from a checkpoint",
         sample.add_arguments, sample.main),
        ("layout", "print a layout's density and tiles, draw it (--png)", _layout_arguments, _layout_main),
        ("bench", "benchmarks against SDPA and FlexAttention (GPU)", bench.add_arguments, bench.main),
        ("model", "print a preset's shape, parameters, density and FLOPs", _model_arguments, _model_main),
    ]
    for name, help_, add, fn in commands:
        p = sub.add_parser(name, help=help_, description=help_)
        add(p)
        p.set_defaults(func=fn)
    return parser


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, CheckpointError, DataError) as e:  # bad values, files or data: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
