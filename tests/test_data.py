"""Dataset loaders on small files made here; the real download code against a local HTTP server and file:// URLs."""
import functools
import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import wave
import zipfile

import numpy as np
import pytest

from sparse_transformer.data import ByteDataset, DataError, get_dataset, split_stream
from sparse_transformer.data.audio import load_audio_dir, mu_law_decode, mu_law_encode, resample
from sparse_transformer.data.download import download
from sparse_transformer.data.images import load_cifar10, load_fashion_mnist, load_imagenet64
from sparse_transformer.data.text import load_enwik8


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server in a thread, serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _sha256(b):
    return hashlib.sha256(b).hexdigest()


# ---- streams and batches -------------------------------------------------------------------------------------------
def test_bytes_split_batches_and_windows(tmp_path):
    path = tmp_path / "corpus.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes())
    ds = get_dataset(f"bytes:{path}")
    assert [ds.num_tokens(s) for s in ("train", "valid", "test")] == [9000, 500, 500]
    raw = path.read_bytes()
    assert ds.split("val").tobytes() == raw[9000:9500]
    a, b = ds.batch("train", 7, 4, 32, seed=1), ds.batch("train", 7, 4, 32, seed=1)
    assert a.shape == (4, 32) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, ds.batch("train", 8, 4, 32, seed=1))
    assert not np.array_equal(a, ds.batch("train", 7, 4, 32, seed=2))
    for min_context in (0, 20, 63):
        seen = np.zeros(500, dtype=int)
        windows = list(ds.eval_windows("test", 64, min_context))
        assert len(windows) == ds.num_eval_windows("test", 64, min_context)
        end = 0
        for window, score_from in windows:
            start = raw.find(window.tobytes(), 9500) - 9500
            seen[start + score_from:start + 64] += 1
            assert score_from == 0 or score_from >= min_context
            end = max(end, start + 64)
        assert (seen == 1).all() and end == 500  # every test byte scored exactly once


def test_split_stream_fractions():
    parts = split_stream(np.zeros(1000, np.uint8))
    assert [parts[k].size for k in ("train", "valid", "test")] == [900, 50, 50]


def test_image_batches_are_epochs_of_permutations():
    ds = ByteDataset("img", {"train": np.repeat(np.arange(10, dtype=np.uint8)[:, None], 12, axis=1)}, example_len=12)
    first_epoch = np.concatenate([ds.batch("train", s, 5, 12, seed=3)[:, 0] for s in range(2)])
    assert sorted(first_epoch) == list(range(10))
    assert np.array_equal(ds.batch("train", 1, 5, 8, seed=3), ds.batch("train", 1, 5, 12, seed=3)[:, :8])


def test_unknown_spec_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown data spec"):
        get_dataset("mnist-text")
    with pytest.raises(DataError, match="no such file"):
        get_dataset(f"bytes:{tmp_path / 'absent'}")


# ---- downloads -------------------------------------------------------------------------------------------------------
def test_download_http_checksum_pass_and_fail(http_root, tmp_path):
    www, base = http_root
    payload = b"sparse transformer " * 1000
    (www / "f.bin").write_bytes(payload)
    dest = tmp_path / "cache" / "f.bin"
    download(f"{base}/f.bin", dest, size=len(payload), sha256=_sha256(payload), progress=False)
    assert dest.read_bytes() == payload
    bad = tmp_path / "cache" / "g.bin"
    with pytest.raises(DataError, match="sha256"):
        download(f"{base}/f.bin", bad, sha256="0" * 64, progress=False)
    assert list(bad.parent.iterdir()) == [dest]  # no partial or unverified file left behind
    with pytest.raises(DataError, match="could not download"):
        download(f"{base}/absent.bin", tmp_path / "x.bin", progress=False)
    dest.write_bytes(payload[:-1])  # a truncated copy already in place is refused, not used
    with pytest.raises(DataError, match="truncated"):
        download(f"{base}/f.bin", dest, size=len(payload), progress=False)


def _tiny_enwik8(www):
    text = (b"<page><title>Sparse</title><text>attention " * 400)[:10_000]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", text)
    (www / "enwik8.zip").write_bytes(buf.getvalue())
    return text, buf.getvalue()


def test_enwik8_download_extract_split(http_root, tmp_path):
    www, base = http_root
    text, archive = _tiny_enwik8(www)
    kw = dict(url=f"{base}/enwik8.zip", zip_size=len(archive), zip_sha256=_sha256(archive), size=len(text),
              md5=hashlib.md5(text).hexdigest(), split=(9000, 500, 500))
    ds = load_enwik8(tmp_path / "enwik8", **kw)
    assert ds.split("train").tobytes() == text[:9000] and ds.split("test").tobytes() == text[9500:]
    ds = load_enwik8(tmp_path / "enwik8", download=False, **kw)  # second time: from the verified local copy
    assert ds.num_tokens("valid") == 500
    raw = tmp_path / "enwik8" / "enwik8"
    raw.write_bytes(b"X" + text[1:])  # same size, corrupted content
    with pytest.raises(DataError, match="md5"):
        load_enwik8(tmp_path / "enwik8", **kw)
    with pytest.raises(DataError, match="sha256"):
        load_enwik8(tmp_path / "other", **{**kw, "zip_sha256": "f" * 64})
    assert not (tmp_path / "other" / "enwik8.zip").exists()
    with pytest.raises(DataError, match="Download"):
        load_enwik8(tmp_path / "none", download=False, **kw)


