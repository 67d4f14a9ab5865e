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


def test_demo_quick_writes_every_section_curve_and_pictures(tmp_path, capsys):
    out, folder = tmp_path / "demo.json", tmp_path / "viz"
    assert main(["demo", "--quick", "--clips", "30", "--json", str(out), "--out", str(folder)]) == 0
    report = json.loads(out.read_text())
    models = list(checkpoints.FAMILIES.values())
    for model in models:
        main_rows = [r for r in report["main"] if r["model"] == model]
        assert [r["mode"] for r in main_rows] == ["none", *vtome.MODES]
        assert main_rows[0]["r"] == 0 and main_rows[0]["speedup"] == 1.0 and main_rows[0]["flop_ratio"] == 1.0
        for row in main_rows[1:]:
            assert row["r"] > 0 and row["flop_ratio"] >= 2.0 and row["speedup"] > 0 and row["clips"] == 30
            assert {"acc_appearance", "acc_temporal", "latency_ms"} <= set(row)
            lo, hi = row["speedup_iqr"]
            assert 0 < lo <= hi
        curve = [r for r in report["curve"] if r["model"] == model and r["mode"] == "merge"]
        ratios = [r["flop_ratio"] for r in curve]
        assert len(curve) == 3 and ratios == sorted(ratios) and ratios[0] >= 1.5  # one point per budget asked
        assert [r["flops"] for r in curve] == sorted((2 / 3, 0.5, 0.4), reverse=True)
    divided = [r for r in report["schemes"] if r["divided"]]
    assert {(r["divided"], r["mode"], r["flops"]) for r in divided} == {
        (d, m, f) for d in ("per_frame", "aligned") for m in ("merge", "hybrid") for f in (0.5, 0.4)
    }
    assert all(r["speedup"] > 0 for r in report["schemes"])
    assert report["order"] == [] and report["placement"] == []  # full run only
    assert {r["model"] for r in report["speed"]} == set(models) and report["reading"]
    assert (folder / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    for model in models:
        assert all((folder / f"{model}_merges.{ext}").exists() for ext in ("png", "gif", "mp4"))
    printed = capsys.readouterr().out
    assert "acc temporal" in printed and "speedup" in printed and "interleaved" in printed


def test_demo_order_and_placement_sections():
    from vtome.demo.run import DemoConfig, run_demo

    cfg = DemoConfig(clips=15, budgets=(0.5,), timing=False, sections=("order", "placement"), families=("joint",))
    report = run_demo(cfg)
    assert {(r["order"], r["flops"]) for r in report["order"]} == {
        (o, f) for o in ("paper", "spatial") for f in (0.5, 0.4)
    }
    assert all(r["flop_ratio"] >= 1 / r["flops"] for r in report["order"])
    placed = {r["placement"]: r for r in report["placement"]}
    assert list(placed) == ["all layers", "first half", "second half"]
    assert placed["all layers"]["layers"] is None
    assert placed["first half"]["layers"] == [0, 1] and placed["second half"]["layers"] == [2, 3]
    assert all(r["flop_ratio"] >= 1.25 for r in placed.values())
    assert placed["second half"]["r"] > placed["first half"]["r"] > placed["all layers"]["r"]  # equal FLOPs
    assert report["speed"] == [] and report["schemes"] == []


def test_demo_settings_meet_their_flop_budgets_and_cache_results():
    from vtome.demo.run import DemoConfig, ModelRun

    run = ModelRun("divided", DemoConfig(clips=15))
    merge = run.result(run.setting(0.5, "merge"))
    assert merge.flop_ratio >= 2.0 and merge.r == vtome.settings(merge.patched).r
    assert run.result(run.setting(0.5, "merge")) is merge  # each setting is evaluated once
    aligned = run.result(run.setting(0.5, "merge", divided="aligned"))
    assert vtome.settings(aligned.patched).divided == "aligned" and aligned.row()["divided"] == "aligned"
    assert run.result({}).row()["mode"] == "none" and run.result({}).flop_ratio == 1.0
    assert len(merge.hits) == 15 and merge.temporal.sum() == 10  # 5 appearance and 10 temporal classes


def test_paired_gap_is_the_mean_difference_with_two_standard_errors():
    from vtome.demo.run import Result, paired_gap

    temporal = torch.tensor([True] * 8 + [False] * 2)
    a = Result("m", {}, 0, 1.0, torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 1, 1]).bool(), temporal)
    b = Result("m", {}, 0, 1.0, torch.tensor([1, 1, 0, 0, 0, 1, 0, 0, 1, 1]).bool(), temporal)
    gap, half_width = paired_gap(a, b, "temporal")
    d = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0.0])
    assert gap == pytest.approx(3 / 8) and half_width == pytest.approx(2 * float(d.std()) / 8**0.5)
    assert paired_gap(a, b, "appearance") == (0.0, 0.0)
    assert a.acc("temporal") == pytest.approx(6 / 8) and a.acc() == pytest.approx(8 / 10)


def test_interleaved_timing_rotates_the_order_every_round():
    from vtome.bench import time_interleaved

    calls = []
    forwards = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(forwards, warmup=1, repeats=3)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_patched_demo_model_r0_is_exact():
    model = load_model("demo-divided")
    clip = torch.rand(2, 8, 3, 96, 96)
    with torch.no_grad():
        ref = model(pixel_values=clip).logits
        assert torch.equal(vtome.patch(model, r=0)(pixel_values=clip).logits, ref)
