"""The offline demo: training script, bundled checkpoints, and `vtome demo --quick`."""

from __future__ import annotations

import json

import pytest
import torch

import vtome
from vtome.cli import main
from vtome.demo import checkpoints
from vtome.demo.train import evaluate, train
from vtome.zoo import builtin_names, load_model


@pytest.mark.parametrize("family", ["joint", "divided"])
def test_training_script_runs_end_to_end_on_a_tiny_config(family, tmp_path):
    tiny = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "image_size": 32}
    record = train(family, tmp_path, steps=2, batch_size=4, eval_clips=15, log_every=0, overrides=tiny)
    assert record["steps"] == 2 and 0.0 <= record["test"]["acc"] <= 1.0
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["test"] == record["test"]
    model = load_model(str(tmp_path), attn=None)
    assert model.config.num_hidden_layers == 1 and model.config.num_labels == 15


@pytest.mark.parametrize("family", ["joint", "divided"])
def test_bundled_checkpoints_load_and_reach_their_recorded_accuracy(family):
    record = checkpoints.training_record(family)
    assert record["test"]["acc_appearance"] >= 0.9 and record["test"]["acc_temporal"] >= 0.9
    model = load_model(checkpoints.FAMILIES[family])
    assert model.config.num_labels == 15
    # the first 75 held-out clips (5 per class); the record covers more, so allow sampling slack
    got = evaluate(model, record["data_seed"], "test", 75)
    assert got["acc"] >= record["test"]["acc"] - 0.1


def test_divided_model_starts_with_temporal_heads_on_the_neighbouring_frames():
    model = checkpoints.build("divided")
    layer, heads = model.timesformer.encoder.layer[0], model.config.num_attention_heads
    tokens = model.timesformer.embeddings(torch.rand(1, 8, 3, 96, 96) * 2 - 1)[:, 1:]  # patch-major, time-minor
    per_patch = layer.temporal_layernorm(tokens.reshape(36, 8, -1))
    attn = layer.temporal_attention.attention
    q, k, _ = attn.qkv(per_patch).reshape(36, 8, 3, heads, -1).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # [patches, heads, T, T]
    t = torch.arange(1, 8)
    assert (probs[:, 0, t, t - 1] > 0.9).all()  # head 0 looks one frame back
    assert (probs[:, 1, t - 1, t] > 0.9).all()  # head 1 looks one frame ahead
    assert probs[:, 2:].max() < 0.9  # the other heads start unbiased


def test_demo_models_are_builtin_names():
    names = builtin_names()
    assert "demo-joint" in names and "demo-divided" in names


def test_demo_quick_runs(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--json", str(out), "--out", str(tmp_path / "viz")]) == 0
    rows = json.loads(out.read_text())
    assert {r["model"] for r in rows} == {"demo-joint", "demo-divided"}
    for model in ("demo-joint", "demo-divided"):
        mine = [r for r in rows if r["model"] == model]
        assert [r["mode"] for r in mine] == ["none", "merge", "drop", "random_merge", "random_drop", "hybrid"]
        assert mine[0]["r"] == 0 and mine[0]["speedup"] == 1.0
        assert all(r["r"] > 0 and r["flop_ratio"] >= 2.0 for r in mine[1:])
        for r in mine:
            assert {"model", "mode", "r", "acc_appearance", "acc_temporal", "speedup"} <= set(r)
    assert "acc temporal" in capsys.readouterr().out


def test_patched_demo_model_r0_is_exact():
    model = load_model("demo-divided")
    clip = torch.rand(2, 8, 3, 96, 96)
    with torch.no_grad():
        ref = model(pixel_values=clip).logits
        assert torch.equal(vtome.patch(model, r=0)(pixel_values=clip).logits, ref)


def test_r_for_flop_ratio_is_the_smallest_r_and_stops_where_merging_saturates():
    from vtome.demo.run import flop_ratio, r_for_flop_ratio

    model, clip = load_model("demo-divided"), torch.rand(1, 8, 3, 96, 96)
    probe = vtome.patch(load_model("demo-divided"), r=0)

    def ratio(r):
        vtome.settings(probe).r = r
        return flop_ratio(probe, clip)

    r = r_for_flop_ratio(model, 2.0, clip)
    assert ratio(r) >= 2.0 > ratio(r - 1)
    r = r_for_flop_ratio(model, 10.0, clip)  # beyond reach: 36 patches per frame run out after a few layers
    assert r < 36 and ratio(r) == pytest.approx(ratio(1000)) and ratio(r - 1) < ratio(r)
