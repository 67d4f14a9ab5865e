"""Merge visualisation, clip splicing, confusion differences, placements."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny
from PIL import Image

import vtome
from vtome.adapters import adapter_for
from vtome.analysis import confusion_change, crossing_groups, splice, splice_study, token_sides
from vtome.cli import main
from vtome.data.transforms import preprocess_for
from vtome.data.video import read_video, write_video
from vtome.demo.synth import ClipSpec, make_clip
from vtome.sweep import placement_grid, placements
from vtome.visualize import (
    clip_from_frames,
    compose,
    describe,
    display_scale,
    draw,
    label_maps,
    palette,
    upscale,
    visualize_clip,
)

RED, BLUE = (220, 30, 30), (30, 30, 220)


def halves(frames: int = 8, size: int = 64) -> np.ndarray:
    """Top half red, bottom half blue. (Left/right halves would not do: A/B alternate along each row,
    so after one merge every A token is red and every B token blue, and further merges must cross.)"""
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    video[:, : size // 2], video[:, size // 2 :] = RED, BLUE
    return video


def textured(model) -> np.ndarray:
    clip, _ = make_clip(0, "test", 3, ClipSpec(frames=model.config.num_frames, size=64))
    return (clip.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


@pytest.mark.parametrize("family", ["videomae", "vivit", "timesformer"])
def test_every_patch_pixel_is_in_exactly_one_group(family):
    model = tiny(family)
    clip = clip_from_frames(textured(model), preprocess_for(model))
    frames, groups = visualize_clip(model, clip, r=6)
    assert frames.shape == (model.config.num_frames, 64, 64, 3) and frames.dtype == np.uint8
    positions, tubelet, patch = adapter_for(model).token_positions(model)
    labels = label_maps(groups, positions, tubelet, model.config.num_frames, 64 // patch)
    assert (labels >= 0).all()  # merge mode: every patch of every frame is drawn in a group
    covered = np.zeros_like(labels)  # each input token covers its own patch in its own frames, once
    for t0, y, x in positions.tolist():
        if t0 >= 0:
            covered[t0 : t0 + tubelet, y, x] += 1
    assert (covered == 1).all()
    groups_drawn = len(set(groups[positions[:, 0] >= 0].tolist()))
    vtome.patch(model, r=6)
    with torch.no_grad():
        model(pixel_values=clip.pixel_values)
    protected = 1 if family != "videomae" else 0
    assert groups_drawn == vtome.last_run(model).tokens_per_layer[-1] - protected  # one group per output token


def test_two_flat_halves_never_mix():
    model = tiny("vivit")  # ViViT position embeddings start at zero: tokens carry only their content
    clip = clip_from_frames(halves(), preprocess_for(model))
    frames, groups = visualize_clip(model, clip, r=12)
    positions, _, _ = adapter_for(model).token_positions(model)
    top = positions[:, 1] < 2
    patches = positions[:, 0] >= 0
    assert set(groups[patches & top].tolist()).isdisjoint(groups[patches & ~top].tolist())
    assert len(set(groups[patches].tolist())) < patches.sum()  # and merging did happen


def test_dropped_patches_are_drawn_dark():
    model = tiny("videomae")
    clip = clip_from_frames(textured(model), preprocess_for(model))
    frames, groups = visualize_clip(model, clip, r=8, mode="drop")
    assert (groups == -1).sum() == 3 * 8  # three layers drop 8 tokens each
    assert frames.mean() < clip.display.mean()


def test_layer_choice_shows_earlier_groups():
    model = tiny("vivit")
    clip = clip_from_frames(textured(model), preprocess_for(model))
    _, first = visualize_clip(model, clip, layer=0, r=6)
    _, last = visualize_clip(model, clip, r=6)
    assert len(set(first[1:].tolist())) == 64 - 6 and len(set(last[1:].tolist())) == 64 - 18


def test_cli_writes_png_gif_and_mp4(tmp_path):
    model_dir = tmp_path / "model"
    tiny("timesformer").save_pretrained(model_dir)
    video = tmp_path / "clip.mp4"
    write_video(video, np.concatenate([textured(tiny("timesformer"))] * 3))  # 12 frames in the file
    out = tmp_path / "viz"
    assert main(["visualize", str(video), "--model", str(model_dir), "--r", "4", "--out", str(out)]) == 0
    with Image.open(out / "merges.gif") as gif:
        assert gif.n_frames == 4
        width, height = gif.size
        assert width >= 2 * 128 and height > 128  # frame and groups side by side, 16 px patches drawn at 32 px
    assert read_video(out / "merges.mp4").shape[0] == 4
    with Image.open(out / "merges.png") as picture:
        width, height = picture.size
        assert width > 4 * 128 and height > 2 * 128  # 4 frames over their groups, enlarged 2x, caption, legend


def test_picture_has_frames_over_groups_enlarged_with_caption_room():
    model = tiny("timesformer")
    clip = clip_from_frames(textured(model), preprocess_for(model))
    scale = display_scale(16)
    drawn, groups = visualize_clip(model, clip, scale=scale, r=4)
    assert drawn.shape == (4, 64 * scale, 64 * scale, 3) and scale * 16 >= 16
    assert display_scale(4) * 4 >= 16 and display_scale(32) == 2
    picture = compose(clip.display, drawn, "caption")
    big = upscale(clip.display, scale)
    # find the first input frame in the picture: top row holds the enlarged frames, the row below their groups
    rows, cols = picture.shape[:2]
    hits = [
        (y, x)
        for y in range(0, rows - 128)
        for x in range(0, cols - 128, 4)
        if np.array_equal(picture[y, x : x + 128], big[0, 0])
        and np.array_equal(picture[y + 127, x : x + 128], big[0, 127])
    ]
    assert hits, "the original frame is not in the picture"
    y, x = hits[0]
    assert np.array_equal(picture[y + 128 + 4 : y + 256 + 4, x : x + 128], drawn[0])  # its groups just below
    assert y > 14  # room for the caption above


def test_groups_of_one_frame_get_distinct_outline_colours():
    model = tiny("timesformer")  # per-frame merging: token ids of one frame are spread over the sequence
    clip = clip_from_frames(textured(model), preprocess_for(model))
    _, groups = visualize_clip(model, clip, r=4)
    positions, tubelet, patch = adapter_for(model).token_positions(model)
    labels = label_maps(groups, positions, tubelet, 4, 4)
    drawn = draw(clip.display, labels, patch, scale=2)
    frame = labels[0].repeat(32, 0).repeat(32, 1)
    colours = palette(len(np.unique(labels)))
    outline = {}
    for g in np.unique(labels[0]):
        ys, xs = np.nonzero(frame == g)
        edge = drawn[0, ys.min(), xs[ys == ys.min()].min()]  # top-left corner pixel of the group: an outline
        outline[int(g)] = tuple(edge)
    assert len(set(outline.values())) == len(outline)  # every group in the frame has its own colour
    assert all(any(np.allclose(c, colours[k], atol=1) for k in range(len(colours))) for c in outline.values())


def test_caption_names_model_r_and_tokens_left():
    model = tiny("videomae")
    clip = clip_from_frames(textured(model), preprocess_for(model))
    _, groups = visualize_clip(model, clip, r=5)
    text = describe(model, "tiny", groups, r=5)
    assert text.startswith("tiny") and "r=5" in text and f"layer {3} of 3" in text
    assert f"{64 - 15} of 64 tokens left" in text
    _, groups = visualize_clip(model, clip, layer=0, r=5, mode="drop")
    text = describe(model, "tiny", groups, layer=0, r=5, mode="drop")
    assert "after layer 1 of 3" in text and "59 of 64 tokens left, 5 input tokens dropped" in text


def test_splice_crossings():
    model = tiny("vivit")
    pre = preprocess_for(model)
    red = clip_from_frames(np.broadcast_to(np.array(RED, np.uint8), (8, 64, 64, 3)), pre).pixel_values[0]
    blue = clip_from_frames(np.broadcast_to(np.array(BLUE, np.uint8), (8, 64, 64, 3)), pre).pixel_values[0]
    rows = splice_study(model, red, blue, "temporal", r=12)
    assert all(r["spliced_crossing"] == 0 and r["spliced_groups"] > 0 for r in rows)
    same = clip_from_frames(textured(model), pre).pixel_values[0]
    rows = splice_study(model, same, same, "temporal", r=12)
    assert sum(r["spliced_crossing"] for r in rows) > 0
    assert [r["spliced_crossing"] for r in rows] == [r["control_crossing"] for r in rows]  # A+A is the control


def test_splice_and_sides():
    a, b = torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)
    assert splice(a, b, "temporal")[:, 0, 0, 0].tolist() == [0, 0, 1, 1]
    assert splice(a, b, "spatial")[0, 0, 0].tolist() == [0] * 4 + [1] * 4
    sides = token_sides(tiny("videomae"), "temporal")  # 4 tubelet steps: first two from a
    assert sides.tolist() == [0] * 32 + [1] * 32
    assert crossing_groups(torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])) == (1, 2)


def test_confusion_difference(tmp_path):
    before, after = tmp_path / "a", tmp_path / "b"
    before.mkdir(), after.mkdir()
    names = ["a", "b", "c"]
    (before / "confusion.json").write_text(json.dumps({"classes": names, "matrix": [[5, 0, 0], [1, 4, 0], [0, 0, 5]]}))
    (after / "confusion.json").write_text(json.dumps({"classes": names, "matrix": [[5, 0, 0], [3, 2, 0], [0, 1, 4]]}))
    data = {"dataset": "k400", "root": "/data", "files": {"/data/val.txt": "ab12"}, "classes": "cd34"}
    for run, model in ((before, "aaaa"), (after, "bbbb")):  # other models, the same data: comparable
        (run / "manifest.json").write_text(json.dumps({"settings": {"model": {"fingerprint": model}, "data": data}}))
    same = confusion_change(before, before)
    assert not same["diff"].any() and same["lost_most"] == []
    change = confusion_change(before, after)
    assert change["diff"].tolist() == [[0, 0, 0], [2, -2, 0], [0, 1, -1]]
    assert [r["class"] for r in change["lost_most"]] == ["b", "c"]
    assert main(["confusion", str(before), str(after), "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_placements_have_equal_total_reduction():
    grid = placement_grid([4], ["merge"], num_layers=6)
    assert grid[0]["r"] == 0
    for setting in grid[1:]:
        assert setting["r"] * len(setting["layers"]) == 4 * 6
    assert set(placements(6)) == {"all", "first half", "second half", "early third", "middle third", "late third"}


def test_sweep_placements_cli(tmp_path):
    from test_eval import CLASSES, flat_video

    root = tmp_path / "data"
    for label, name in enumerate(CLASSES[:2]):
        (root / name).mkdir(parents=True)
        write_video(root / name / "v.mp4", flat_video(label))
    model_dir = tmp_path / "m"
    tiny("vivit", image_size=32, num_labels=2, num_hidden_layers=3).save_pretrained(model_dir)
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--model",
                str(model_dir),
                "--dataset",
                "folder",
                "--root",
                str(root),
                "--r",
                "2",
                "--placements",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    # 3 layers: all, first half = early third [0], second half [1, 2], middle third [1], late third [2]
    assert len(rows) == 1 + 5 and rows[1]["placement"].startswith("all")
    assert (out / "sweep.png").exists()
    late = next(r for r in rows if r["placement"].startswith("late third"))
    summary = json.loads((Path(late["out"]) / "summary.json").read_text())
    assert summary["merge"]["layers"] == [2] and summary["merge"]["r"] == 6  # 2 per layer x 3, all in layer 2
    assert len({r["out"] for r in rows}) == len(rows)  # one folder per setting


def test_eval_merges_only_in_chosen_layers(tmp_path):
    from test_eval import CLASSES, flat_video

    from vtome.evaluate import EvalConfig, run_eval

    root = tmp_path / "data"
    (root / CLASSES[0]).mkdir(parents=True)
    write_video(root / CLASSES[0] / "v.mp4", flat_video(0))
    model = tiny("vivit", image_size=32, num_labels=2, num_hidden_layers=3)
    run_eval(EvalConfig(model=model, dataset="folder", root=str(root), out=str(tmp_path / "o"), r=1, layers=[2]))
    assert vtome.last_run(model).tokens_per_layer == [17, 17, 16]  # 16 patches + class token; only layer 2 merges


def test_load_clip_takes_the_segment_frames_of_a_video_file(tmp_path):
    from vtome.data.video import segment_indices
    from vtome.visualize import load_clip

    total = 40
    video = np.zeros((total, 64, 64, 3), dtype=np.uint8)
    video[:] = (np.arange(total) * 6).astype(np.uint8)[:, None, None, None]  # each frame's grey level is its index
    path = tmp_path / "ramp.mp4"
    write_video(path, video)
    model = tiny("videomae")
    pre = preprocess_for(model)
    clip = load_clip(path, pre)
    want = np.array(segment_indices(total, pre.num_frames)) * 6
    got = clip.display.reshape(pre.num_frames, -1).mean(1)
    assert clip.display.shape[0] == pre.num_frames
    np.testing.assert_allclose(got, want, atol=4)  # lossy codec: within a few grey levels
