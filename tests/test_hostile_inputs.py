"""Issue 25, classes 3-7: inputs read as something else, results combined that do not belong together,
options accepted and ignored, reports that claim what did not happen, limits found by crashing.

One test per class, in the style of test_eval_integrity.py: every input is made here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny
from test_eval import CopyPixel, copy_model, flat_video, write_frames

import vtome.evaluate as evaluate
from vtome.calibrate import CalibrateConfig, calibrate, verdict
from vtome.cli import main
from vtome.data.datasets import DatasetError, read_dataset
from vtome.data.video import write_video
from vtome.demo.run import DemoConfig, reached_title, short_of_target
from vtome.evaluate import EvalConfig, model_identity, run_eval
from vtome.outdir import OutputError


@pytest.fixture(autouse=True)
def _quiet(recwarn):
    """Folder datasets of LABEL_k models say how they number classes; not the subject here."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Two classes of two mp4 clips: ``archery/v0.mp4`` ... (grey level = class)."""
    path = tmp_path_factory.mktemp("data")
    for label, name in enumerate(["archery", "bowling"]):
        (path / name).mkdir()
        for j in range(2):
            write_video(path / name / f"v{j}.mp4", flat_video(label))
    return path


def evaluated(out: Path) -> dict[str, int]:
    """Video id -> predicted class, from an eval folder."""
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return {r["id"]: r["top5"][0][0] for r in map(json.loads, lines) if "error" not in r}


# -- class 3: inputs read as something else --------------------------------------------------------


def test_split_and_labels_files_name_exactly_the_files_they_say(tmp_path, monkeypatch):
    root = tmp_path / "data"
    names = {"a  b.mp4": 1, "a b.mp4": 0, 'q "x", 2.mp4': 2, "c,d.mp4": 3, "tab\tname.mp4": 2}
    (root / "bikes").mkdir(parents=True)
    for name, label in names.items():
        write_video(root / "bikes" / name, flat_video(label))
    split = root / "split.txt"
    # BOM, CRLF, a run of two spaces, a tab, quotes, commas in names and as the separator
    split.write_bytes(
        "\ufeffbikes/a  b.mp4 1\r\nbikes/a b.mp4\t0\r\n"
        '"bikes/q ""x"", 2.mp4" 2\r\nbikes/c,d.mp4,3\r\n"bikes/tab\tname.mp4", 2\r\n'.encode()
    )
    data = read_dataset("k400", root, split)
    assert [Path(s.path).name for s in data.samples] == list(names)
    assert [s.label for s in data.samples] == list(names.values()) and not data.notes  # nothing missing
    summary = run_eval(
        EvalConfig(model=copy_model(), dataset="k400", root=str(root), split=str(split), out=str(tmp_path / "o"))
    )
    assert summary["top1"] == 1.0 and summary["num_evaluated"] == 5  # each line read its own file
    for text, message in (
        ("bikes/a b.mp4 300 2\n", r"split.txt:1: ambiguous line .* put the path in double quotes"),
        ("bikes/a b.mp4 0\nbikes/a\ufeffb.mp4 1\n", r"split.txt:2: holds the invisible character U\+FEFF"),
        ("bikes/a b.mp4 0\r\rbikes/a  b.mp4 1\n", r"split.txt:1: holds the invisible character U\+000D"),
        ('"bikes/a b.mp4 0\n', r"split.txt:1: the path's opening quote is never closed"),
        ("bikes/a b.mp4 0\n./bikes/a b.mp4 0\n", r"split.txt:2: ./bikes/a b.mp4 is listed twice \(first at line 1\)"),
        ("bikes/a b.mp4\n", r"split.txt:1: expected 'relative/path.mp4 label_index'"),
    ):
        split.write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_dataset("k400", root, split)
    # labels: BOM and CRLF do not enter names; a blank line or a name twice would shift or merge classes
    split.write_text("bikes/a b.mp4 0\n")
    labels = root / "labels.txt"
    labels.write_bytes("\ufeffriding  bike\r\nunicycling\r\n\r\n".encode())
    assert read_dataset("k400", root, split, labels).classes == ["riding  bike", "unicycling"]
    for text, message in (
        ("riding\n\nunicycling\n", r"labels.txt:2: blank line before the last class name"),
        ("riding\nunicycling\nriding\n", r"labels.txt:3: class name 'riding' is listed twice \(first at line 1\)"),
    ):
        labels.write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_dataset("k400", root, split, labels)
    (root / "labels.json").write_bytes('\ufeff["a", "b", "a"]'.encode())
    with pytest.raises(DatasetError, match="class name 'a' is listed twice"):
        read_dataset("k400", root, split, root / "labels.json")
    # a relative --split that names two different files (here and under --root) is refused, not guessed
    monkeypatch.chdir(tmp_path)
    Path("split.txt").write_text("bikes/a  b.mp4 1\n")
    with pytest.raises(DatasetError, match="split.txt is ambiguous: both"):
        read_dataset("k400", root, "split.txt")
    # EPIC: a BOM before the header is not part of the first column's name
    epic = tmp_path / "epic"
    write_frames(epic / "P01" / "P01_01", flat_video(1, frames=8))
    header = "narration_id,participant_id,video_id,start_frame,stop_frame,verb_class,noun_class"
    (epic / "EPIC_100_validation.csv").write_bytes(f"\ufeff{header}\r\nn0,P01,P01_01,1,8,1,0\r\n".encode())
    assert [s.id for s in read_dataset("epic", epic).samples] == ["n0"]


