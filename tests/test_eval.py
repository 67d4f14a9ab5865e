"""`vtome eval` / `vtome sweep` on tiny generated datasets in every supported layout."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import tiny
from PIL import Image

from vtome.cli import main
from vtome.data.datasets import read_dataset
from vtome.data.transforms import preprocess_for
from vtome.data.video import dense_indices, segment_indices, write_video
from vtome.evaluate import EvalConfig, run_eval

CLASSES = ["archery", "bowling", "cooking", "dancing"]
LEVELS = [40, 95, 150, 205]  # each class is a flat grey level: the label sits in every pixel


def flat_video(label: int, frames: int = 12, size: int = 32) -> np.ndarray:
    return np.full((frames, size, size, 3), LEVELS[label], dtype=np.uint8)


def write_frames(folder: Path, frames: np.ndarray, first: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{first + i:010d}.jpg")


@pytest.fixture(scope="module")
def k400(tmp_path_factory):
    """Folder-per-class tree (mp4 and one frame folder) plus a SlowFast-style list file."""
    root = tmp_path_factory.mktemp("k400")
    lines = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for j in range(2):
            write_video(root / name / f"v{j}.mp4", flat_video(label))
            lines.append(f"{name}/v{j}.mp4 {label}")
    write_frames(root / "dancing" / "frames_v2", flat_video(3))  # a frame folder among videos
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return root


class CopyPixel(nn.Module):
    """Reads the grey level of the clip and names its class: a perfect model for these videos."""

    def __init__(self, template: nn.Module, centers: torch.Tensor | None = None):
        super().__init__()
        self.config = template.config
        self.register_buffer("centers", centers if centers is not None else torch.zeros(len(LEVELS)))

    def forward(self, pixel_values):
        level = pixel_values.mean(dim=(1, 2, 3, 4))
        return type("Out", (), {"logits": -((level[:, None] - self.centers[None]) ** 2)})()


class Constant(nn.Module):
    def __init__(self, template: nn.Module):
        super().__init__()
        self.config = template.config

    def forward(self, pixel_values):
        return type("Out", (), {"logits": torch.zeros(len(pixel_values), len(LEVELS))})()


def copy_model() -> nn.Module:
    template = tiny("videomae", image_size=32, num_labels=4)
    pre = preprocess_for(template)
    centers = torch.stack([pre(flat_video(k, frames=8)).mean() for k in range(4)])
    return CopyPixel(template, centers)


def test_folder_and_list_layouts_read_the_same_labels(k400):
    folder = read_dataset("k400", k400)
    assert folder.classes == CLASSES
    assert [(s.id, s.label) for s in folder.samples][:2] == [("archery/v0.mp4", 0), ("archery/v1.mp4", 0)]
    assert ("dancing/frames_v2", 3) in [(s.id, s.label) for s in folder.samples]
    listed = read_dataset("k400", k400, split="train.csv", labels=k400 / "labels.txt")
    assert listed.classes == CLASSES
    assert [(s.id, s.label) for s in listed.samples] == [
        (f"{name}/v{j}.mp4", label) for label, name in enumerate(CLASSES) for j in range(2)
    ]
    assert [s.label for s in read_dataset("folder", k400).samples] == [s.label for s in folder.samples]


def test_ssv2_layout(tmp_path):
    labels = {"Holding something": "0", "Pushing something from left to right": "1"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [
        {"id": "101", "label": "holding a cup", "template": "Holding [something]", "placeholders": ["a cup"]},
        {"id": "102", "label": "pushing a pen", "template": "Pushing [something] from left to right"},
    ]
    (tmp_path / "validation.json").write_text(json.dumps(entries))
    write_video(tmp_path / "101.webm", flat_video(0))
    write_frames(tmp_path / "102", flat_video(1))
    data = read_dataset("ssv2", tmp_path)
    assert [(s.id, s.label, Path(s.path).name) for s in data.samples] == [("101", 0, "101.webm"), ("102", 1, "102")]
    assert data.classes == ["Holding something", "Pushing something from left to right"]
    assert data.sampling == "segment"
    (tmp_path / "validation.json").write_text(json.dumps([{"id": "9", "template": "Juggling [something]"}]))
    with pytest.raises(ValueError, match="template 'Juggling something', not in"):
        read_dataset("ssv2", tmp_path)


def test_sampling_indices():
    assert dense_indices(100, 4, 8) == [37, 45, 53, 61]  # centred: 25-frame span, 37 frames before, 38 after
    assert dense_indices(100, 4, 8, view=0, views=3) == [0, 8, 16, 24]
    assert dense_indices(100, 4, 8, view=2, views=3) == [75, 83, 91, 99]
    assert dense_indices(10, 4, 4) == [0, 4, 8, 9]  # short clip: the last frame repeats
    assert segment_indices(80, 4) == [10, 30, 50, 70]  # middle of each quarter
    assert segment_indices(80, 4, view=0, views=2) == [5, 25, 45, 65]


def test_copy_model_is_perfect_and_constant_model_is_at_chance(k400, tmp_path):
    summary = run_eval(EvalConfig(model=copy_model(), dataset="k400", root=str(k400), out=str(tmp_path / "copy")))
    assert summary["top1"] == 1.0 and summary["num_evaluated"] == 9 and summary["num_failed"] == 0
    assert summary["per_class_accuracy"] == {name: 1.0 for name in CLASSES}
    confusion = json.loads((tmp_path / "copy" / "confusion.json").read_text())["matrix"]
    assert confusion == [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 3]]
    constant = Constant(copy_model())
    const = run_eval(EvalConfig(model=constant, dataset="folder", root=str(k400), out=str(tmp_path / "c")))
    assert const["top1"] == pytest.approx(2 / 9)  # always class 0: its share of the videos
    lines = (tmp_path / "copy" / "predictions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["id"] == "archery/v0.mp4" and first["label"] == 0 and first["top5"][0][0] == 0
    assert len(first["top5"]) == 4


def test_multi_view_averages_scores(k400, tmp_path):
    summary = run_eval(EvalConfig(model=copy_model(), dataset="k400", root=str(k400), out=str(tmp_path), views="2x3"))
    assert summary["top1"] == 1.0 and summary["views"] == "2x3"


def test_corrupt_video_is_recorded_and_skipped(k400, tmp_path):
    root = tmp_path / "data"
    (root / "archery").mkdir(parents=True)
    write_video(root / "archery" / "ok.mp4", flat_video(0))
    (root / "archery" / "broken.mp4").write_bytes(b"this is not a video")
    summary = run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path / "o")))
    assert summary["num_failed"] == 1 and summary["num_evaluated"] == 1 and summary["top1"] == 1.0
    records = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    broken = next(r for r in records if r["id"] == "archery/broken.mp4")
    assert "error" in broken and broken["label"] == 0


def test_resume_after_interruption_gives_the_same_file(k400, tmp_path):
    model_dir = tmp_path / "model"
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model_dir)
    full = EvalConfig(model=str(model_dir), dataset="k400", root=str(k400), out=str(tmp_path / "full"), batch_size=1)
    run_eval(full)

    class Stop(Exception):
        pass

    def interrupt(done, total, acc):
        if done >= 4:
            raise Stop

    part = EvalConfig(model=str(model_dir), dataset="k400", root=str(k400), out=str(tmp_path / "part"), batch_size=1)
    with pytest.raises(Stop):
        run_eval(part, interrupt)
    assert len((tmp_path / "part" / "predictions.jsonl").read_text().splitlines()) == 4
    resumed = run_eval(part)
    assert resumed["num_evaluated"] == 9
    resumed_file = (tmp_path / "part" / "predictions.jsonl").read_text()
    assert resumed_file == (tmp_path / "full" / "predictions.jsonl").read_text()


def test_epic_verb_noun_action(tmp_path):
    root = tmp_path / "epic"
    rows = [("P01", "P01_01", 1, 12, 0, 1), ("P01", "P01_01", 13, 24, 1, 0), ("P02", "P02_03", 5, 16, 1, 1)]
    levels = {(0, 1): 1, (1, 0): 2, (1, 1): 3}  # grey level class -> (verb, noun) pairs below
    for pid, vid, start, stop, verb, noun in rows:
        write_frames(root / pid / vid, flat_video(levels[(verb, noun)], frames=stop - start + 1), first=start)
    with (root / "EPIC_100_validation.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["narration_id", "participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class"]
        )
        for i, row in enumerate(rows):
            w.writerow([f"n{i}", *row])

    class VerbNoun(nn.Module):
        """Logits [verb0, verb1 | noun0, noun1] from the grey level; the noun is wrong for level 2."""

        def __init__(self):
            super().__init__()
            self.inner = copy_model()
            self.config = self.inner.config

        def forward(self, pixel_values):
            level = self.inner(pixel_values).logits.argmax(-1)  # 1, 2 or 3
            table = {1: (0, 1), 2: (1, 1), 3: (1, 1)}  # level 2 should be noun 0
            logits = torch.full((len(level), 4), -5.0)
            for i, k in enumerate(level.tolist()):
                verb, noun = table[k]
                logits[i, verb] = 5.0
                logits[i, 2 + noun] = 5.0
            return type("Out", (), {"logits": logits})()

    summary = run_eval(
        EvalConfig(model=VerbNoun(), dataset="epic", root=str(root), out=str(tmp_path / "o"), verb_classes=2)
    )
    assert summary["verb_top1"] == 1.0
    assert summary["noun_top1"] == pytest.approx(2 / 3)
    assert summary["action_top1"] == pytest.approx(2 / 3)  # action = verb and noun both right
    assert summary["top1"] == summary["action_top1"] and summary["action_top5"] == 1.0
    with pytest.raises(ValueError, match="--noun-model .* or --verb-classes"):
        run_eval(EvalConfig(model=VerbNoun(), dataset="epic", root=str(root), out=str(tmp_path / "x")))


def test_cli_eval_with_merging_and_bad_input(k400, tmp_path, capsys):
    model_dir = tmp_path / "m"
    tiny("vivit", image_size=32, num_labels=4).save_pretrained(model_dir)
    out = tmp_path / "res"
    code = main(
        ["eval", "--model", str(model_dir), "--dataset", "k400", "--root", str(k400), "--r", "2", "--out", str(out)]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"top1", "top5", "num_videos", "num_failed", "clips_per_s", "merge"} <= set(summary)
    assert summary["merge"]["r"] == 2 and summary["num_videos"] == 9
    assert main(["eval", "--model", str(model_dir), "--dataset", "k400", "--root", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--dataset", "k400", "--root", str(k400), "--views", "3"]) == 2
    assert "--views must look like 1x1" in capsys.readouterr().err


def test_sweep_writes_csv_and_plot(k400, tmp_path):
    model_dir = tmp_path / "m"
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model_dir)
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--dataset",
                "k400",
                "--root",
                str(k400),
                "--r",
                "0,2,4",
                "--modes",
                "merge,random_merge",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["mode"], r["r"]) for r in rows] == [
        ("none", "0"),
        ("merge", "2"),
        ("merge", "4"),
        ("random_merge", "2"),
        ("random_merge", "4"),
    ]
    assert float(rows[0]["flop_ratio"]) == 1.0 and float(rows[2]["flop_ratio"]) > float(rows[1]["flop_ratio"]) > 1
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert Path(rows[1]["out"]).parent == out and Path(rows[1]["out"]).name.startswith("merge_r2_s0-")
    assert json.loads((Path(rows[1]["out"]) / "summary.json").read_text())["merge"]["r"] == 2
    only = tmp_path / "only"
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--dataset",
                "k400",
                "--root",
                str(k400),
                "--r",
                "0,2",
                "--layers",
                "2",
                "--out",
                str(only),
            ]
        )
        == 0
    )
    folder = list(csv.DictReader((only / "sweep.csv").open()))[1]["out"]
    assert Path(folder).name.startswith("merge_r2_s0_l2-")
    assert json.loads((Path(folder) / "summary.json").read_text())["merge"]["layers"] == [2]


def test_readme_torchrun_command_equals_one_process(k400, tmp_path):
    """The README's multi-process form, `torchrun --nproc-per-node 2 -m vtome -- eval ... --r N`, runs (without
    the `--`, torchrun's own parser rejects `--r` as an ambiguous abbreviation of its options) and gives the
    same predictions as one process."""
    model_dir = tmp_path / "m"
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(model_dir)
    args = ["eval", "--model", str(model_dir), "--dataset", "k400", "--root", str(k400), "--batch-size", "1"]
    args += ["--r", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "vtome", *args, "--out", str(tmp_path / "one")]
    subprocess.run(one, check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]
    result = subprocess.run(
        [*torchrun, "-m", "vtome", "--", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    one = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert one == (tmp_path / "two" / "predictions.jsonl").read_text()
    assert len(one.splitlines()) == 9
    assert not list((tmp_path / "two").glob("predictions.rank*"))
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["top1"] == s2["top1"] and s1["per_class_accuracy"] == s2["per_class_accuracy"]
    assert s2["merge"]["r"] == 2 and s2["merge"]["patched"] is True
