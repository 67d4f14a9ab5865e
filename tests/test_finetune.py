"""The fine-tuning recipe (`python -m vtome.demo.train --init ... --flops ...`) and the study that measures it
(`python -m vtome.demo.finetune`), on the bundled demo models with a couple of steps."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import vtome
from vtome.demo import checkpoints
from vtome.demo.finetune import StudyConfig, markdown, run_study
from vtome.demo.train import main
from vtome.zoo import load_model

QUICK = ["--steps", "2", "--batch-size", "2", "--eval-clips", "15"]


def bundled_digest() -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(checkpoints.WEIGHTS.rglob("*.*"))}


def test_recipe_fine_tunes_a_bundled_model_with_merging_into_a_new_folder(tmp_path):
    before = bundled_digest()
    out = tmp_path / "joint-half"
    assert main(["--init", "demo-joint", "--flops", "0.5", *QUICK, "--out", str(out)]) == 0
    assert bundled_digest() == before  # the bundled weights are untouched
    record = json.loads((out / "training.json").read_text())
    expected_r = vtome.settings(vtome.patch(checkpoints.load("joint"), flops=0.5)).r
    assert record["init"] == "demo-joint" and record["steps"] == 2 and record["seed"] == 0
    assert (
        record["command"] == f"python -m vtome.demo.train --init demo-joint --flops 0.5 {' '.join(QUICK)} --out {out}"
    )
    assert record["merge"]["mode"] == "merge" and record["merge"]["flops"] == 0.5 and record["merge"]["r"] == expected_r
    assert 1.95 < record["merge"]["flop_ratio"] < 2.1
    bundled = checkpoints.training_record("joint")
    assert record["first_clip"] == bundled["steps"] * bundled["batch_size"]  # clips the bundled model never saw
    assert record["test"]["clips"] == record["test_unpatched"]["clips"] == 15 and record["train_seconds"] >= 0
    tuned = load_model(str(out), attn=None)
    assert not vtome.is_patched(tuned) and type(tuned) is type(checkpoints.load("joint"))  # a stock model
    start = checkpoints.load("joint").state_dict()
    assert any(not torch.equal(start[n], p) for n, p in tuned.state_dict().items())  # it was trained


def test_recipe_records_the_mode_and_hybrid_threshold(tmp_path):
    out = tmp_path / "divided-hybrid"
    argv = ["--init", "demo-divided", "--r", "6", "--mode", "hybrid", "--threshold", "0.7", *QUICK, "--out", str(out)]
    assert main(argv) == 0
    merge = json.loads((out / "training.json").read_text())["merge"]
    assert merge["mode"] == "hybrid" and merge["threshold"] == 0.7 and merge["r"] == 6 and "flops" not in merge
    assert merge["flop_ratio"] > 1.2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--init", "demo-joint"], "--init demo-joint needs --out DIR"),
        (["--init", "demo-joint", "--out", "BUNDLED"], "is inside the bundled weights"),
        (["--init", "demo-joint", "--flops", "0.5", "--r", "4", "--out", "NEW"], "not allowed with argument"),
        (["--init", "demo-joint", "--flops", "1.5", "--out", "NEW"], "flops is the fraction of the unpatched FLOPs"),
        (["--init", "demo-joint", "--mode", "drop", "--out", "NEW"], "--mode and --threshold go with --flops or --r"),
        (
            ["--init", "demo-joint", "--r", "4", "--threshold", "0.5", "--out", "NEW"],
            "--threshold is for --mode hybrid",
        ),
        (["--init", "demo-joint", "--family", "joint", "--out", "NEW"], "not allowed with argument"),
        (["--init", "demo-joint", "--out", "USED"], "already holds a model"),
        (["--family", "joint", "--flops", "0.5"], "training with --flops/--r needs --out DIR"),
    ],
)
def test_recipe_refuses_bad_arguments_clearly(argv, message, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "model.safetensors").write_bytes(b"the user's model")
    where = {
        "BUNDLED": str(checkpoints.weights_dir("joint")),
        "NEW": str(tmp_path / "new"),
        "USED": str(tmp_path / "used"),
    }
    before = bundled_digest()
    with pytest.raises(SystemExit) as exit_info:
        main([where.get(a, a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m vtome.demo.train: error:") and message in err
    assert not (tmp_path / "new").exists() and bundled_digest() == before
    assert (tmp_path / "used" / "model.safetensors").read_bytes() == b"the user's model"


def test_study_measures_every_comparison_and_reuses_its_runs(tmp_path, capsys):
    cfg = StudyConfig(
        steps=1,
        batch_size=2,
        flops=(0.5,),
        families=("joint",),
        clips=15,
        eval_clips=15,
        time_batches=(2,),
        time_rounds=1,
        time_warmup=0,
    )
    report = run_study(cfg, tmp_path)
    rows = {(r["what"], r["evaluated"]): r for r in report["accuracy"]}
    assert set(rows) == {
        ("bundled", "unpatched"),
        ("fine-tuned without merging", "unpatched"),
        ("bundled (training-free)", "flops 0.5"),
        ("fine-tuned with merging", "flops 0.5"),
        ("fine-tuned without merging (control)", "flops 0.5"),
        ("fine-tuned with merging at flops 0.5", "unpatched"),
    }
    assert all(r["clips"] == 15 for r in rows.values())
    assert rows[("bundled (training-free)", "flops 0.5")]["flop_ratio"] > 1.95
    gaps = {g["comparison"]: g for g in report["gaps"]}
    assert len(gaps) == 5
    with_merging, control = (
        rows[("fine-tuned with merging", "flops 0.5")],
        rows[("fine-tuned without merging (control)", "flops 0.5")],
    )
    for family in ("appearance", "temporal"):  # a paired gap's mean is the difference of the accuracies
        gap = gaps["fine-tuned with merging - control"][family][0]
        assert gap == pytest.approx(with_merging[f"acc_{family}"] - control[f"acc_{family}"])
    speed = {s["flops"]: s for s in report["speed"]}
    assert set(speed) == {None, 0.5} and speed[None]["speedup"] == 1.0 and speed[0.5]["speedup"] > 0
    assert speed[0.5]["flop_ratio"] > 1.95 and speed[0.5]["batch_size"] == 2
    commands = [r["command"] for r in report["runs"] if "command" in r]
    assert len(commands) == 2 and all(c.startswith("python -m vtome.demo.train --init demo-joint") for c in commands)
    text = markdown(report)
    assert all(c in text for c in commands) and "fine-tuned with merging - control" in text

    capsys.readouterr()
    again = run_study(cfg, tmp_path)  # the runs are reused, the measurements repeated on the same models
    assert capsys.readouterr().out.count("reusing") == 2
    assert again["accuracy"] == report["accuracy"]

    record = tmp_path / "demo-joint-flops0.5" / "training.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "command": "another"}))
    with pytest.raises(ValueError, match="holds another run"):
        run_study(cfg, tmp_path)
