"""Tests for sparse_transformer/presets.py: the paper's parameter counts, every preset valid, JSON/TOML round trips and
the strict loader."""
import dataclasses

import pytest
import torch

from sparse_transformer.model import SparseTransformer, SparseTransformerConfig
from sparse_transformer.presets import (PAPER_PARAMS, PRESETS, config_from_dict, config_from_json, config_from_toml,
                                        config_to_json, config_to_toml, load_config, load_preset, save_config)


def meta_model(cfg):
    with torch.device("meta"):
        return SparseTransformer(cfg)


@pytest.mark.parametrize("name", ["cifar10", "enwik8", "imagenet64"])
def test_paper_parameter_counts(name):
    params = meta_model(load_preset(name)).num_params()
    assert abs(params / PAPER_PARAMS[name] - 1) <= 0.02, f"{name}: {params / 1e6:.2f}M vs paper {PAPER_PARAMS[name]:.3g}"


@pytest.mark.parametrize("name", ["audio-65k", "audio-262k", "audio-1m"])
def test_audio_parameter_counts_near_paper(name):
    """The audio shapes are not stated in the paper; ours are chosen to land near its counts."""
    params = meta_model(load_preset(name)).num_params()
    assert abs(params / PAPER_PARAMS[name] - 1) <= 0.05, f"{name}: {params / 1e6:.2f}M"


def test_paper_settings():
    c = load_preset("cifar10")
    assert (c.n_layer, c.n_head, c.d_model, c.d_ff, c.qk_ratio, c.dropout, c.pattern, c.n_ctx) == \
        (128, 2, 256, 512, 0.5, 0.25, "strided", 3072)
    e = load_preset("enwik8")
    assert (e.n_layer, e.n_head, e.d_model, e.stride, e.summary, e.arrangement, e.dropout, e.n_ctx) == \
        (30, 8, 512, 128, 32, "merged", 0.40, 12288)
    i = load_preset("imagenet64")
    assert (i.n_layer, i.n_head, i.d_model, i.stride, i.dropout, i.image_shape) == (48, 16, 512, 128, 0.01, (64, 64, 3))
    assert [load_preset(f"audio-{k}").n_ctx for k in ("65k", "262k", "1m")] == [65536, 262144, 1048576]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_summarizes(name):
    cfg = load_preset(name)
    assert isinstance(cfg, SparseTransformerConfig)
    line = meta_model(cfg).summary()
    assert f"{cfg.n_layer} layers" in line and "density" in line


def test_demo_runs_on_cpu():
    model = SparseTransformer(load_preset("demo", backend="torch"))
    bits = model.loss(torch.randint(0, 256, (2, model.cfg.n_ctx), dtype=torch.uint8))
    assert bits.item() == pytest.approx(8.0, abs=1e-4)  # zero W_out: uniform over 256 bytes


def test_load_preset_returns_fresh_copies_and_overrides():
    a = load_preset("enwik8")
    a.dropout = 0.0
    assert load_preset("enwik8").dropout == 0.40
    assert load_preset("enwik8", backend="dense").backend == "dense"
    with pytest.raises(ValueError, match="unknown preset 'enwik9'"):
        load_preset("enwik9")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_preset("demo", n_layers=3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_and_toml_round_trip(name, tmp_path):
    cfg = load_preset(name)
    assert config_from_json(config_to_json(cfg)) == cfg
    assert config_from_toml(config_to_toml(cfg)) == cfg
    for suffix in (".json", ".toml"):
        path = tmp_path / f"{name}{suffix}"
        save_config(cfg, path)
        assert load_config(path) == cfg
    assert load_config(name) == cfg


def test_run_file_tables():
    """A run file's [data] and [train] tables are someone else's; [model] is ours."""
    text = config_to_toml(load_preset("demo")) + "\n[train]\nlr = 3e-4\n"
    assert config_from_toml(text) == load_preset("demo")
    with pytest.raises(ValueError, match="optim"):
        config_from_toml(text + "\n[optim]\nbeta = 0.9\n")
    with pytest.raises(ValueError, match=r"\[model\]"):
        config_from_toml("[train]\nlr = 1.0\n")


@pytest.mark.parametrize("values,match", [
    (dict(n_layers=4), "unknown config keys \\['n_layers'\\]"),
    (dict(n_layer="4"), "n_layer='4' has type str; expected int"),
    (dict(n_layer=4.0), "n_layer=4.0 has type float; expected int"),
    (dict(recompute=1), "recompute=1 has type int; expected bool"),
    (dict(n_head=True), "n_head=True has type bool; expected int"),
    (dict(dropout="0.1"), "dropout='0.1' has type str"),
    (dict(image_shape=[32, 32]), "image_shape"),
    (dict(pattern=3), "pattern=3 has type int; expected str"),
], ids=["unknown-key", "str-for-int", "float-for-int", "int-for-bool", "bool-for-int", "str-for-float",
        "short-tuple", "int-for-str"])
def test_strict_loader_rejects(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(values)


def test_strict_loader_accepts_int_for_float_and_list_for_tuple():
    cfg = config_from_dict(dict(dropout=0, pos_emb="image", n_ctx=48, image_shape=[4, 4, 3], stride=12))
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float) and cfg.image_shape == (4, 4, 3)


def test_toml_rejects_unknown_key_and_bad_value(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(config_to_toml(load_preset("demo")).replace("n_layer = 2", "n_layer = 2\nn_layers = 3"))
    with pytest.raises(ValueError, match="n_layers"):
        load_config(path)
    path.write_text(config_to_toml(load_preset("demo")).replace("n_head = 2", "n_head = 3"))
    with pytest.raises(ValueError, match="n_head=3"):
        load_config(path)


def test_every_field_has_a_default():
    for f in dataclasses.fields(SparseTransformerConfig):
        assert f.default is not dataclasses.MISSING, f.name
