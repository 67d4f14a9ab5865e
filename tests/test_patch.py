"""Patching Hugging Face models: exactness, schedules, class tokens, modes, round trips and bad input."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import clip, input_tokens, tiny

import vtome

GRID = 16  # 64 px / 16 px patches: 4 x 4 per frame


def run(model, x, **kw):
    with torch.no_grad():
        return model(pixel_values=x, **kw).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("prop_attn", [False, True])
def test_r0_is_exact(family, attn, prop_attn):
    model = tiny(family, attn)
    x = clip(model)
    ref = run(model, x)
    vtome.patch(model, r=0, prop_attn=prop_attn)
    assert torch.equal(run(model, x), ref)
    assert vtome.last_run(model).tokens_per_layer == [input_tokens(model)] * 3


def test_unpatch_restores_exact_outputs_and_classes(family):
    model = tiny(family)
    classes = [type(m) for m in model.modules()]
    x = clip(model)
    ref = run(model, x)
    vtome.patch(model, r=3)
    assert not torch.equal(run(model, x), ref)
    vtome.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any("_vtome" in m.__dict__ for m in model.modules())
    assert not vtome.is_patched(model)
    assert torch.equal(run(model, x), ref)


def test_patching_twice_is_safe(family):
    model = tiny(family)
    x = clip(model)
    once = run(vtome.patch(model, r=3), x)
    twice = run(vtome.patch(vtome.patch(model, r=3), r=3), x)
    assert torch.equal(once, twice)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0  # state travels as arguments: no hooks


def test_token_counts_follow_schedule():
    model = vtome.patch(tiny("vivit"), r=5)  # 64 patches + class token
    run(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [60, 55, 50]
    vtome.settings(model).r = [0, 10, 2]
    run(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [65, 55, 53]
    vtome.settings(model).r = (6, -1.0)  # decreasing 12, 6, 0
    run(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [53, 47, 47]
    vtome.settings(model).r = 4
    vtome.settings(model).start_layer = 2
    run(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [65, 65, 61]


def test_layer_duplication_repeats_the_merge_step(family):
    model = vtome.patch(tiny(family), r=3, duplicate={1: 2}, trace_source=True)
    run(model, clip(model))
    out = vtome.last_run(model)
    n0 = input_tokens(model)
    if family == "timesformer":  # 16 per frame: 13, then 10 -> 7 -> 4, then 4 capped at 2
        assert out.tokens_per_layer == [1 + 4 * 13, 1 + 4 * 4, 1 + 4 * 2]
    else:
        assert out.tokens_per_layer == [n0 - 3, n0 - 12, n0 - 15]
    assert torch.equal(out.source.sum(1), torch.ones(2, n0))  # still a partition of the input
    with pytest.raises(ValueError, match="duplicate maps layer index"):
        vtome.settings(model).duplicate = {7: 1}


def test_divided_merges_same_r_in_every_frame():
    model = vtome.patch(tiny("timesformer"), r=3, trace_source=True)  # 4 frames x 16 patches + class token
    run(model, clip(model))
    out = vtome.last_run(model)
    assert out.tokens_per_layer == [1 + 4 * 13, 1 + 4 * 10, 1 + 4 * 7]
    # every output token covers patches of one frame only (TimeSformer order: 1 + slot*T + t)
    frame_of_input = torch.tensor([-1] + [i % 4 for i in range(64)])
    for b in range(2):
        for token in range(1, out.source.shape[1]):
            covered = frame_of_input[out.source[b, token] > 0]
            assert covered.numel() >= 1 and (covered == covered[0]).all()
        # and each frame keeps the same number of slots, in time-minor order
        frames = [frame_of_input[out.source[b, t] > 0][0].item() for t in range(1, out.source.shape[1])]
        assert frames == [t % 4 for t in range(len(frames))]


def test_cap_warns_once_and_limits_r():
    model = vtome.patch(tiny("vivit"), r=40)  # 64 mergeable tokens: layer 0 capped at 32, then 16, 8
    with pytest.warns(UserWarning, match="capped at 32") as record:
        run(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [33, 17, 9]
    assert len(record) == 3 and "layer 0" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, clip(model))  # already warned for these layers


@pytest.mark.parametrize("family", ["vivit", "timesformer"])
def test_class_token_is_never_merged(family):
    model = vtome.patch(tiny(family), r=6, trace_source=True)
    run(model, clip(model))
    out = vtome.last_run(model)
    assert torch.equal(out.size[:, 0], torch.ones(2, 1))
    assert torch.equal(out.source[:, 0, 0], torch.ones(2))
    assert (out.source[:, 0, 1:] == 0).all() and (out.source[:, 1:, 0] == 0).all()


@pytest.mark.parametrize("mode", ["merge", "random_merge", "hybrid"])
def test_sizes_and_sources_partition_the_input(family, mode):
    model = vtome.patch(tiny(family), r=5, trace_source=True, mode=mode, threshold=-1.0, seed=0)
    run(model, clip(model))
    out = vtome.last_run(model)
    n0 = input_tokens(model)
    assert torch.equal(out.size.sum((1, 2)), torch.full((2,), float(n0)))
    assert out.source.shape[2] == n0
    assert torch.equal(out.source.sum(1), torch.ones(2, n0))  # every input token in exactly one group
    assert torch.equal(out.source.sum(2, keepdim=True), out.size)


@pytest.mark.parametrize("mode", ["drop", "random_drop"])
def test_drop_modes_discard_tokens(family, mode):
    model = vtome.patch(tiny(family), r=4, trace_source=True, mode=mode, seed=0)
    run(model, clip(model))
    out = vtome.last_run(model)
    n_out = out.tokens_per_layer[-1]
    assert torch.equal(out.size, torch.ones(2, n_out, 1))  # nothing averaged
    assert torch.equal(out.source.sum(1).sum(1), torch.full((2,), float(n_out)))  # dropped patches are gone


def test_hybrid_threshold_switches_between_merge_and_drop():
    model = tiny("vivit")
    x = clip(model)
    merged = run(vtome.patch(model, r=5, mode="merge"), x)
    assert torch.equal(run(vtome.patch(model, r=5, mode="hybrid", threshold=-1.0), x), merged)
    vtome.patch(model, r=5, mode="hybrid", threshold=1.0, trace_source=True)
    run(model, x)
    covered = vtome.last_run(model).source.sum(1)
    assert (covered.sum(1) < input_tokens(model)).all()  # B partners were dropped


@pytest.mark.parametrize("mode", ["random_merge", "random_drop"])
def test_random_modes_reproducible_with_seed_and_differ_without(mode):
    model = tiny("vivit")
    x = clip(model)
    vtome.patch(model, r=6, mode=mode, seed=3)
    assert torch.equal(run(model, x), run(model, x))
    vtome.patch(model, r=6, mode=mode)
    assert not torch.equal(run(model, x), run(model, x))


def test_videomae_pools_by_size_weighted_mean():
    model = vtome.patch(tiny("videomae"), r=10)
    captured = {}
    model.fc_norm.register_forward_hook(lambda m, i, o: captured.setdefault("pooled", i[0]))
    x = clip(model)
    run(model, x)
    with torch.no_grad():
        out = model.videomae(pixel_values=x)  # the patched encoder returns the sizes with the tokens
    tokens, size = out.last_hidden_state, out.token_size
    assert torch.equal(size, vtome.last_run(model).size)
    assert (size > 1).any()
    expected = (tokens * size).sum(1) / size.sum(1)
    torch.testing.assert_close(captured["pooled"], expected)
    assert not torch.allclose(captured["pooled"], tokens.mean(1))  # the plain mean would be wrong


@pytest.mark.parametrize("family", ["videomae", "vivit"])
def test_prop_attn_same_under_eager_and_sdpa(family):
    x = clip(tiny(family))
    outs = [run(vtome.patch(tiny(family, attn), r=6, prop_attn=True), x) for attn in ("eager", "sdpa")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    plain = run(vtome.patch(tiny(family), r=6, prop_attn=False), x)
    assert not torch.allclose(outs[1], plain)  # the bias does something


def test_bf16_and_batch(family):
    model = tiny(family).to(torch.bfloat16)
    vtome.patch(model, r=4, prop_attn=True)
    x = clip(model, batch=3).to(torch.bfloat16)
    out = run(model, x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5) and torch.isfinite(out).all()
    single = run(model, x[1:2])  # each clip is merged on its own
    torch.testing.assert_close(out[1:2], single, rtol=0.05, atol=0.05)


def test_base_models_are_supported():
    from transformers import TimesformerModel, VideoMAEModel, VivitModel

    for family, cls in (("videomae", VideoMAEModel), ("vivit", VivitModel), ("timesformer", TimesformerModel)):
        full = tiny(family)
        model = cls(full.config).eval()
        x = clip(model)
        with torch.no_grad():
            ref = model(pixel_values=x).last_hidden_state
            vtome.patch(model, r=0)
            assert torch.equal(model(pixel_values=x).last_hidden_state, ref)
            vtome.patch(model, r=3)
            out = model(pixel_values=x).last_hidden_state
        assert out.shape[1] == vtome.last_run(model).tokens_per_layer[-1] < ref.shape[1]


def test_save_and_reload_from_local_directory(family, tmp_path):
    model = tiny(family)
    x = clip(model)
    ref = run(model, x)
    vtome.patch(model, r=3)
    merged = run(model, x)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert not vtome.is_patched(reloaded)
    assert torch.equal(run(reloaded, x), ref)
    assert torch.equal(run(vtome.patch(reloaded, r=3), x), merged)


def test_settings_change_without_repatching():
    model = vtome.patch(tiny("videomae"), r=2)
    s = vtome.settings(model)
    assert s.prop_attn is False  # the paper's VideoMAE default
    s.mode = "drop"
    s.r = 6
    run(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [58, 52, 46]
    with pytest.raises(ValueError, match="mode must be one of"):
        s.mode = "average"
    assert s.mode == "drop"


def test_family_defaults():
    assert vtome.settings(vtome.patch(tiny("vivit"), r=1)).prop_attn is True
    assert vtome.settings(vtome.patch(tiny("timesformer"), r=1)).prop_attn is True
    assert vtome.settings(vtome.patch(tiny("videomae"), r=1)).prop_attn is False


# -- bad input ---------------------------------------------------------------------------------------


def test_unsupported_model_type():
    with pytest.raises(TypeError, match="supported models: VideoMAEModel"):
        vtome.patch(torch.nn.Linear(2, 2), r=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": -1}, "r must be an int >= 0"),
        ({"r": 1.5}, "r must be an int >= 0"),
        ({"r": "10"}, "r must be an int >= 0"),
        ({"r": True}, "r must be an int >= 0"),
        ({"r": [1, 2]}, "list of 3 ints"),
        ({"r": (4, 2.0)}, "inflection"),
        ({"r": 2, "mode": "average"}, "mode must be one of merge, drop"),
        ({"r": 2, "mode": "hybrid", "threshold": 1.5}, r"threshold .* \[-1, 1\]"),
        ({"r": 2, "head_aggregation": "max"}, "head_aggregation must be one of mean, concat"),
        ({"r": 2, "start_layer": 7}, r"start_layer must be an int in \[0, 3\]"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    model = tiny("vivit")
    with pytest.raises(ValueError, match=message):
        vtome.patch(model, **kwargs)
    assert not vtome.is_patched(model)  # a failed patch leaves the model untouched


@pytest.mark.parametrize("family", ["videomae", "vivit", "timesformer"])
def test_wrong_number_of_frames(family):
    model = vtome.patch(tiny(family), r=2)
    x = clip(model)[:, :2]
    with pytest.raises(ValueError, match=f"expects clips of {model.config.num_frames} frames"):
        run(model, x)
    with pytest.raises(ValueError, match=r"looks like \[B, C, T, H, W\]: pass pixel_values.transpose\(1, 2\)"):
        run(model, clip(model).transpose(1, 2))
    with pytest.raises(ValueError, match="expects 3 channels at dim 2"):
        run(model, clip(model)[:, :, :1])


def test_unsupported_timesformer_attention_type():
    with pytest.raises(TypeError, match="divided_space_time"):
        vtome.patch(tiny("timesformer", attention_type="space_only"), r=1)


def test_prop_attn_needs_eager_or_sdpa():
    model = tiny("vivit")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'eager' or 'sdpa'"):
        vtome.patch(model, r=3)
    vtome.patch(model, r=3, prop_attn=False)  # the fast kernel stays usable without the bias
    vtome.settings(model).prop_attn = True
    with pytest.raises(ValueError, match="patch with prop_attn=False"):
        run(model, clip(model))


def test_last_run_needs_a_patched_model():
    with pytest.raises(ValueError, match="not patched"):
        vtome.last_run(tiny("vivit"))


def test_no_import_of_unused_families():
    code = (
        "import sys, vtome\n"
        "from transformers import VivitConfig, VivitModel\n"
        "vtome.patch(VivitModel(VivitConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,"
        " intermediate_size=32, image_size=32, num_frames=2, tubelet_size=[2,16,16])), r=1)\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and m.count('.') == 3))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "transformers.models.vivit.modeling_vivit" in out
    assert "videomae" not in out and "timesformer" not in out
