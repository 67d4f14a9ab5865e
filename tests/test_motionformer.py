"""Motionformer: our implementation, official checkpoint loading, and per-frame merging."""

from __future__ import annotations

import pytest
import torch

import vtome
from vtome.architectures.motionformer import (
    MotionformerConfig,
    MotionformerForVideoClassification,
    TrajectoryAttention,
    load_official,
    official_to_ours,
    ours_to_official,
)
from vtome.patch import last_run_flops
from vtome.zoo import load_model


def tiny(**kw) -> MotionformerForVideoClassification:
    torch.manual_seed(0)
    cfg = dict(
        num_labels=5,
        image_size=32,
        patch_size=16,
        num_frames=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return MotionformerForVideoClassification(MotionformerConfig(**{**cfg, **kw})).eval()


def clip(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_trajectory_attention(attn: TrajectoryAttention, x: torch.Tensor, frames: int) -> torch.Tensor:
    """Loop version written from the paper's description, for one clip ``[N, C]``."""
    n, c = x.shape
    h, d, p = attn.num_heads, attn.head_dim, (n - 1) // frames
    q, k, v = (t.view(n, h, d) for t in attn.qkv(x).chunk(3, dim=-1))
    heads_out = torch.zeros(n, h, d)
    for head in range(h):
        weights = ((q[0, head] * attn.scale) @ k[:, head].T).softmax(-1)
        heads_out[0, head] = weights @ v[:, head]
    points = torch.zeros(n - 1, frames, h, d)  # trajectory point of each query in each frame
    for s in range(n - 1):
        for f in range(frames):
            keys = slice(1 + f * p, 1 + (f + 1) * p)
            for head in range(h):
                w = (attn.scale * (q[1 + s, head] @ k[keys, head].T)).softmax(-1)
                points[s, f, head] = w @ v[keys, head]
    flat = points.reshape(n - 1, frames, c)
    for s in range(n - 1):
        own = flat[s, s // p]  # the point in the query's own frame
        q2 = attn.proj_q(own).view(h, d) * attn.scale
        k2 = attn.proj_kv(flat[s]).chunk(2, dim=-1)[0].view(frames, h, d)
        for head in range(h):
            w = (k2[:, head] @ q2[head]).softmax(-1)
            heads_out[1 + s, head] = w @ points[s, :, head]  # original code: values are the points
    return attn.proj(heads_out.reshape(n, c))


def test_trajectory_attention_matches_loop_reference():
    model = tiny()
    attn = model.layers[0].attention
    x = torch.randn(1, 1 + 2 * 4, 32)
    with torch.no_grad():
        out, keys = attn(x, frames=2)
        ref = reference_trajectory_attention(attn, x[0], frames=2)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
    assert keys.shape == (1, 2, 9, 16)  # per head


def test_forward_shapes_and_epic_heads():
    assert tiny()(pixel_values=clip()).logits.shape == (2, 5)
    epic = tiny(num_labels=[3, 7])
    assert epic(pixel_values=clip()).logits.shape == (2, 10)  # verb logits then noun logits
    base = MotionformerConfig()
    assert (base.temporal_positions, base.patches_per_frame) == (8, 196)


def test_r0_patched_is_exact_and_unpatch_restores():
    model = tiny()
    x = clip()
    with torch.no_grad():
        ref = model(pixel_values=x).logits
        vtome.patch(model, r=0)
        assert torch.equal(model(pixel_values=x).logits, ref)
        vtome.patch(model, r=1)
        assert not torch.equal(model(pixel_values=x).logits, ref)
        vtome.unpatch(model)
        assert torch.equal(model(pixel_values=x).logits, ref)


def test_tokens_per_frame_follow_the_schedule():
    model = tiny(image_size=64)  # 2 temporal positions x 16 patches + class token
    vtome.patch(model, r=3, trace_source=True)
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 4, 3, 64, 64))
    run = vtome.last_run(model)
    assert run.input_tokens == 33 and run.tokens_per_layer == [1 + 2 * 13, 1 + 2 * 10]
    assert torch.equal(run.size.sum((1, 2)), torch.full((2,), 33.0))
    assert torch.equal(run.size[:, 0], torch.ones(2, 1))  # class token untouched
    frame = torch.tensor([-1] + [i // 16 for i in range(32)])
    for b in range(2):
        for token in range(1, run.source.shape[1]):  # every group inside one frame, frame-major order
            covered = frame[run.source[b, token] > 0]
            assert (covered == (token - 1) // 10).all()
    unmerged, merged = last_run_flops(model)
    assert unmerged / merged > 1.0


def test_official_state_dict_loads_and_gives_identical_outputs(tmp_path):
    for labels in (5, [3, 7]):
        ours = tiny(num_labels=labels)
        heads = len(labels) if isinstance(labels, list) else 1
        official = ours_to_official(ours.state_dict(), heads=heads)
        official["patch_embed.proj.weight"] = torch.zeros(32, 3, 16, 16)  # unused 2D embedding, as released
        assert (
            "blocks.1.attn.proj_kv.weight" in official and "temp_embed" in official and "pre_logits.fc.bias" in official
        )
        assert ("head1.weight" in official) == (heads == 2)
        assert all(official_to_ours(k) in (None, *ours.state_dict()) for k in official)
        path = tmp_path / f"mf_{heads}.pyth"
        torch.save({"model_state": official, "epoch": 35}, path)
        loaded = load_official(
            path, image_size=32, patch_size=16, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
        )
        assert loaded.config.num_labels == labels  # classes read from the checkpoint's heads
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=clip()).logits, ours(pixel_values=clip()).logits)


def test_checkpoint_with_wrong_shape_or_keys_gives_clear_error(tmp_path):
    official = ours_to_official(tiny().state_dict())
    official["blocks.0.attn.qkv.weight"] = torch.zeros(10, 10)
    del official["norm.bias"]
    official["blocks.0.attn.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pyth"
    torch.save({"model_state": official}, path)
    with pytest.raises(ValueError) as err:
        load_official(
            path, image_size=32, patch_size=16, num_frames=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2
        )
    message = str(err.value)
    assert "blocks.0.attn.qkv.weight: checkpoint (10, 10) vs model (96, 32)" in message
    assert "missing: layernorm.bias" in message and "unexpected: blocks.0.attn.extra.weight" in message
    torch.save({"something": 1}, tmp_path / "nohead.pyth")
    with pytest.raises(ValueError, match="no classifier head"):
        load_official(tmp_path / "nohead.pyth")


def test_builtin_name_and_checkpoint_path_load_through_the_zoo(tmp_path):
    model = load_model("motionformer-base")
    assert model.config.temporal_positions == 8 and len(model.layers) == 12
    ours = MotionformerForVideoClassification(MotionformerConfig(num_labels=174, num_hidden_layers=1))
    official = ours_to_official(ours.state_dict())
    path = tmp_path / "ssv2.pyth"
    torch.save({"model_state": official}, path)
    with pytest.raises(ValueError, match="layers"):
        load_model(str(path))  # a 1-layer checkpoint does not fit the 12-layer preset: clear error


TINY_CFG = """
DATA:
  NUM_FRAMES: 4
  TRAIN_CROP_SIZE: 32
VIT:
  PATCH_SIZE: 16
  PATCH_SIZE_TEMP: 2
  EMBED_DIM: 32
  DEPTH: 2
  NUM_HEADS: 2
  QKV_BIAS: true
  USE_MLP: true
  ATTN_LAYER: trajectory
"""


@pytest.fixture
def tiny_pyth(tmp_path):
    path = tmp_path / "tiny.pyth"
    torch.save({"model_state": ours_to_official(tiny().state_dict()), "cfg": TINY_CFG}, path)
    return path


def test_checkpoint_config_is_read_and_tools_accept_pyth_files(tiny_pyth, tmp_path):
    from vtome.bench import BenchConfig, run_benchmark
    from vtome.visualize import visualize

    model = load_model(str(tiny_pyth))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=clip()).logits, tiny()(pixel_values=clip()).logits)
    report = run_benchmark(BenchConfig(model=str(tiny_pyth), rs=[0, 1], warmup=0, repeats=1))
    assert report["results"][1]["tokens_per_layer"] == [1 + 2 * 3, 1 + 2 * 2]
    assert report["results"][1]["flop_ratio"] > 1.0
    frames = (torch.rand(6, 32, 32, 3) * 255).byte().numpy()
    from vtome.data.video import write_video

    write_video(tmp_path / "c.mp4", frames)
    paths = visualize(tmp_path / "c.mp4", str(tiny_pyth), tmp_path / "viz", r=1)
    assert paths["png"].exists()
