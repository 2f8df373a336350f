"""Pictures of layouts in the style of the paper's Figure 3, drawn with Pillow.

Top: the n x n connectivity matrix (query i down, key j across). A1 cells (local band / own block) are dark blue, A2
cells (strided column / summary cells) light blue, dense or custom cells grey; one query row is highlighted in
orange. Bottom: the same query's keys laid out as the sequence folded into rows of `stride` positions, the paper's
lower panel, where the strided pattern is "my row + my column" and the fixed one "my block + the summary columns".
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .layouts import P_BLK, P_STR, P_SUM_L, P_WIN, Layout, element_rule

WHITE, GRID, QUERY = (255, 255, 255), (225, 225, 225), (214, 39, 40)
A1, A2, OTHER = (31, 78, 160), (110, 170, 230), (120, 120, 120)
A1_HI, A2_HI, OTHER_HI = (230, 120, 20), (250, 180, 90), (240, 150, 60)


def part_masks(layout: Layout, head: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bool [n, n] masks of head's A1 part, A2 part (A1 wins where both hold) and any other part (dense / custom)."""
    p = layout.params()[head]
    i = torch.arange(layout.n)
    ii, jj = i[:, None], i[None, :]

    def only(*cols):
        q = torch.zeros_like(p)
        for c in cols:
            q[c] = p[c]
        if P_SUM_L in cols:
            q[P_SUM_L + 1], q[P_SUM_L + 2] = p[P_SUM_L + 1], p[P_SUM_L + 2]
        return q

    a1 = element_rule(only(P_WIN, P_BLK), ii, jj)
    a2 = element_rule(only(P_STR, P_SUM_L), ii, jj) & ~a1
    other = layout.head(head).element_mask() & ~a1 & ~a2  # dense and custom parts
    return a1, a2, other


def draw_layout(layout: Layout, path: str, query: int | None = None, head: int = 0, fold: int | None = None,
                cell: int | None = None) -> str:
    """Write a PNG of the layout (see the module docstring) and return its path.

    query: the highlighted row (default: a row near the end); fold: width of the folded lower panel (default: the
    layout's stride, else about sqrt(n)); cell: pixels per matrix cell (default: fits about 640 px).
    """
    n = layout.n
    if n > 2048:
        raise ValueError(f"drawing needs n <= 2048 (got n={n}); draw a smaller n with the same stride")
    query = n - 1 - (n // 7) if query is None else query
    if not 0 <= query < n:
        raise ValueError(f"query={query} must lie in [0, {n})")
    hp = layout.heads[head]
    fold = fold or hp.stride or hp.window or hp.block or (hp.summary[0] if hp.summary else 0) or int(n ** 0.5)
    cell = cell or max(1, 640 // n)
    a1, a2, other = (m.numpy() for m in part_masks(layout, head))
    img = np.full((n, n, 3), 255, np.uint8)
    img[query] = (255, 236, 200)  # the highlighted row, so that it shows where it sees nothing too
    for mask, col, hi in ((other, OTHER, OTHER_HI), (a2, A2, A2_HI), (a1, A1, A1_HI)):
        img[mask] = col
        img[query][mask[query]] = hi
    img[query, query] = QUERY
    top = Image.fromarray(img).resize((n * cell, n * cell), Image.NEAREST)
    # lower panel: the query's keys with the sequence folded into rows of `fold`
    rows = -(-n // fold)
    pc = max(4, min(24, 640 // fold))
    low = Image.new("RGB", (fold * pc + 1, rows * pc + 1), WHITE)
    d = ImageDraw.Draw(low)
    for pos in range(n):
        r, c = divmod(pos, fold)
        col = (A1_HI if a1[query, pos] else A2_HI if a2[query, pos] else OTHER_HI if other[query, pos] else
               (245, 245, 245))
        if pos == query:
            col = QUERY
        d.rectangle([c * pc, r * pc, (c + 1) * pc, (r + 1) * pc], fill=col, outline=GRID)
    width = max(top.width, low.width) + 20
    title_h = 34
    canvas = Image.new("RGB", (width, title_h + top.height + 16 + low.height + 10), WHITE)
    dc = ImageDraw.Draw(canvas)
    dc.text((10, 4), f"{layout.name}  head {head}  n={n}  density {layout.head(head).density():.3f}", fill=(0, 0, 0))
    dc.text((10, 18), f"query {query} highlighted; A1 dark, A2 light; lower panel: rows of {fold}", fill=(90, 90, 90))
    canvas.paste(top, (10, title_h))
    canvas.paste(low, (10, title_h + top.height + 16))
    canvas.save(path)
    return path


def tile_report(layout: Layout, block_sizes=(32, 64, 128)) -> str:
    """Density and the active / full tile counts per block size (natural order), as printed by the CLI."""
    from .layouts import EMPTY, FULL

    lines = [f"{layout!r}", f"density {layout.density():.4f} of the n x n matrix "
             f"({layout.density() / (0.5 * (layout.n + 1) / layout.n):.3f} of dense causal)"]
    for b in block_sizes:
        t = layout.blocks(b)
        nb = t.shape[1]
        causal = nb * (nb + 1) // 2
        act = int((t != EMPTY).sum()) / t.shape[0]
        full = int((t == FULL).sum()) / t.shape[0]
        lines.append(f"block {b:4d}: {act:9.1f} active tiles of {causal} causal ({act / causal:6.1%}), "
                     f"{full:9.1f} full")
    return "\n".join(lines)