# ---- images ----------------------------------------------------------------------------------------------------------
def _planar_images(n, side, seed):
    hwc = np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return hwc, hwc.transpose(0, 3, 1, 2).reshape(n, -1)  # (HWC truth, channel-planar as the official files)


def test_cifar10_file_url_md5_and_hwc_order(tmp_path):
    truths, buf = [], io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            hwc, planar = _planar_images(3, 32, i)
            truths.append(hwc)
            blob = pickle.dumps({b"data": planar, b"labels": [0, 1, 2]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive = tmp_path / "served.tar.gz"
    archive.write_bytes(buf.getvalue())
    md5 = hashlib.md5(buf.getvalue()).hexdigest()
    ds = load_cifar10(tmp_path / "cifar10", url=archive.as_uri(), md5=md5, size=None, num_valid=2)
    train = np.concatenate(truths[:5]).reshape(15, -1)
    assert ds.example_len == 3072 and ds.shape == (32, 32, 3)
    assert np.array_equal(ds.split("train"), train[:13]) and np.array_equal(ds.split("valid"), train[13:])
    assert np.array_equal(ds.split("test"), truths[5].reshape(3, -1))
    assert ds.split("test")[0, :3].tolist() == truths[5][0, 0, 0].tolist()  # R, G, B of pixel (0, 0) first
    with pytest.raises(DataError, match="md5"):
        load_cifar10(tmp_path / "bad", url=archive.as_uri(), md5="0" * 32, size=None)


def test_imagenet64_npz_and_truncation(tmp_path):
    src = tmp_path / "imagenet"
    src.mkdir()
    hwc = {}
    for name, seed in (("train_data_batch_1", 0), ("train_data_batch_2", 1), ("val_data", 2)):
        hwc[name], planar = _planar_images(4, 64, seed)
        np.savez(src / f"{name}.npz", data=planar, labels=np.arange(4))
    ds = load_imagenet64(src, tmp_path / "cache", num_valid=2, expected_counts=(8, 4))
    all_train = np.concatenate([hwc["train_data_batch_1"], hwc["train_data_batch_2"]]).reshape(8, -1)
    assert np.array_equal(ds.split("train"), all_train[:6]) and np.array_equal(ds.split("valid"), all_train[6:])
    assert np.array_equal(ds.split("test"), hwc["val_data"].reshape(4, -1))
    with pytest.raises(DataError, match="expected"):
        load_imagenet64(src, tmp_path / "cache2", expected_counts=(1_281_167, 50_000))
    blob = (src / "val_data.npz").read_bytes()
    (src / "val_data.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="val_data.npz"):
        load_imagenet64(src, tmp_path / "cache3", expected_counts=None)
    with pytest.raises(DataError, match="image-net.org"):
        load_imagenet64(tmp_path / "empty", tmp_path / "cache4")


def _idx(images):
    n, r, c = images.shape
    return (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, r, c)) + images.tobytes()


def test_fashion_mnist_idx_raw_gz_and_corruption(tmp_path):
    train = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(train)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(test))
    ds = load_fashion_mnist(tmp_path, num_valid=2, expected_counts=(12, 5))
    assert ds.example_len == 784 and np.array_equal(ds.split("valid"), train[10:].reshape(2, -1))
    assert np.array_equal(ds.split("test"), test.reshape(5, -1))
    with pytest.raises(DataError, match="expected"):
        load_fashion_mnist(tmp_path)  # the real counts are 60,000 / 10,000
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(test)[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path, num_valid=2, expected_counts=None)
    with pytest.raises(DataError, match="apt install dataset-fashion-mnist"):
        get_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


# ---- audio -----------------------------------------------------------------------------------------------------------
def _write_wav(path, samples, rate, channels=2, width=2):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        w.writeframes(np.repeat(pcm[:, None], channels, axis=1).tobytes())


def test_audio_dir_mono_12k_mu_law(tmp_path):
    t = np.arange(24_000) / 24_000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    (tmp_path / "music").mkdir()
    _write_wav(tmp_path / "music" / "a.wav", tone, 24_000)
    _write_wav(tmp_path / "music" / "b.wav", tone[:12_000], 24_000)
    ds = load_audio_dir(tmp_path / "music", tmp_path / "cache")
    total = sum(ds.num_tokens(s) for s in ("train", "valid", "test"))
    assert total == 12_000 + 6_000  # 1.5 s at 12 kHz
    decoded = mu_law_decode(np.asarray(ds.split("train")[200:1000]))
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(200, 1000) / 12_000)
    assert np.abs(decoded - expected).max() < 0.02  # mu-law step near 0.5 is ~0.01
    again = load_audio_dir(tmp_path / "music", tmp_path / "cache")  # from the cache
    assert np.array_equal(again.split("test"), ds.split("test"))
    blob = (tmp_path / "music" / "b.wav").read_bytes()
    (tmp_path / "music" / "b.wav").write_bytes(blob[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_audio_dir(tmp_path / "music", tmp_path / "cache")


def test_mu_law_and_resample_basics():
    codes = mu_law_encode(np.array([-1.0, 0.0, 1.0]))
    assert codes.tolist() == [0, 128, 255]
    x = np.sin(2 * np.pi * 100 * np.arange(4800) / 48_000)
    y = resample(x, 48_000, 12_000)
    assert y.size == 1200
    assert np.abs(y[50:-50] - np.sin(2 * np.pi * 100 * np.arange(50, 1150) / 12_000)).max() < 1e-3
