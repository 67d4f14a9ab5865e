"""`vtome eval` / `vtome sweep` never give a silently wrong result (issue 12): one test per defect found.

Every input is made here: clips encoded with PyAV, torn files, malformed splits, hostile options.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny
from PIL import Image
from test_eval import CopyPixel, copy_model, flat_video, write_frames

import vtome.data.video as video
from vtome.cli import main
from vtome.data.datasets import DatasetError, read_dataset
from vtome.data.video import read_video, write_video
from vtome.evaluate import EvalConfig, EvalWarning, run_eval
from vtome.outdir import OutputError, RunLock
from vtome.sweep import folder_name

OUTDIR = Path(video.__file__).parent.parent / "outdir.py"
NAMES = ["walking", "archery", "dancing", "bowling"]  # the model's classes, deliberately not in sorted order


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Folder dataset: two classes x two mp4 clips, plus a split file listing them."""
    path = tmp_path_factory.mktemp("data")
    lines = []
    for label, name in enumerate(["archery", "bowling"]):
        (path / name).mkdir()
        for j in range(2):
            write_video(path / name / f"v{j}.mp4", flat_video(label))
            lines.append(f"{name}/v{j}.mp4 {label}")
    (path / "split.txt").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "videomae"
    tiny("videomae", image_size=32, num_labels=4).save_pretrained(path)
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


class Counting(CopyPixel):
    """CopyPixel that counts the clips it is shown (to see what a resume evaluates again); the same batch
    shown twice in a row (the untimed warm-up forward, then the timed one) counts once."""

    def __init__(self, template, centers):
        super().__init__(template, centers)
        self.seen, self.last = 0, None

    def forward(self, pixel_values):
        if self.last is None or not torch.equal(self.last, pixel_values):
            self.seen += len(pixel_values)
        self.last = pixel_values.clone()
        return super().forward(pixel_values)


def counting() -> Counting:
    base = copy_model()
    return Counting(tiny("videomae", image_size=32, num_labels=4), base.centers)


# -- silent wrong results ---------------------------------------------------------------------------


def test_resume_with_other_settings_is_refused_and_names_them(root, model_dir, tmp_path):
    out = tmp_path / "out"
    base = dict(model=str(model_dir), dataset="folder", root=str(root), out=str(out))
    run_eval(EvalConfig(**base))
    before = (out / "predictions.jsonl").read_text()
    with pytest.raises(OutputError) as err:
        run_eval(EvalConfig(**base, r=100, mode="drop"))
    assert "merge.r: 0 then, 100 now" in str(err.value) and "merge.mode" in str(err.value)
    assert "merge.patched" in str(err.value) and "another --out" in str(err.value)
    assert (out / "predictions.jsonl").read_text() == before  # nothing evaluated, nothing lost
    patched = tmp_path / "patched"
    run_eval(EvalConfig(**{**base, "out": str(patched)}, r=2))
    with pytest.raises(OutputError, match=r"merge.threshold: 0.0 then, 0.5 now"):
        run_eval(EvalConfig(**{**base, "out": str(patched)}, r=2, threshold=0.5))
    with pytest.raises(OutputError, match="input.views"):
        run_eval(EvalConfig(**{**base, "out": str(patched)}, r=2, views="1x2"))
    with pytest.raises(OutputError, match="input.sampling_rate"):
        run_eval(EvalConfig(**{**base, "out": str(patched)}, r=2, sampling_rate=2))
    other = tmp_path / "other_model"
    retrained = tiny("videomae", image_size=32, num_labels=4)
    with torch.no_grad():
        retrained.classifier.weight.add_(0.01)
    retrained.save_pretrained(other)
    with pytest.raises(OutputError, match="model.fingerprint"):
        run_eval(EvalConfig(**{**base, "out": str(patched), "model": str(other)}, r=2))
    # the same settings resume; an unpatched run's merge options do not change its predictions
    assert run_eval(EvalConfig(**base, mode="drop"))["num_evaluated"] == 4


def test_every_merge_setting_is_in_the_manifest(root, model_dir, tmp_path):
    import dataclasses

    import vtome

    run_eval(EvalConfig(model=str(model_dir), dataset="folder", root=str(root), out=str(tmp_path), r=2))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    model = tiny("videomae", image_size=32, num_labels=4)
    fields = {f.name for f in dataclasses.fields(vtome.settings(vtome.patch(model, r=2)))}
    assert fields <= set(manifest["settings"]["merge"])  # generic: new MergeSettings fields come along
    assert {"num_frames", "crop", "sampling", "sampling_rate", "views"} <= set(manifest["settings"]["input"])
    assert manifest["settings"]["data"]["root"] == str(root.resolve())


