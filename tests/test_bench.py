"""The model and max-length benchmarks on CPU (their GPU numbers come from the device): rows, JSON, plot, the length
search and the command-line flags."""
import json
from pathlib import Path

import pytest
import torch

from sparse_transformer import bench, presets
from sparse_transformer.cli import build_parser

TINY = dict(n_ctx=256, n_layer=1, n_head=2, d_model=32, d_ff=64, pattern="strided", arrangement="interleaved",
            stride=32, pos_emb="stride")
MODEL_KEYS = {"preset", "n", "batch", "attention", "recompute", "step_ms", "tokens_per_s", "peak_mem_gb", "params",
              "device"}
MAX_LENGTH_KEYS = {"preset", "n", "params", "step_s", "peak_mem_gb", "device"}


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "tiny", TINY)
    return "tiny"


def test_bench_model_sweep_rows_json_and_plot(tiny_preset, tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.bench_model(tiny_preset, [64, 128], steps=1, recompute=(True,), out_dir=str(tmp_path),
                             dense_max_n=64, device="cpu")
    assert [(r["n"], r["attention"]) for r in rows] == [(64, "ours"), (64, "dense"), (128, "ours"), (128, "dense")]
    for r in rows[:3]:
        assert MODEL_KEYS <= set(r) and r["step_ms"] > 0 and r["params"] == rows[0]["params"]  # one model, every n
    assert "skipped" in rows[3]["error"]
    (json_path,) = tmp_path.glob("model-*.json")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(rows))
    (png,) = tmp_path.glob("model-*.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_model_config_lengths(tiny_preset):
    assert bench.model_config("tiny", 128).n_ctx == 256  # the same model at every n it fits
    assert bench.model_config("tiny", 128, exact=True).n_ctx == 128
    assert bench.model_config("tiny", 1024).n_ctx == 1024
    cfg = bench.model_config("fashion-mnist", 1568)  # an image preset past its raster: row / column embeddings
    assert (cfg.n_ctx, cfg.pos_emb) == (1568, "stride")
    assert bench.length_granularity(presets.load_preset("cifar10")) == 384  # lcm(stride 96, 128)


def fake_trains(limit, walls=None):
    calls = []

    def trains(n):
        calls.append(n)
        return dict(n=n, wall_s=(walls or {}).get(n, 1.0)) if n <= limit else None

    return trains, calls


@pytest.mark.parametrize("start,limit", [(1024, 5000), (1024, 1024), (8192, 3000), (1024, 1 << 20)])
def test_search_finds_the_largest_multiple(start, limit):
    trains, calls = fake_trains(limit)
    n, r, log, stop = bench.search_max_length(trains, start, 1 << 20, 1024)
    assert n == (limit // 1024) * 1024 and r["n"] == n
    assert all(m % 1024 == 0 for m in calls) and len(calls) == len(set(calls))
    assert [m for m, ok, _ in log] == calls
    assert ("reached --max" in stop) if limit >= 1 << 20 else ("out of memory at" in stop)


def test_search_tolerance_and_nothing_fits():
    trains, calls = fake_trains(700_000)
    n, _, _, _ = bench.search_max_length(trains, 1024, 1 << 24, 1024, tolerance=0.05)
    assert 0.95 * 700_000 <= n <= 700_000 and len(calls) < 20
    trains, _ = fake_trains(100)
    assert bench.search_max_length(trains, 4096, 1 << 20, 1024)[0] is None


def test_search_stops_at_the_time_budget():
    clock = iter(range(0, 10_000, 10)).__next__  # 10 s per clock reading
    trains, calls = fake_trains(1 << 30, walls={1024: 5.0, 2048: 15.0, 4096: 45.0, 8192: 130.0})
    n, _, _, stop = bench.search_max_length(trains, 1024, 1 << 30, 1024, budget_s=200, clock=clock)
    assert n < 1 << 30 and "time budget" in stop and calls[-1] == n


def test_bench_max_length_one_n(tiny_preset, tmp_path):
    row = bench.bench_max_length(tiny_preset, n=256, steps=1, dense_scale=True, out_dir=str(tmp_path), device="cpu")
    assert MAX_LENGTH_KEYS <= set(row) and row["n"] == 256 and row["step_s"] > 0
    assert row["dense_step_method"] == "one-layer attention x layers" and row["dense_step_s"] > 0
    (path,) = tmp_path.glob("max-length-*.json")
    assert json.loads(path.read_text())[0]["n"] == 256


def test_bench_flags():
    p = build_parser()
    a = p.parse_args(["bench", "model", "--preset", "audio-1m", "--n", "16384", "65536", "--recompute", "on"])
    assert (a.n, a.recompute, a.attention) == ([16384, 65536], "on", ["ours", "dense"])
    a = p.parse_args(["bench", "max-length", "--preset", "audio-1m", "--n", "1048576", "--dense-scale"])
    assert (a.n, a.dense_scale, a.start, a.max) == (1048576, True, None, 1 << 24)


def test_bench_decode_rows_on_cpu(tiny_preset, tmp_path):
    from sparse_transformer.bench_decode import bench_decode, bench_sampling

    rows = bench_decode(tiny_preset, [64, 256], [2], out_dir=str(tmp_path), device="cpu")
    assert [(r["attention"], r["context"]) for r in rows] == [("ours", 64), ("ours", 256), ("dense", 64),
                                                              ("dense", 256)]
    assert all(r["step_ms"] > 0 and r["mode"] == "eager" for r in rows)
    ours = {r["context"]: r["keys_per_query"] for r in rows if r["attention"] == "ours"}
    assert ours[256] < 2 * 32 + 1 and [r["keys_per_query"] for r in rows[2:]] == [64, 256]  # a strided row vs all
    assert len(list(tmp_path.glob("decode-*.json"))) == 1
    row = bench_sampling(tiny_preset, 2, out_dir=str(tmp_path), device="cpu")
    assert row["n"] == 256 and row["seconds"] > 0


def test_bench_decode_flags():
    args = build_parser().parse_args(["bench", "decode", "--contexts", "1024", "--batch", "1", "8"])
    assert (args.what, args.contexts, args.batch, args.images) == ("decode", [1024], [1, 8], 0)


def test_bench_model_compile_flag():
    args = build_parser().parse_args(["bench", "model", "--preset", "enwik8", "--compile"])
    assert args.compile is True


def test_attention_table_ratios_and_graph_columns():
    """The printed table: eager ratios against cuDNN and FlexAttention, and the CUDA-graph columns where a row has them
    (ours and SDPA), with the graph ratio taken against cuDNN's graph time."""
    base = dict(setup="s", n=8, batch=1, heads=1, head_dim=16, density=0.1)
    rows = [dict(base, method="triton", pattern="fixed", fwd_ms=0.5, fwdbwd_ms=1.0, fwd_graph_ms=0.4,
                 fwdbwd_graph_ms=0.8),
            dict(base, method="sdpa-cudnn", pattern="causal-dense", fwd_ms=1.0, fwdbwd_ms=3.0, fwd_graph_ms=1.0,
                 fwdbwd_graph_ms=2.4),
            dict(base, method="flex", pattern="fixed", fwd_ms=2.0, fwdbwd_ms=5.0),
            dict(base, method="torch", pattern="fixed", error="skipped: n > 16384")]
    lines = bench.format_table(rows).splitlines()
    row = {line.split()[1]: line.split() for line in lines[1:]}  # by method
    ours = row["triton"]
    # fwd, fwd+bwd, vs cuDNN, vs flex | graph fwd, graph fwd+bwd, graph vs cuDNN
    assert ours[-7:] == ["0.500", "1.000", "3.00x", "5.00x", "0.400", "0.800", "3.00x"]
    flex = row["flex"]
    assert flex[-4:] == ["2.000", "5.000", "0.60x", "1.00x"]  # no graph columns for FlexAttention
    assert "skipped:" in row["torch"]


def test_gluon_launches_reads_the_launch_count(monkeypatch):
    """bench attention marks a triton row `gluon` when Gluon kernels launched during it (none on the CPU)."""
    import types

    from sparse_transformer import bench
    from sparse_transformer.attention.triton import forward

    monkeypatch.setattr(forward, "_GLUON", [None])
    assert bench._gluon_launches() == 0
    monkeypatch.setattr(forward, "_GLUON", [types.SimpleNamespace(LAUNCHES=7)])
    assert bench._gluon_launches() == 7


def test_replay_counts_report_what_happened_since(monkeypatch):
    """bench rows count our attention's calls through graph replay and the replayed ones (replay.CALLS / REPLAYS)
    over their timings; a CPU model step takes the torch backend: no call."""
    pytest.importorskip("triton")
    from sparse_transformer.attention.triton import replay

    monkeypatch.setattr(replay, "CALLS", 10)
    monkeypatch.setattr(replay, "REPLAYS", 4)
    before = bench.replay_counts()
    assert before == dict(attention_calls=10, graph_replays=4)
    monkeypatch.setattr(replay, "CALLS", 16)
    monkeypatch.setattr(replay, "REPLAYS", 9)
    assert bench.replay_counts(before) == dict(graphs=replay.ENABLED, attention_calls=6, graph_replays=5)
    replay.run(("fwd", 0, 1.0), (torch.zeros(2),), None, lambda: None)  # a CPU call: counted, launched directly
    assert replay.CALLS == 17 and replay.REPLAYS == 9


def test_model_step_rows_count_replays(tiny_preset):
    pytest.importorskip("triton")
    row = bench.time_train_step(bench.model_config(tiny_preset, 64), 64, steps=2, device="cpu")
    assert row["attention_calls"] == 0 and row["graph_replays"] == 0 and "graphs" in row
    assert row["graph_replays_per_step"] == [0, 0]


def test_ab_rev_exports_a_revision_and_patches_a_side(tmp_path):
    """bench/ab_rev.py: a revision's package exported under another name imports beside ours and computes the same
    attention (torch backend, CPU); a side "MOD.ATTR=EXPR" sets the attribute while it runs and restores it."""
    import importlib.util
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], cwd=root,
                                                     capture_output=True).returncode != 0:
        pytest.skip("needs a git checkout")
    spec = importlib.util.spec_from_file_location("ab_rev", root / "bench" / "ab_rev.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    ab.export("HEAD", dest=str(tmp_path))
    assert (tmp_path / "REV").read_text().strip() == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    both = ab.sides(dest=str(tmp_path))
    assert [both[side][1].__module__.split(".")[0] for side in ("new", "old")] == ["sparse_transformer", ab.OLD_NAME]
    from sparse_transformer.bench import SETUPS

    make = SETUPS["strided-3k"][4]
    lay_new, lay_old = (ab._layout(both[side][0], make) for side in ("new", "old"))
    assert type(lay_old).__module__ == ab.OLD_NAME + ".layouts" and lay_old.n == lay_new.n == 3072
    q, k, v = (torch.randn(1, 2, 3072, 16) for _ in range(3))
    outs = [both[side][1](q, k, v, lay, backend="torch") for side, lay in (("new", lay_new), ("old", lay_old))]
    torch.testing.assert_close(outs[0], outs[1])
    from sparse_transformer.attention.triton import forward

    was = forward.FOLD_KINDS
    enter, leave = ab._patched("forward.FOLD_KINDS=FOLD_KINDS+('natural',)")
    enter()
    assert forward.FOLD_KINDS == was + ("natural",)
    leave()
    assert forward.FOLD_KINDS == was
    with pytest.raises(ValueError):
        ab._patched("fold")


def _floor_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("floor", Path(__file__).resolve().parents[1] / "bench" / "floor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_floor_probe_steps_move_the_counted_tensors():
    """bench/floor.py --probe runs, per direction and pass, the reads and writes that its computed floors count: 21
    tensors for one pass, two_pass_tensors' count (36 on the merged strided pattern) for two."""
    floor = _floor_module()
    assert floor.step_tensors(floor.protocol_passes(False)) == 21
    make = bench.SETUPS["strided-12k"][4]
    assert floor.step_tensors(floor.protocol_passes(True)) == floor.two_pass_tensors(make()) == 36
    assert floor.step_tensors([("move", "q k", "o"), ("add", "gq", "dq")]) == 3 + 3
    assert [s for s in floor.protocol_passes(True) if s[0] == "add"] == [("add", "gq", "dq"), ("add", "gk", "dk"),
                                                                         ("add", "gv", "dv")]


@pytest.mark.interpreter
def test_floor_mover_writes_the_sum_of_its_inputs():
    """The probe's byte mover (Triton's interpreter): every output holds the sum of the inputs, for 1 to 7 inputs and
    1 to 3 outputs, numel not a multiple of its block; in place (an input that is also an output) too."""
    pytest.importorskip("triton")
    move = _floor_module()._mover()
    for ni, no in ((1, 1), (3, 1), (5, 3), (7, 3), (4, 1)):
        ins = [torch.randn(1000) for _ in range(ni)]
        want = sum(x.clone() for x in ins)
        outs = [torch.empty(1000) for _ in range(no)]
        if (ni, no) == (4, 1):
            outs = [ins[-1]]  # the second pass's o: read and written
        move(ins, outs, block=256)
        for o in outs:
            torch.testing.assert_close(o, want)
    with pytest.raises(ValueError, match="contiguous"):
        move([torch.randn(10, 4).t()], [torch.empty(4, 10)])
    with pytest.raises(ValueError, match="1-7 inputs"):
        move([torch.randn(4)] * 8, [torch.empty(4)])
