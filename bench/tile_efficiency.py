"""How much of the work our kernels do is the layout's: visible entries over entries computed (active tiles x BM x BN,
forward tables) for each setup of `bench attention`, at the tiles TUNING picks and at uniform 32x32 / 64x64 / 128x64.
CPU only (tile tables, no kernel). Usage: python bench/tile_efficiency.py"""
from sparse_transformer.attention.plan import TRANSPOSED, get_segments, get_tables
from sparse_transformer.attention.triton import function as fn
from sparse_transformer.bench import SETUPS


def tiles_for(seg, head_dim, choice):
    if choice != "current":
        return choice
    bm, bn = fn.TUNING[(seg.kind, 64 if head_dim <= 64 else 128)]["fwd"][:2]
    if seg.kind == TRANSPOSED and seg.C < max(bm, bn):  # the same shrink rule as function._pass
        bm = bn = max(16, 1 << (seg.C.bit_length() - 1))
    return bm, bn


def main():
    choices = ("current", (32, 32), (64, 64), (128, 64))
    print(f"{'setup':12s} {'segments at current tiles (active / partial tiles)':64s} " + " ".join(
        f"{str(c):>10s}" for c in choices))
    for name, (_, _, n, head_dim, make, _) in SETUPS.items():
        lay = make()
        visible = lay.density() * n * n
        effs, parts = [], []
        for choice in choices:
            computed = 0
            for idx, seg in enumerate(get_segments(lay)):
                bm, bn = tiles_for(seg, head_dim, choice)
                tab = get_tables(lay, idx, bm, bn, "cpu")
                active = int(tab.q_ptr[-1])
                computed += active * bm * bn
                if choice == "current":
                    partial = active - int((tab.q_mid - tab.q_ptr[:-1]).sum())
                    parts.append(f"{seg.kind} {bm}x{bn}: {active} / {partial}")
            effs.append(visible / computed)
        print(f"{name:12s} {'; '.join(parts):64s} " + " ".join(f"{e:10.2f}" for e in effs))


if __name__ == "__main__":
    main()