def test_two_runs_on_one_out_at_once_are_refused(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out, "vtome eval"):
        with pytest.raises(OutputError, match="is in use by vtome eval"):
            run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(out)))
    assert not list(out.glob("predictions*"))
    # a killed holder leaves no stale lock: the kernel drops it with the process
    script = (
        "import importlib.util, sys, time, pathlib\n"
        f"spec = importlib.util.spec_from_file_location('outdir', {str(OUTDIR)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"lock = m.RunLock(pathlib.Path({str(out)!r})); lock.acquire(); print('locked', flush=True); time.sleep(60)\n"
    )
    # the child loads outdir.py alone (no torch), so it starts quickly
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(OutputError, match=f"pid {child.pid}"):
        run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(out)))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(out)))["top1"] == 1.0


def test_sweep_folder_names_cover_every_setting(root):
    base = EvalConfig(model="m", dataset="folder", root=str(root), r=2)
    name = folder_name(base)
    assert name.startswith("merge_r2_s0-")
    for change in (
        {"threshold": 0.5},
        {"prop_attn": True},
        {"views": "2x1"},
        {"sampling": "segment"},
        {"sampling_rate": 2},
        {"model": "other"},
        {"extra": {"order": "spatial"}},
    ):
        assert folder_name(EvalConfig(**{**base.__dict__, **change})) != name, change
    for same in ({"batch_size": 1}, {"workers": 2}, {"limit": 3}, {"out": "elsewhere"}):
        assert folder_name(EvalConfig(**{**base.__dict__, **same})) == name, same
    baseline = EvalConfig(**{**base.__dict__, "r": 0})
    assert folder_name(baseline).startswith("baseline-")
    assert folder_name(baseline) == folder_name(EvalConfig(**{**baseline.__dict__, "mode": "drop"}))


def test_folder_classes_follow_the_model_label2id(tmp_path):
    template = tiny("videomae", image_size=32, num_labels=4, id2label=dict(enumerate(NAMES)))
    model = CopyPixel(template, copy_model().centers)  # grey level k -> model class k (named NAMES[k])
    data = tmp_path / "named"
    for k, name in enumerate(NAMES):
        (data / name.capitalize()).mkdir(parents=True)  # case differs from the label: still a match
        write_video(data / name.capitalize() / "a.mp4", flat_video(k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalWarning)  # names match: nothing to warn about
        summary = run_eval(EvalConfig(model=model, dataset="folder", root=str(data), out=str(tmp_path / "o")))
    assert summary["top1"] == 1.0 and summary["label_source"] == "model label2id"
    assert summary["per_class_accuracy"] == {name: 1.0 for name in NAMES}
    # names that are not the model's labels: said before evaluating, with the mapping used
    plain = CopyPixel(tiny("videomae", image_size=32, num_labels=4), copy_model().centers)
    with pytest.warns(EvalWarning, match=r"sorted folder name \(0=Archery, 1=Bowling, 2=Dancing, 3=Walking\)"):
        run_eval(EvalConfig(model=plain, dataset="folder", root=str(data), out=str(tmp_path / "p")))
    # some folders match and some do not: an error naming them
    (data / "juggling").mkdir()
    write_video(data / "juggling" / "a.mp4", flat_video(0))
    with pytest.raises(DatasetError, match="4 class folders are named after the model's labels but 1 are not: jugg"):
        run_eval(EvalConfig(model=model, dataset="folder", root=str(data), out=str(tmp_path / "q")))


def test_torn_last_line_is_repaired_and_no_record_is_lost(root, tmp_path):
    full = tmp_path / "full"
    run_eval(EvalConfig(model=counting(), dataset="folder", root=str(root), out=str(full)))
    lines = (full / "predictions.jsonl").read_text().splitlines(keepends=True)
    # power loss in the middle of the last record: the fragment goes, its video is evaluated again
    torn = tmp_path / "torn"
    torn.mkdir()
    for name in ("manifest.json", "predictions.jsonl"):
        (torn / name).write_bytes((full / name).read_bytes())
    (torn / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:15])
    model = counting()
    with pytest.warns(EvalWarning, match="cut off a torn last line"):
        summary = run_eval(EvalConfig(model=model, dataset="folder", root=str(root), out=str(torn)))
    assert model.seen == 2 and summary["num_evaluated"] == 4 and summary["num_missing"] == 0
    assert (torn / "predictions.jsonl").read_text() == "".join(lines)
    # a whole record that lost only its newline is kept, not evaluated again
    (torn / "predictions.jsonl").write_text("".join(lines[:3]).rstrip("\n"))
    model = counting()
    summary = run_eval(EvalConfig(model=model, dataset="folder", root=str(root), out=str(torn)))
    assert model.seen == 1 and summary["num_evaluated"] == 4
    assert (torn / "predictions.jsonl").read_text() == "".join(lines)
    # a damaged line in the middle is not skipped in silence
    (torn / "predictions.jsonl").write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    with pytest.raises(OutputError, match=r"predictions.jsonl:2: not a prediction record"):
        run_eval(EvalConfig(model=counting(), dataset="folder", root=str(root), out=str(torn)))


