"""The command line and the layout pictures."""
import numpy as np
import pytest
from PIL import Image

from sparse_transformer import layouts
from sparse_transformer.cli import main
from sparse_transformer.pictures import A1, A2, QUERY, draw_layout, part_masks


def test_layout_command_prints_tiles_and_writes_png(tmp_path, capsys):
    png = tmp_path / "fixed.png"
    assert main(["layout", "fixed", "--n", "256", "--stride", "16", "--summary", "4", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "density 0.1504" in out and "block   32:" in out and "block  128:" in out
    assert Image.open(png).size[0] > 256


def test_layout_command_reports_bad_values(capsys):
    assert main(["layout", "fixed", "--n", "64", "--stride", "8", "--summary", "9"]) == 2
    assert "summary=9 must be <= stride=8" in capsys.readouterr().err


def test_model_command(capsys):
    assert main(["model", "enwik8"]) == 0
    assert "30 layers" in capsys.readouterr().out


def test_bench_needs_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["bench", "attention", "--setups", "strided-3k"]) == 2


def test_parts_split_the_mask():
    lay = layouts.strided(64, 8)
    a1, a2, other = part_masks(lay)
    assert torch_equal(a1 | a2, lay.element_mask()) and not (a1 & a2).any() and not other.any()
    assert a2[63].nonzero().flatten().tolist() == [7, 15, 23, 31, 39, 47, 55]  # the column above, diagonal in A1


def test_picture_colours(tmp_path):
    lay = layouts.fixed(32, 8, 2)
    path = draw_layout(lay, str(tmp_path / "f.png"), query=20, cell=4)
    img = np.asarray(Image.open(path).convert("RGB"))
    top = 34  # title height, matrix starts at (10, 34)

    def px(i, j):
        return tuple(img[top + i * 4 + 1, 10 + j * 4 + 1])

    assert px(20, 20) == QUERY
    assert px(10, 9) == A1  # same block of 8
    assert px(10, 6) == A2  # summary column 6 (the last 2 of block 0)
    assert px(10, 2) == (255, 255, 255)  # nothing


def torch_equal(a, b):
    return bool((a == b).all())
