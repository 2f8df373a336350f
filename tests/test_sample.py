"""Sampling: the PNG / WAV / text writers on known arrays, generate_long past n_ctx, and `sparse-transformer sample`
end to end on tiny trained text and image runs (image completions included)."""
import argparse
import gzip
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from sparse_transformer import SparseTransformer, train
from sparse_transformer.cli import main
from sparse_transformer.data.audio import SAMPLE_RATE, encode_file, mu_law_encode, read_wav
from sparse_transformer.model import SparseTransformerConfig
from sparse_transformer.outputs import (BOUNDARY, GAP, GAP_COLOUR, MISSING, format_text, separator,
                                        write_completion_grid, write_image_grid, write_text, write_wav)
from sparse_transformer.sample import generate_long, given_bytes, output_paths

TINY = ["n_layer=1", "n_head=2", "d_model=32", "d_ff=64", "train.batch_size=2", "train.eval_batches=1",
        "train.warmup_steps=1", "train.log_every=1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for these tiny models: with two, OpenMP's spinning made each small op ~50x slower while
    another process shared the 2-core test machine (this file: 4 s alone, 170 s beside a parallel test run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- writers ---------------------------------------------------------------------------------------------------------
def _pixel(img, row, col, y, x, h, w, scale):
    """Canvas pixel of image pixel (y, x) in grid cell (row, col)."""
    return tuple(img[GAP + row * (h * scale + GAP) + y * scale, GAP + col * (w * scale + GAP) + x * scale])


def test_image_grid_size_and_pixels(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, (5, 4 * 3 * 1))  # 5 greyscale 4x3 images
    img = np.asarray(Image.open(write_image_grid(tokens, (4, 3, 1), tmp_path / "g.png", scale=2)))
    assert img.shape == (2 * (4 * 2 + GAP) + GAP, 3 * (3 * 2 + GAP) + GAP, 3)  # 2 rows x 3 columns
    assert _pixel(img, 1, 0, 2, 1, 4, 3, 2) == (tokens[3, 2 * 3 + 1],) * 3  # image 3 is row 1, column 0
    assert _pixel(img, 0, 2, 3, 2, 4, 3, 2) == (tokens[2, 11],) * 3
    assert _pixel(img, 1, 2, 0, 0, 4, 3, 2) == GAP_COLOUR  # no sixth image
    assert tuple(img[0, 0]) == GAP_COLOUR and tuple(img[GAP + 4 * 2, 5]) == GAP_COLOUR  # border, gap below row 0
    rgb = np.arange(2 * 2 * 3)[None]  # one 2x2 RGB image
    img = np.asarray(Image.open(write_image_grid(rgb, (2, 2, 3), tmp_path / "c.png")))  # default scale 64
    assert img.shape == (2 * 64 + 2 * GAP, 2 * 64 + 2 * GAP, 3) and tuple(img[GAP + 64, GAP + 64]) == (9, 10, 11)


def test_completion_grid_rows_and_boundary(tmp_path):
    h, w, c, scale = 4, 2, 3, 4
    rng = np.random.default_rng(1)
    originals = rng.integers(0, 256, (2, h * w * c))
    completions = rng.integers(0, 256, (2, 3, h * w * c))
    img = np.asarray(Image.open(write_completion_grid(originals, completions, 2 * w * c, (h, w, c), tmp_path / "c.png",
                                                      scale=scale)))
    assert img.shape == (5 * (h * scale + GAP) + GAP, 2 * (w * scale + GAP) + GAP, 3)  # given, 3 completions, original
    image = lambda tokens: tokens.reshape(h, w, c)  # noqa: E731
    for col in range(2):
        assert _pixel(img, 0, col, 1, 1, h, w, scale) == tuple(image(originals[col])[1, 1])  # given top half
        assert _pixel(img, 0, col, 3, 0, h, w, scale) == MISSING  # missing bottom half
        for k in range(3):
            assert _pixel(img, 1 + k, col, 3, 1, h, w, scale) == tuple(image(completions[col, k])[3, 1])
        assert _pixel(img, 4, col, 3, 1, h, w, scale) == tuple(image(originals[col])[3, 1])  # the original
        for row in range(5):  # a red line on the first row not given, inside the cells only
            y = GAP + row * (h * scale + GAP) + 2 * scale
            x = GAP + col * (w * scale + GAP)
            assert tuple(img[y, x]) == tuple(img[y, x + w * scale - 1]) == BOUNDARY
            assert tuple(img[y, x - 1]) == GAP_COLOUR and tuple(img[y + 1, x]) != BOUNDARY
    with pytest.raises(ValueError, match="whole number of rows"):
        write_completion_grid(originals, completions, 5, (h, w, c), tmp_path / "bad.png")


def test_given_half_is_whole_rows():
    assert given_bytes((28, 28, 1)) == 14 * 28 and given_bytes((7, 4, 3)) == 3 * 12 and given_bytes((1, 8, 1)) == 0


def test_wav_rate_length_and_codes(tmp_path):
    codes = np.concatenate([np.arange(256), np.arange(255, -1, -1)] * 3).astype(np.uint8)
    path = write_wav(codes, tmp_path / "a.wav")
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, SAMPLE_RATE,
                                                                                          codes.size)
    samples, rate = read_wav(path)
    assert rate == SAMPLE_RATE and np.array_equal(mu_law_encode(samples), codes)  # 16-bit PCM keeps every level
    assert samples.max() > 0.99 and samples.min() < -0.99


def test_text_round_trip_and_invalid_bytes(tmp_path):
    samples = ["héllo\nwörld ✓".encode(), b"bad \xff\xfe then \xc3", b""]
    path = write_text(samples, tmp_path / "s.txt")
    text = path.read_bytes().decode("utf-8")  # strict: the file is valid UTF-8
    assert text == format_text(samples)
    parts = text.split("\n")
    assert parts[0] == separator(0, 3) and "\n".join(parts[1:3]) == "héllo\nwörld ✓"
    assert parts[4] == separator(1, 3) and parts[5] == "bad \\xff\\xfe then \\xc3"
    assert parts[7] == separator(2, 3) and parts[8] == ""


def test_output_paths(tmp_path):
    assert output_paths(tmp_path / "a" / "x.png", "image", "samples") == [tmp_path / "a" / "x.png"]
    assert (tmp_path / "a").is_dir()
    assert output_paths(tmp_path / "d", "text", "samples") == [tmp_path / "d" / "samples.txt"]
    assert output_paths(tmp_path / "c.wav", "audio", "samples", 2) == [tmp_path / "c-0.wav", tmp_path / "c-1.wav"]
    with pytest.raises(ValueError, match="writes .txt"):
        output_paths(tmp_path / "x.png", "text", "samples")


# ---- generate_long -----------------------------------------------------------------------------------------------
def _random_model(n_ctx=16):
    cfg = SparseTransformerConfig(n_ctx=n_ctx, n_layer=2, n_head=2, d_model=32, d_ff=64, stride=4, summary=1,
                                  backend="torch")
    model = SparseTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialized head would make every byte equally likely
            p.normal_(0.0, 0.3)
    return model


def test_generate_long_slides_past_n_ctx():
    model = _random_model()
    prefix = torch.randint(0, 256, (2, 5))
    out = generate_long(model, prefix, 30, temperature=0)
    assert out.shape == (2, 35) and torch.equal(out[:, :5], prefix)
    with torch.no_grad():  # greedy, by hand: byte s from the slot after the n_ctx - 1 bytes before it
        for s in range(5, 35):
            window = torch.cat([out[:, max(0, s - 15):s], torch.zeros(2, 1, dtype=torch.long)], dim=1)
            assert torch.equal(model(window)[:, -1].argmax(-1), out[:, s]), s
    a = generate_long(model, prefix, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, generate_long(model, prefix, 20, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="shorter than the model's context"):
        generate_long(model, torch.zeros(1, 16, dtype=torch.long), 1)


# ---- the command, end to end ---------------------------------------------------------------------------------------
def _train(out, preset, data, sets):
    args = argparse.Namespace(preset=preset, out=str(out), data=data, max_steps=2, device="cpu", ckpt_every=None,
                              set=TINY + sets)
    assert train.main(args) == 0
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    corpus = root / "corpus.txt"
    corpus.write_bytes(b"def f(x):\n    return x + 1\n" * 400)
    return _train(root / "run", "demo", f"bytes:{corpus}", ["n_ctx=64", "stride=8", "summary=2"])


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A stand-in Fashion-MNIST folder with the real counts: blank training images, patterned test images."""
    root = tmp_path_factory.mktemp("fashion")
    header = lambda n: b"".join(v.to_bytes(4, "big") for v in (0x803, n, 28, 28))  # noqa: E731
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(header(60_000) + bytes(60_000 * 784))
    test = np.random.default_rng(0).integers(0, 256, (10_000, 784), dtype=np.uint8)
    (root / "t10k-images-idx3-ubyte").write_bytes(header(10_000) + test.tobytes())
    return root, test


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, fashion):
    return _train(tmp_path_factory.mktemp("image") / "run", "fashion-mnist", f"fashion-mnist:{fashion[0]}", [])


def test_sample_text_with_prompt(text_run, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"def ")
    assert main(["sample", "--checkpoint", str(text_run), "--num", "3", "--prefix", str(prompt), "--length", "80",
                 "--top-k", "20", "--out", str(tmp_path / "out")]) == 0  # 4 + 80 > n_ctx = 64: the context slides
    out = capsys.readouterr().out
    assert "samples/s" in out and "ms per position" in out and str(tmp_path / "out" / "samples.txt") in out
    text = (tmp_path / "out" / "samples.txt").read_text(encoding="utf-8")
    assert text.startswith(separator(0, 3)) and separator(2, 3) in text and text.count("\ndef ") == 3


def test_sample_text_is_reproducible_and_cache_free_path_runs(text_run, tmp_path):
    for name, extra in (("a.txt", []), ("b.txt", []), ("c.txt", ["--no-cache"])):
        assert main(["sample", "--checkpoint", str(text_run), "--num", "2", "--seed", "5", "--out",
                     str(tmp_path / name)] + extra) == 0
    a, b = (tmp_path / "a.txt").read_bytes(), (tmp_path / "b.txt").read_bytes()
    assert a == b and len(a) >= 2 * 64
    assert (tmp_path / "c.txt").stat().st_size > 2 * 40
    for name, extra in (("greedy-cache.txt", ["--batch-size", "1"]), ("greedy-full.txt", ["--no-cache"]),
                        ("greedy-compiled.txt", ["--compile"])):
        assert main(["sample", "--checkpoint", str(text_run), "--num", "2", "--temperature", "0", "--out",
                     str(tmp_path / name)] + extra) == 0
    full = (tmp_path / "greedy-full.txt").read_bytes()
    assert (tmp_path / "greedy-cache.txt").read_bytes() == full == (tmp_path / "greedy-compiled.txt").read_bytes()


@pytest.mark.parametrize("argv, message", [
    (["--complete", "2"], "needs an image model"),
    (["--prefix", "PROMPT"], "shorter than the model's context"),
    (["--out", "x.png"], "writes .txt"),
    (["--temperature", "-1"], "temperature"),
    (["--num", "0"], "--num=0"),
    (["--batch-size", "0"], "--batch-size=0"),
], ids=["complete-on-text", "prefix-too-long", "wrong-suffix", "temperature", "num", "batch-size"])
def test_sample_text_errors(text_run, tmp_path, capsys, argv, message):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_bytes(b"x" * 64)
    argv = [str(long_prompt) if a == "PROMPT" else str(tmp_path / a) if a.endswith(".png") else a for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
    assert main(["sample", "--checkpoint", str(text_run), *out, *argv]) == 2
    assert message in capsys.readouterr().err


def test_sample_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such run" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


def _tone(path, seconds, rate=SAMPLE_RATE):
    pcm = (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def test_sample_audio_clips_with_wav_prompt(tmp_path, capsys):
    (tmp_path / "music").mkdir()
    _tone(tmp_path / "music" / "a.wav", 1.0)
    run = _train(tmp_path / "run", "demo", f"audio:{tmp_path / 'music'}",
                 ["n_ctx=64", "stride=8", "summary=2", f"train.data_root={tmp_path / 'cache'}"])
    prompt = _tone(tmp_path / "prompt.wav", 20 / SAMPLE_RATE)  # 20 samples
    assert main(["sample", "--checkpoint", str(run), "--num", "2", "--prefix", str(prompt), "--length", "50",
                 "--out", str(tmp_path / "clip.wav")]) == 0
    assert "clip-0.wav" in capsys.readouterr().out
    for i in range(2):
        with wave.open(str(tmp_path / f"clip-{i}.wav")) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, SAMPLE_RATE, 70)
        samples, _ = read_wav(tmp_path / f"clip-{i}.wav")
        assert np.array_equal(mu_law_encode(samples[:20]), encode_file(prompt))  # the clip starts with the prompt


def test_sample_images_grid(image_run, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(image_run), "--num", "3", "--out", str(tmp_path)]) == 0
    img = Image.open(tmp_path / "samples.png")
    assert img.mode == "RGB" and img.size == (2 * (112 + GAP) + GAP,) * 2  # 2 x 2 cells of 28 x 4 px
    assert main(["sample", "--checkpoint", str(image_run), "--length", "5", "--out", str(tmp_path)]) == 2
    assert "--length is for text and audio" in capsys.readouterr().err


def test_sample_image_completions(image_run, fashion, tmp_path):
    out = tmp_path / "done.png"
    assert main(["sample", "--checkpoint", str(image_run), "--complete", "2", "--num", "2", "--out", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (4 * (112 + GAP) + GAP, 2 * (112 + GAP) + GAP, 3)  # given, 2 completions, original
    test = fashion[1].reshape(-1, 28, 28)
    for col in range(2):
        assert _pixel(img, 0, col, 3, 5, 28, 28, 4) == (test[col, 3, 5],) * 3  # given: the test image's top half
        assert _pixel(img, 0, col, 20, 5, 28, 28, 4) == MISSING
        assert _pixel(img, 3, col, 20, 5, 28, 28, 4) == (test[col, 20, 5],) * 3  # original
        for row in (1, 2):  # completions keep the given half, and the line marks row 14
            assert _pixel(img, row, col, 13, 9, 28, 28, 4) == (test[col, 13, 9],) * 3
            assert tuple(img[GAP + row * (112 + GAP) + 14 * 4, GAP + col * (112 + GAP) + 50]) == BOUNDARY