def test_rerun_keeps_measured_speed(root, model_dir, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(model_dir), "--dataset", "folder", "--root", str(root), "--r", "0,2"]
    assert main([*args, "--out", str(out)]) == 0
    first = list(csv.DictReader((out / "sweep.csv").open()))
    assert all(float(row["clips_per_s"]) > 0 for row in first) and float(first[1]["speedup"]) > 0
    assert main([*args, "--out", str(out)]) == 0  # finished: nothing is evaluated again
    second = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["clips_per_s"] for r in second] == [r["clips_per_s"] for r in first]
    assert [r["speedup"] for r in second] == [r["speedup"] for r in first]


def test_limit_rerun_keeps_predictions_beyond_the_limit(root, tmp_path):
    run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path)))
    summary = run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path), limit=1))
    assert summary["num_videos"] == 1 and len(records(tmp_path)) == 4


def test_labels_and_options_are_validated(root, tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("archery/v0.mp4 0\narchery/v1.mp4 -1\n")
    with pytest.raises(DatasetError, match=r"split.txt:2: label -1 is negative"):
        read_dataset("k400", root, split)
    split.write_text("archery/v0.mp4 0\n\narchery/v1.mp4 999\n")
    cfg = EvalConfig(model=copy_model(), dataset="k400", root=str(root), split=str(split), out=str(tmp_path / "o"))
    bad = r"split.txt:3: label 999 of archery/v1.mp4 is out of range: the model has 4 classes"
    with pytest.raises(DatasetError, match=bad):
        run_eval(cfg)
    assert not (tmp_path / "o").exists()
    cfg = dict(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path / "x"))
    for bad, message in (
        ({"limit": 0}, "--limit must be an integer >= 1"),
        ({"limit": -5}, "--limit must be an integer >= 1"),
        ({"sampling_rate": -3}, "--sampling-rate must be an integer >= 1"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
        ({"workers": -1}, "--workers must be an integer >= 0"),
        ({"verb_classes": 2}, "--verb-classes and --noun-model are for --dataset epic only"),
    ):
        with pytest.raises(ValueError, match=message):
            run_eval(EvalConfig(**cfg, **bad))
    assert not (tmp_path / "x").exists()


def write_epic(root: Path, rows: list[tuple], bad_row: str | None = None) -> None:
    for pid, vid, start, stop, *_ in rows:
        write_frames(root / pid / vid, flat_video(1, frames=stop - start + 1), first=start)
    lines = ["narration_id,participant_id,video_id,start_frame,stop_frame,verb_class,noun_class"]
    lines += [f"n{i},{','.join(map(str, row))}" for i, row in enumerate(rows)]
    if bad_row:
        lines.append(bad_row)
    (root / "EPIC_100_validation.csv").write_text("\n".join(lines) + "\n")


def test_epic_verb_classes_and_rows_are_validated(tmp_path):
    root = tmp_path / "epic"
    write_epic(root, [("P01", "P01_01", 1, 8, 1, 0)])
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="--verb-classes 4 leaves no noun classes: the model has 4 logits"):
        run_eval(EvalConfig(model=copy_model(), dataset="epic", root=str(root), out=str(out), verb_classes=4))
    assert not out.exists()  # no corrupt record is written
    summary = run_eval(EvalConfig(model=copy_model(), dataset="epic", root=str(root), out=str(out), verb_classes=2))
    assert summary["num_evaluated"] == 1
    with pytest.raises(OutputError, match="epic.verb_classes: 2 then, 3 now"):
        run_eval(EvalConfig(model=copy_model(), dataset="epic", root=str(root), out=str(out), verb_classes=3))
    write_epic(root, [("P01", "P01_01", 1, 8, 0, 1)], bad_row="n9,P01,P01_01,1,8,run,0")
    with pytest.raises(DatasetError, match=r"EPIC_100_validation.csv:3: verb_class must be an integer; got 'run'"):
        read_dataset("epic", root)


