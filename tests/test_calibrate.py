"""``vtome calibrate`` end to end on a tiny local model (functional: no timing is asserted)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny

from vtome.calibrate import _crossing, r_for_budgets
from vtome.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_videomae")
    tiny("videomae", num_hidden_layers=2).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("target", [["--target-speedup", "1.3"], ["--flops", "0.6"]])
def test_calibrate_runs_end_to_end_and_writes_json(tiny_dir, tmp_path, capsys, target):
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--model", tiny_dir, *target, "--warmup", "0", "--repeats", "1", "--max-batch-size", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert {"machine", "config", "results", "best", "recommendation", "pays", "budgets"} <= report.keys()
    rows = report["results"]
    assert rows[0]["baseline"] and all(row["flop_ratio"] > 1 for row in rows[1:])
    if "--flops" in target:
        assert report["budgets"] == {"0.6": r_for_budgets(tiny_dir, [0.6])[0.6]}
        assert report["recommendation"]["r"] == report["budgets"]["0.6"]
        assert "flops=0.6 is r=" in printed
    else:
        assert ("use r=" in printed) == (report["recommendation"] is not None)
    if not report["pays"]:  # it says so plainly, and tried larger batches
        assert "does not pay" in printed and report["larger_batches"]


def test_crossing_interpolates_between_measured_points():
    rows = [{"r": 10, "speedup": 1.2}, {"r": 20, "speedup": 1.6}, {"r": 30, "speedup": 2.2}]
    assert _crossing(rows, 1.4) == 15
    assert _crossing(rows, 2.0) == 27  # 20 + (0.4 / 0.6) * 10, rounded up
    assert _crossing(rows, 3.0) is None
    assert _crossing(rows, 1.1) == 5  # before the first point: from (0, 1.0)


def test_calibrate_rejects_bad_options_clearly(tiny_dir, tmp_path, capsys):
    assert main(["calibrate", "--model", tiny_dir, "--target-speedup", "0.5"]) == 2
    assert "--target-speedup must be > 1" in capsys.readouterr().err
    assert main(["calibrate", "--model", tiny_dir, "--json", str(tmp_path / "missing" / "x.json")]) == 2
    assert "cannot write a file there" in capsys.readouterr().err