# -- class 4: results combined that do not belong together ------------------------------------------


def test_confusion_and_resume_refuse_what_does_not_belong_together(root, tmp_path, capsys):
    other = tmp_path / "other_data"  # another dataset with the same class names
    for label, name in enumerate(["archery", "bowling"]):
        (other / name).mkdir(parents=True)
        write_video(other / name / "x.mp4", flat_video(1 - label))
    runs = {}
    for key, data, model in (
        ("a", root, copy_model()),
        ("b", root, CopyPixel(copy_model(), torch.zeros(4))),
        ("c", other, copy_model()),
    ):
        runs[key] = tmp_path / key
        run_eval(EvalConfig(model=model, dataset="folder", root=str(data), out=str(runs[key])))
    assert main(["confusion", str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "ab.png")]) == 0  # models differ
    assert main(["confusion", str(runs["a"]), str(runs["c"]), "--out", str(tmp_path / "ac.png")]) == 2
    err = capsys.readouterr().err
    assert "vtome confusion: error: the two evaluations do not cover the same data" in err and "data.root:" in err
    assert not (tmp_path / "ac.png").exists()
    limited = tmp_path / "limited"
    run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(limited), limit=2))
    assert main(["confusion", str(runs["a"]), str(limited)]) == 2
    assert "limit (--limit): None in" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "confusion.json").write_text((runs["a"] / "confusion.json").read_text())
    assert main(["confusion", str(runs["a"]), str(tmp_path / "bare")]) == 2
    assert "has no manifest.json, so what it evaluated is unknown" in capsys.readouterr().err
    for flag in ("--top", "--classes"):
        assert main(["confusion", str(runs["a"]), str(runs["b"]), flag, "-1"]) == 2
        assert f"{flag} must be an integer" in capsys.readouterr().err
    # the fingerprint covers every value: one changed weight that sampling would skip, or a buffer
    model = tiny("videomae", image_size=32, num_labels=4)
    before = model_identity(model, "m")["fingerprint"]
    weight = model.videomae.encoder.layer[0].intermediate.dense.weight
    with torch.no_grad():
        weight.view(-1)[1] += 1e-6  # not one of 256 evenly spaced samples
    assert model_identity(model, "m")["fingerprint"] != before
    model.register_buffer("scale", torch.ones(3), persistent=False)
    with_buffer = model_identity(model, "m")["fingerprint"]
    model.scale[2] = 2.0
    assert model_identity(model, "m")["fingerprint"] != with_buffer
    # ... so a resume with such a model is refused instead of mixing two models' predictions
    nudged = copy_model()
    with torch.no_grad():
        nudged.centers[3] += 1e-4
    with pytest.raises(OutputError, match="model.fingerprint"):
        run_eval(EvalConfig(model=nudged, dataset="folder", root=str(root), out=str(runs["a"])))