# -- decoding ---------------------------------------------------------------------------------------


def test_16_bit_and_palette_frames_convert_properly(tmp_path):
    grey16 = tmp_path / "grey16"
    grey16.mkdir()
    for i in range(4):  # 16-bit grey at 50%: must read as 128, not saturate to white
        Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(grey16 / f"{i:03d}.png")
    frames = video.read_frames(video.list_frames(grey16), [0, 3])
    assert frames.shape == (2, 16, 16, 3) and (frames == 128).all()
    palette = tmp_path / "palette"
    palette.mkdir()
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8], rgb[:, 8:] = (200, 30, 60), (20, 200, 90)
    Image.fromarray(rgb).quantize(colors=2).save(palette / "000.png")
    assert Image.open(palette / "000.png").mode == "P"
    frame = video.read_frames(video.list_frames(palette), [0])[0]
    assert frame.shape == (16, 16, 3) and tuple(frame[0, 0]) == (200, 30, 60) and tuple(frame[0, 15]) == (20, 200, 90)


def test_rotation_metadata_is_applied(tmp_path):
    import av

    frames = np.zeros((4, 32, 48, 3), np.uint8)
    frames[:, :8, :8] = 255  # white top-left corner of a landscape frame
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(90)  # shown turned 90 degrees counter-clockwise
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
        container.mux(stream.encode())
    shown = read_video(path)
    assert shown.shape == (4, 48, 32, 3)  # portrait
    white = np.argwhere(shown[0, ..., 0] > 128).mean(0)
    assert white[0] > 40 and white[1] < 8  # the corner turned to the bottom left


