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