def test_model_fingerprint_of_a_base_model_is_fast():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    model = VideoMAEForVideoClassification(VideoMAEConfig())  # ViT-B size, 86M values
    start = time.perf_counter()
    model_identity(model, "base")
    assert time.perf_counter() - start < 10  # about 0.3 s here; a resume check, not a training run


# -- class 5: options accepted and ignored ---------------------------------------------------------


def test_options_that_would_have_no_effect_are_refused(root, tmp_path, capsys, monkeypatch):
    split = root / "split.txt"
    split.write_text("archery/v0.mp4 0\n")
    for kind, extra, message in (
        ("folder", {"split": split}, "--split .* has no effect with --dataset folder: .* use --dataset k400"),
        ("folder", {"labels": split}, "--labels .* has no effect with --dataset folder"),
        ("k400", {"labels": split}, "--labels .* has no effect with --dataset k400: without --split"),
        ("epic", {"labels": split}, "--labels .* has no effect with --dataset epic"),
    ):
        with pytest.raises(DatasetError, match=message):
            read_dataset(kind, root, **extra)
    model = str(tmp_path / "model")
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model)
    base = ["--model", model, "--root", str(root)]
    assert main(["eval", *base, "--dataset", "folder", "--split", str(split), "--out", str(tmp_path / "e")]) == 2
    assert "vtome eval: error: --split" in capsys.readouterr().err and not (tmp_path / "e").exists()
    # segment sampling (the SSv2 default) has no stride: --sampling-rate alone is refused
    ssv2 = tmp_path / "ssv2"
    write_frames(ssv2 / "1", flat_video(0, frames=8))
    (ssv2 / "labels.json").write_text('{"Holding something": "0"}')
    (ssv2 / "validation.json").write_text('[{"id": "1", "template": "Holding [something]"}]')
    args = ["eval", "--model", model, "--root", str(ssv2), "--dataset", "ssv2", "--out", str(tmp_path / "s")]
    assert main([*args, "--sampling-rate", "2"]) == 2
    assert "--sampling-rate has no effect here: --dataset ssv2 samples segments" in capsys.readouterr().err
    assert main([*args, "--sampling-rate", "2", "--sampling", "dense"]) == 0
    # merge options of an unpatched run, and a threshold without hybrid merging, change nothing
    for extra, message in (
        (["--mode", "drop"], "--mode drop has no effect with --r 0 (the model is evaluated unpatched)"),
        (["--layers", "0"], "--layers [0] has no effect with --r 0"),
        (["--order", "spatial"], "--order spatial has no effect with --r 0"),
        (["--r", "2", "--threshold", "0.5"], "--threshold 0.5 has no effect without --mode hybrid"),
    ):
        assert main(["eval", *base, "--dataset", "folder", *extra, "--out", str(tmp_path / "e")]) == 2, extra
        assert message in capsys.readouterr().err and not (tmp_path / "e").exists()
    sweep = ["sweep", *base, "--dataset", "folder", "--r", "0,2", "--out", str(tmp_path / "sw")]
    for extra, message in (
        (["--threshold", "0.5"], "--threshold 0.5 has no effect without --mode hybrid"),
        (["--placements", "--layers", "0,1"], "--layers has no effect with --placements"),
        (["--placements", "--start-layers", "1"], "--start-layers 1 has no effect with --placements"),
        (["--modes", "merge,merge"], "--modes lists merge twice"),
    ):
        assert main([*sweep, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()
    import vtome.demo.run

    monkeypatch.setattr(vtome.demo.run, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    for extra, message in (
        (["--clips", "0"], "--clips must be an integer >= 15"),
        (["--clips", "-20"], "--clips must be an integer >= 15"),
        (["--flops", "nan"], "--flops is the fraction of the unpatched FLOPs to keep, in (0, 1)"),
        (["--flops", "inf"], "--flops is the fraction of the unpatched FLOPs to keep, in (0, 1)"),
        (["--flops", "1"], "--flops is the fraction of the unpatched FLOPs to keep, in (0, 1)"),
        (["--threshold", "nan"], "--threshold is a cosine similarity, in [-1, 1]"),
        (["--threshold", "2"], "--threshold is a cosine similarity, in [-1, 1]"),
        (["--out", str(split)], "is a file, not a folder"),
        (["--json", str(tmp_path / "no" / "such" / "d.json")], "does not exist"),
    ):
        assert main(["demo", "--no-timing", *extra]) == 2, extra
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="time_rounds must be an integer >= 1"):
        DemoConfig(time_rounds=0).validate()


# -- class 6: reports that claim what did not happen -----------------------------------------------


def _report(**changes: object) -> dict:
    """A calibration report as :func:`calibrate` returns it (the measured figures given here)."""
    row = {"why": "best", "r": 8, "batch_size": 1, "flop_ratio": 1.8, "speedup": 1.3, "clips_per_s": 9.0}
    report = {
        "config": {"device": "cpu", "dtype": "fp32", "batch_size": 1, "target_speedup": None, "flops": None},
        "best": {**row, "overhead_share": 0.05},
        "recommendation": None,
        "confirmation": None,
        "budget_warning": None,
        "pays": True,
        "pays_from_batch_size": None,
        "larger_batches": [],
        "larger_batches_stopped": None,
    }
    for key, value in changes.items():
        report[key] = {**report[key], **value} if isinstance(report[key], dict) else value
    return report


def test_reports_state_what_was_reached(tmp_path, capsys):
    # calibrate: a confirmation that missed the target is not a recommendation
    missed = _report(config={"target_speedup": 1.5}, confirmation={"r": 9, "speedup": 1.45, "met": False})
    text = " ".join(verdict(missed))
    assert "target 1.50x not met" in text and "1.45x" in text and "use r=" not in text
    # a model whose merging removes almost no work: not blamed on the merge step's fixed cost
    tiny_gain = _report(pays=False, best={"flop_ratio": 1.02, "speedup": 0.99})
    text = " ".join(verdict(tiny_gain))
    assert "cannot pay on this model: the most it removes is 1.02x" in text and "fixed cost" not in text
    # an unreachable FLOP budget: the budget reached is stated, no recommendation is made
    model = str(tmp_path / "model")
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model)
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--model", model, "--flops", "1e-9", "--warmup", "0", "--repeats", "1"]
    assert main([*argv, "--max-batch-size", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["recommendation"] is None and "cannot be reached" in report["budget_warning"]
    assert "flops=1e-09 (1e+09x fewer FLOPs) cannot be reached: a budget of" in " ".join(printed.split())
    assert f"{report['best']['flop_ratio']:.2f}x fewer FLOPs" in printed and "is r=" not in printed
    # demo: a table is titled with the reduction reached, and a note says the target was not
    rows = [
        {"model": "demo-joint", "mode": "none", "flop_ratio": 1.0},
        {"model": "demo-joint", "mode": "merge", "flop_ratio": 3.15},
        {"model": "demo-divided", "mode": "merge", "flop_ratio": 2.71},
    ]
    assert reached_title(rows, 0.001) == (
        "flops 0.001 asked (1e+03x fewer FLOPs), not reached (merging saturates): demo-joint 3.15x fewer, "
        "demo-divided 2.71x fewer"
    )
    assert reached_title(rows, 0.5) == "flops 0.5 (2x fewer FLOPs)"
    assert [n.split(":")[0] for n in short_of_target(rows, 1 / 3)] == ["demo-divided"]


class SlowFirst(CopyPixel):
    """CopyPixel whose first forward pays a one-time cost (a build, a compile, a first touch)."""

    def __init__(self):
        base = copy_model()
        super().__init__(tiny("videomae", image_size=32, num_labels=4), base.centers)
        self.calls = 0

    def forward(self, pixel_values):
        self.calls += 1
        if self.calls == 1:
            time.sleep(1.0)
        return super().forward(pixel_values)


def test_measured_speed_leaves_out_one_time_costs(root, tmp_path):
    summary = run_eval(EvalConfig(model=SlowFirst(), dataset="folder", root=str(root), out=str(tmp_path)))
    assert summary["timed_clips"] == 4 and summary["clips_per_s"] > 40  # the one-time second is not in it
    # sessions timed by an older vtome (their first forward included) are not counted as speed
    (tmp_path / "timing.json").write_text(json.dumps([{"clips": 4, "seconds": 1.2, "processes": 1}]))
    from vtome.outdir import throughput

    assert throughput(tmp_path) == (None, 0)


# -- class 7: limits found by crashing -------------------------------------------------------------


def test_limits_are_checked_not_crashed_into(root, tmp_path, capsys, monkeypatch):
    model = str(tmp_path / "model")
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model)
    for extra, message in (
        (["--max-batch-size", str(10**9)], "--max-batch-size must be an integer from the batch size (1) to 4096"),
        (["--batch-size", "4", "--max-batch-size", "2"], "--max-batch-size must be an integer from the batch size"),
        (["--target-speedup", "inf"], "--target-speedup must be > 1"),
        (["--target-speedup", "nan"], "--target-speedup must be > 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ):
        assert main(["calibrate", "--model", model, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    # batch doubling stops where the input clips would not fit (the check bench and eval make) ...
    import vtome.bench
    import vtome.calibrate as cal

    clip = 8 * 3 * 32 * 32 * 4  # one input clip of the tiny model, fp32
    monkeypatch.setattr(evaluate, "_physical_memory", lambda: clip * 2 * 2 * 2)  # batch 2 fits, batch 4 does not
    calls = []

    def bench(cfg, on_step=None):
        """Merging measured as not paying, whatever the batch (what calibrate reacts to)."""
        calls.append(cfg.batch_sizes[0])
        rows = [
            {
                "r": r,
                "baseline": r == 0,
                "batch_size": cfg.batch_sizes[0],
                "flop_ratio": 1.0 + r / 10,
                "speedup": 1.0,
                "clips_per_s": 1.0,
                "overhead_share": 0.1,
            }
            for r in cfg.rs
        ]
        return {"machine": {}, "results": rows}

    monkeypatch.setattr(cal, "run_benchmark", bench)
    report = calibrate(CalibrateConfig(model=model, target_speedup=2.0, max_batch_size=64))
    assert calls[-1] == 2 and report["larger_batches_stopped"].startswith("batch size 4 would not fit in memory")
    assert "the search stopped there: batch size 4 would not fit" in " ".join(verdict(report))
    # ... and an out-of-memory failure during the search ends it with what was measured
    monkeypatch.setattr(evaluate, "_physical_memory", lambda: None)

    def oom_at_4(cfg, on_step=None):
        if cfg.batch_sizes[0] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return bench(cfg)

    monkeypatch.setattr(cal, "run_benchmark", oom_at_4)
    report = calibrate(CalibrateConfig(model=model, target_speedup=2.0, max_batch_size=64))
    assert report["larger_batches_stopped"] == "batch size 4 would not fit in memory"
    assert [row["batch_size"] for row in report["larger_batches"]] == [2]
    assert vtome.bench.is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"))


def test_killed_decoding_worker_is_one_line_and_resumable(root, tmp_path, capsys, monkeypatch):
    real, out = evaluate.load_views, tmp_path / "o"

    def load(sample, *args):
        if sample.id == "bowling/v0.mp4":  # once the first two are written (the loader reads ahead)
            done = out / "predictions.jsonl"
            for _ in range(200):
                if done.exists() and done.read_text().count("\n") >= 2:
                    break
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)  # what the system's out-of-memory killer does
        return real(sample, *args)

    monkeypatch.setattr(evaluate, "load_views", load)
    model = str(tmp_path / "model")
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model)
    capsys.readouterr()  # saving the model prints a progress bar
    argv = ["eval", "--model", model, "--dataset", "folder", "--root", str(root), "--out", str(out)]
    assert main([*argv, "--workers", "1", "--batch-size", "1"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "warning:" not in x]  # class numbering
    assert len(err) == 1 and err[0].startswith("vtome eval: error: DataLoader worker (pid")  # no traceback
    assert "killed by signal" in err[0] or "exited unexpectedly" in err[0]  # PyTorch says one or the other
    assert "ended by the system" in err[0] and "Predictions finished so far are kept; run the same" in err[0]
    assert set(evaluated(out)) == {"archery/v0.mp4", "archery/v1.mp4"}  # finished before the kill
    monkeypatch.setattr(evaluate, "load_views", real)
    assert main([*argv, "--workers", "1", "--batch-size", "1"]) == 0
    assert len(evaluated(out)) == 4 and math.isfinite(json.loads((out / "summary.json").read_text())["top1"])