def test_non_video_bytes_are_rejected_and_recorded(tmp_path):
    import av

    data = tmp_path / "data" / "archery"
    data.mkdir(parents=True)
    write_video(data / "ok.mp4", flat_video(0))
    with av.open(str(data / "raw.mp4"), "w", format="h264") as container:  # decodable bytes, but no container
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in flat_video(0, frames=2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
        container.mux(stream.encode())
    (data / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with av.open(str(data / "audio.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    broken = tmp_path / "data" / "archery" / "frames"
    write_frames(broken, flat_video(0, frames=8))
    (broken / "frame_0000000001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = EvalConfig(model=copy_model(), dataset="folder", root=str(tmp_path / "data"), out=str(tmp_path / "o"))
    summary = run_eval(cfg)
    assert summary["num_evaluated"] == 1 and summary["num_failed"] == 4 and summary["top1"] == 1.0
    errors = {r["id"]: r["error"] for r in records(tmp_path / "o") if "error" in r}
    assert "not a video file" in errors["archery/raw.mp4"] and "raw 'h264'" in errors["archery/raw.mp4"]
    assert "not a readable video" in errors["archery/random.mp4"]
    assert "no video stream (the file has audio streams only)" in errors["archery/audio.mp4"]
    assert "frame_0000000001.jpg: unreadable frame image" in errors["archery/frames"]


def test_only_sampled_frames_are_decoded_and_kept(tmp_path, monkeypatch):
    clip = np.repeat(np.arange(0, 240, 4, dtype=np.uint8)[:, None, None, None], 16, axis=1)
    clip = np.repeat(np.repeat(clip, 16, axis=2), 3, axis=3)  # 60 frames, frame i at grey 4i
    path = tmp_path / "long.mp4"
    write_video(path, clip)
    converted = []
    real = video._to_rgb
    monkeypatch.setattr(video, "_to_rgb", lambda frame: converted.append(1) or real(frame))
    frames = video.sample_video(path, lambda total: [total // 2, 5, 5, 10])
    assert len(converted) == 3  # three distinct frames converted, not sixty
    assert frames.shape == (4, 16, 16, 3)
    assert np.abs(frames[:, 0, 0, 0].astype(int) - [120, 20, 20, 40]).max() <= 6  # the frames asked for


# -- clear errors, no tracebacks --------------------------------------------------------------------


def test_cli_reports_user_errors_without_traceback(root, model_dir, tmp_path, capsys):
    common = ["eval", "--model", str(model_dir), "--dataset", "ssv2", "--root"]
    ssv2 = tmp_path / "ssv2"
    ssv2.mkdir()
    (ssv2 / "labels.json").write_text('["Holding something"]')
    (ssv2 / "validation.json").write_text("[]")
    assert main([*common, str(ssv2)]) == 2
    assert "labels.json: expected a JSON object {template: index}, got a list" in capsys.readouterr().err
    (ssv2 / "labels.json").write_text('{"Holding something": "0",\n "Pushing something": zero}')
    assert main([*common, str(ssv2)]) == 2
    assert "labels.json:2:23: labels.json is not valid JSON" in capsys.readouterr().err
    (ssv2 / "labels.json").write_text('{\n "Holding something": "0",\n "Pushing something": "first"\n}')
    assert main([*common, str(ssv2)]) == 2
    assert "labels.json:3: class 'Pushing something' has index 'first'" in capsys.readouterr().err
    (ssv2 / "labels.json").write_text('{"Holding something": "0"}')
    (ssv2 / "validation.json").write_text('[\n  {"id": "1", "template": "Holding [something]"},\n  {"label": "x"}\n]')
    assert main([*common, str(ssv2)]) == 2
    assert "validation.json:3: expected an object with 'id' and 'template'" in capsys.readouterr().err
    base = ["eval", "--model", str(model_dir), "--dataset", "folder", "--root", str(root)]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main([*base, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*base, "--limit", "0"]) == 2 and "--limit must be" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "big"), "--batch-size", "100000"]) == 0  # more than the videos: fine
    sweep = ["sweep", "--model", str(model_dir), "--dataset", "folder", "--root", str(root), "--r", "0,2"]
    assert main([*sweep, "--start-layers", "0,99", "--out", str(tmp_path / "sw")]) == 2
    assert "start_layer must be an int in [0, 3]; got 99" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()  # refused before the baseline was evaluated
    assert main(["bench", "--model", str(model_dir), "--threads", "-2"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_batch_too_big_for_memory_is_refused_up_front(root, tmp_path, monkeypatch):
    import vtome.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_physical_memory", lambda: 2**20)
    with pytest.raises(ValueError, match=r"--batch-size 4 with --views 1x1 needs at least .* smaller --batch-size"):
        run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path), batch_size=50))


def test_bench_bad_json_path_fails_before_benchmarking(model_dir, tmp_path, capsys, monkeypatch):
    import vtome.bench

    monkeypatch.setattr(vtome.bench, "run_benchmark", lambda *a, **k: pytest.fail("benchmark ran"))
    assert main(["bench", "--model", str(model_dir), "--json", str(tmp_path / "no" / "such" / "r.json")]) == 2
    assert "does not exist; create it or choose another path" in capsys.readouterr().err
    assert main(["bench", "--model", str(model_dir), "--plot", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_disk_full_keeps_finished_predictions_and_says_how_to_resume(root, tmp_path, monkeypatch):
    class FullDisk:
        """The predictions file of a disk that fills up during the second write (half of it lands)."""

        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, text):
            self.writes += 1
            if self.writes == 2:
                self.f.write(text[:10])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def flush(self):
            self.f.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = Path.open

    def open_(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if mode == "a" and path.name.startswith("predictions") else f

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(OutputError, match="No space left on device. Predictions finished so far are kept"):
        run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path), batch_size=1))
    monkeypatch.setattr(Path, "open", real_open)
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 1  # one record and a torn one
    with pytest.warns(EvalWarning, match="cut off a torn last line"):  # the cut-off record is evaluated again
        summary = run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(tmp_path)))
    assert summary["num_evaluated"] == 4 and len(records(tmp_path)) == 4


def test_unreadable_out_folder_is_a_clear_error(root, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write to --out"):
            run_eval(EvalConfig(model=copy_model(), dataset="folder", root=str(root), out=str(out)))
    finally:
        out.chmod(0o700)
