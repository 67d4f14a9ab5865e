"""V-JEPA 2: rotary positions through merges, the size-weighted attentive pooler, the predictor on a merged
encoder, unmerge, FLOPs, workflows (checkpointing, copies, export, compile) and the tools' inputs."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
from transformers import VJEPA2Config, VJEPA2ForVideoClassification, VJEPA2Model
from transformers.models.vjepa2 import modeling_vjepa2 as hf

import vtome
from vtome.adapters import adapter_for
from vtome.adapters.inputs import clip_kwargs, clip_shape, input_name
from vtome.flops import FlopModel, pooler_flops, stack_flops
from vtome.merger import CapWarning
from vtome.patch import flop_model

FRAMES, SIZE, GRID = 8, 64, 4  # 4 x 4 patches per tubelet of 2 frames: 4 x 16 = 64 tokens
N0 = FRAMES // 2 * GRID * GRID
R = 6


def tiny_config(**overrides: object) -> VJEPA2Config:
    kw = dict(
        crop_size=SIZE,
        frames_per_clip=FRAMES,
        tubelet_size=2,
        patch_size=16,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_pooler_layers=1,
        pred_hidden_size=24,
        pred_num_attention_heads=2,
        pred_num_hidden_layers=1,
        pred_num_mask_tokens=1,
        num_labels=5,
        initializer_range=0.1,  # attention that depends on content and position (0.02 gives near-uniform maps)
    )
    return VJEPA2Config(**{**kw, **overrides})


def tiny(kind: str = "classifier", attn: str = "sdpa", **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = VJEPA2ForVideoClassification if kind == "classifier" else VJEPA2Model
    model = cls(tiny_config(**overrides))
    model.config._attn_implementation = attn
    return model.eval()


def clip(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values_videos=x).logits


# -- exactness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("prop_attn", [False, True])
def test_r0_is_bit_exact(attn, prop_attn):
    model, x = tiny(attn=attn), clip()
    ref = logits(model, x)
    vtome.patch(model, r=0, prop_attn=prop_attn)
    assert torch.equal(logits(model, x), ref)
    assert vtome.last_run(model).tokens_per_layer == [N0] * 3
    base = tiny("base", attn=attn)
    with torch.no_grad():
        ref = base(pixel_values_videos=x)
        vtome.patch(base, r=0, prop_attn=prop_attn)
        out = base(pixel_values_videos=x)
    for name in ("last_hidden_state", "masked_hidden_state"):
        assert torch.equal(out[name], ref[name])
    assert torch.equal(out.predictor_output.last_hidden_state, ref.predictor_output.last_hidden_state)


def _kept_ids(model: torch.nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Original ids ``[B, N]`` of the tokens leaving ``layer``, in the merged model's order (a copy of ``model``
    that stops merging after ``layer`` computes the same up to there)."""
    probe = copy.deepcopy(model)
    schedule = vtome.settings(model).schedule()
    vtome.settings(probe).r = [r if i <= layer else 0 for i, r in enumerate(schedule)]
    logits(probe, x)
    index = vtome.last_run(probe).index  # [B, N0]: the slot of each kept id, -1 dropped
    tokens = vtome.last_run(probe).tokens_per_layer[-1]
    ids = torch.full((index.shape[0], tokens), -1, dtype=torch.long)
    rows, cols = (index >= 0).nonzero(as_tuple=True)
    ids[rows, index[rows, cols]] = cols
    assert (ids >= 0).all()
    return ids


def _drop_reference(
    stock: torch.nn.Module, x: torch.Tensor, kept: list[torch.Tensor], naive: bool = False
) -> torch.Tensor:
    """Stock layers run on the kept tokens, each with its original id as ``position_mask`` (``naive``: no mask,
    so the stock ``arange`` ids), then the stock head."""
    encoder = stock.vjepa2.encoder
    with torch.no_grad():
        hidden = encoder.embeddings(x)
        ids = torch.arange(N0).expand(x.shape[0], -1)
        for layer, new_ids in zip(encoder.layer, kept):
            hidden = layer(hidden, None if naive else ids)[0]
            slot = (ids[:, None, :] == new_ids[:, :, None]).float().argmax(-1)  # where each kept id sits now
            hidden = hidden.gather(1, slot[..., None].expand(-1, -1, hidden.shape[-1]))
            ids = new_ids
        return stock.classifier(stock.pooler(encoder.layernorm(hidden)))


@pytest.mark.parametrize(("attn", "position_merge"), [("eager", "mean"), ("sdpa", "destination")])
def test_drop_equals_stock_layers_on_the_kept_tokens_with_their_ids(attn, position_merge):
    stock, x = tiny(attn=attn), clip()
    model = vtome.patch(copy.deepcopy(stock), r=R, mode="drop")
    vtome.settings(model).position_merge = position_merge
    kept = [_kept_ids(model, x, i) for i in range(3)]
    assert [k.shape[1] for k in kept] == [N0 - R, N0 - 2 * R, N0 - 3 * R]
    out = logits(model, x)
    torch.testing.assert_close(out, _drop_reference(stock, x, kept), rtol=1e-5, atol=1e-5)
    # the reference is sensitive to positions: the stock ids of a naive patch give other logits
    assert (out - _drop_reference(stock, x, kept, naive=True)).abs().max() > 1e-3


def test_merged_tokens_sit_at_the_mean_or_destination_position():
    model, x = vtome.patch(tiny(), r=[R, R, 0], trace_source=True), clip()
    seen = []
    last = adapter_for(model).layers(model)[-1].attention
    handle = last.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    grid = torch.stack(last.get_position_ids(torch.zeros(1, N0, 1)), -1).float()  # [N0, 3] stock (t, row, col)
    logits(model, x)
    run = vtome.last_run(model)  # the last layer does not merge: its input is the final grouping
    mean = run.source @ grid / run.source.sum(-1, keepdim=True)
    torch.testing.assert_close(seen[-1], mean)
    assert (seen[-1] != seen[-1].round()).any()  # merged tokens really sit between patches
    vtome.settings(model).position_merge = "destination"
    logits(model, x)
    covered = vtome.last_run(model).source  # every position a token covers; its own is among them
    own = seen[-1]
    assert (own == own.round()).all()
    hit = (grid[None, None] == own[:, :, None]).all(-1) & (covered > 0)  # [B, N, N0]
    assert hit.any(-1).all()
    handle.remove()


# -- the attentive pooler ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pooler_on_sized_tokens_equals_the_stock_pooler_on_duplicates(attn):
    model = vtome.patch(tiny(attn=attn), r=R)
    stock = tiny(attn=attn)
    tokens = torch.randn(2, 10, 48)
    size = torch.randint(1, 5, (1, 10, 1)).float()
    size = torch.cat([size, size.flip(1)])  # the same total per clip
    duplicated = torch.stack([t.repeat_interleave(s.long().flatten(), 0) for t, s in zip(tokens, size)])
    with torch.no_grad():
        torch.testing.assert_close(model.pooler(tokens, size), stock.pooler(duplicated), rtol=1e-5, atol=1e-5)
        assert (model.pooler(tokens, size) - stock.pooler(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_merged_logits_equal_the_stock_head_on_the_unmerged_clip(attn):
    """Merging duplicates every input position's covering token: the stock head on that grid is exact."""
    model, stock, x = vtome.patch(tiny(attn=attn), r=R), tiny(attn=attn), clip()
    with torch.no_grad():
        tokens = model.vjepa2(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        grid = vtome.unmerge(model, tokens)
        assert grid.shape == (2, N0, 48) and tokens.shape[1] == N0 - 3 * R
        ref = stock.classifier(stock.pooler(grid))
    torch.testing.assert_close(logits(model, x), ref, rtol=1e-5, atol=1e-5)


# -- the predictor and unmerge ------------------------------------------------------------------------------


def test_predictor_runs_on_the_merged_encoder_unmerged_to_the_grid():
    model, x = vtome.patch(tiny("base"), r=R, trace_source=True), clip()
    with torch.no_grad():
        out = model(pixel_values_videos=x)
        grid = vtome.unmerge(model, out.last_hidden_state)
        masks = [torch.arange(N0).expand(2, -1)]
        ref = model.predictor(grid, masks, masks).last_hidden_state
    assert out.last_hidden_state.shape == (2, N0 - 3 * R, 48) and out.token_size.shape == (2, N0 - 3 * R, 1)
    assert out.predictor_output.last_hidden_state.shape == (2, N0, 48)
    torch.testing.assert_close(out.predictor_output.last_hidden_state, ref)
    assert torch.equal(out.masked_hidden_state, grid) and torch.equal(out.predictor_output.target_hidden_state, grid)
    assert len(out.to_tuple()) == 4 and isinstance(out.to_tuple()[2], tuple)  # predictor output as a tuple too


def test_predictor_in_drop_modes_takes_the_kept_positions_as_context():
    model, x = vtome.patch(tiny("base"), r=R, mode="drop"), clip()
    with torch.no_grad():
        out = model(pixel_values_videos=x)
    index = vtome.last_run(model).index
    kept = (index >= 0).sum(1)
    assert (kept == N0 - 3 * R).all()
    assert out.masked_hidden_state.shape == (2, N0 - 3 * R, 48)
    assert out.predictor_output.last_hidden_state.shape == (2, N0, 48)  # it predicts every position
    order = torch.sort(index.masked_fill(index < 0, N0), dim=1).indices[:, : N0 - 3 * R]  # kept ids ascending
    ids = torch.arange(N0).expand(2, -1).gather(1, order.sort(1).values)
    slots = index.gather(1, ids)
    tokens = out.last_hidden_state.gather(1, slots[..., None].expand(-1, -1, 48))
    torch.testing.assert_close(out.masked_hidden_state, tokens)
    with pytest.raises(ValueError, match="names positions this merged encoder dropped"):
        model(pixel_values_videos=x, context_mask=[torch.arange(N0).expand(2, -1)])
    vtome.settings(model).mode = "hybrid"
    vtome.settings(model).threshold = 0.5
    with pytest.raises(ValueError, match="hybrid mode drops a data-dependent number"):
        model(pixel_values_videos=x)
    with torch.no_grad():
        assert model(pixel_values_videos=x, skip_predictor=True).predictor_output is None


@pytest.mark.parametrize("options", [{"mode": "merge"}, {"mode": "drop"}, {"duplicate": {1: 1}}])
def test_unmerge_gives_each_position_the_token_covering_it(options):
    model, x = vtome.patch(tiny(), r=R, trace_source=True, **options), clip()
    logits(model, x)
    run = vtome.last_run(model)
    tokens = torch.randn(2, run.tokens_per_layer[-1], 3)
    full = vtome.unmerge(model, tokens)
    covering = run.source.argmax(1)  # [B, N0]
    covered = run.source.sum(1) > 0
    expected = tokens.gather(1, covering[..., None].expand(-1, -1, 3)) * covered[..., None]
    assert torch.equal(full, expected)
    assert torch.equal(run.index, torch.where(covered, covering, -1))


# -- settings, modes, backends -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merge", "drop", "random_merge", "random_drop", "hybrid"])
def test_every_mode_and_schedule_runs_and_eager_matches_sdpa(mode):
    x = clip()
    out = {}
    for attn in ("eager", "sdpa"):
        model = vtome.patch(tiny(attn=attn), r=(R, 0.5), mode=mode, threshold=0.3, seed=0)
        out[attn] = logits(model, x)
        counts = vtome.last_run(model).tokens_per_layer
        assert counts[-1] < N0 and counts == sorted(counts, reverse=True)
    torch.testing.assert_close(out["eager"], out["sdpa"], rtol=1e-4, atol=1e-5)


def test_proportional_attention_and_position_merge_change_the_output():
    model, x = vtome.patch(tiny(), r=R), clip()
    assert vtome.settings(model).prop_attn and vtome.settings(model).position_merge == "mean"
    outs = [logits(model, x)]
    vtome.settings(model).position_merge = "destination"
    outs.append(logits(model, x))
    vtome.settings(model).prop_attn = False
    outs.append(logits(model, x))
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(outs, outs[1:]))
    with pytest.raises(ValueError, match="position_merge must be"):
        vtome.settings(model).position_merge = "nearest"


def test_unpatch_restores_exact_outputs_and_classes():
    model, x = tiny(), clip()
    classes = [type(m) for m in model.modules()]
    ref = logits(model, x)
    vtome.patch(model, r=R)
    assert not torch.equal(logits(model, x), ref)
    vtome.patch(model, r=R)  # twice is safe
    vtome.unpatch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any("_vtome" in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model, x), ref)


def test_bad_inputs_are_refused_clearly():
    model = vtome.patch(tiny(), r=R)
    with pytest.raises(ValueError, match="looks like \\[B, C, T, H, W\\]"):
        model(pixel_values_videos=clip().transpose(1, 2))
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(pixel_values_videos=torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(TypeError, match="VJEPA2Model"):
        vtome.patch(hf.VJEPA2Predictor(tiny_config()), r=1)


def test_output_hidden_states_and_attentions_follow_the_merges():
    model = vtome.patch(tiny(attn="eager"), r=R)
    with torch.no_grad():
        out = model(pixel_values_videos=clip(), output_hidden_states=True, output_attentions=True)
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts == [N0, *vtome.last_run(model).tokens_per_layer]
    assert len(out.attentions) == 3 and out.attentions[1].shape[-1] == counts[1]


def test_token_positions_and_tools_inputs():
    model = tiny()
    positions, tubelet, patch = adapter_for(model).token_positions(model)
    assert positions.shape == (N0, 3) and (tubelet, patch) == (2, 16)
    assert positions[GRID * GRID].tolist() == [2, 0, 0]  # time-major: the second tubelet starts at frame 2
    assert input_name(model) == "pixel_values_videos" and clip_shape(model) == (FRAMES, 3, SIZE)
    assert set(clip_kwargs(model, clip())) == {"pixel_values_videos"}


# -- FLOPs ---------------------------------------------------------------------------------------------------


def test_flop_ratio_counts_the_attentive_pooler():
    model = vtome.patch(tiny(), r=R)
    logits(model, clip())
    run, c = vtome.last_run(model), 48
    counts = run.tokens_per_layer
    encoder = stack_flops(N0, counts, c)
    pooled = encoder + pooler_flops(counts[-1], c, 1)
    full = stack_flops(N0, [N0] * 3, c) + pooler_flops(N0, c, 1)
    assert run.flop_ratio == pytest.approx(full / pooled)
    assert stack_flops(N0, counts, c, attention="joint", pooler=1) == pytest.approx(pooled)
    assert flop_model(model) == FlopModel("joint", c, None, pooler=1)
    assert flop_model(vtome.patch(tiny("base"), r=R)) == FlopModel("joint", c)
    budget = vtome.patch(tiny(), flops=0.5)
    logits(budget, clip())
    assert 1.9 <= vtome.last_run(budget).flop_ratio and vtome.settings(budget).flops == 0.5


# -- workflows -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    x = clip()
    grads = []
    for checkpointing in (False, True):
        model = vtome.patch(tiny(), r=R, mode="random_merge").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        calls = []
        model.vjepa2.encoder.layer[0].norm2.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(5)
        model(pixel_values_videos=x).logits.square().sum().backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_deepcopy_and_pickle_give_independent_merging_models():
    model, x = vtome.patch(tiny(), r=R), clip()
    ref = logits(model, x)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert torch.equal(logits(other, x), ref)
        assert vtome.last_run(other).tokens_per_layer[-1] == N0 - 3 * R
    vtome.settings(twin).r = 0
    assert vtome.settings(model).r == R


def test_torch_export_and_compile_match_eager():
    model, x = vtome.patch(tiny(), r=R), clip()
    ref = logits(model, x)
    with torch.no_grad():
        program = torch.export.export(model, (), {"pixel_values_videos": x})
        torch.testing.assert_close(program.module()(pixel_values_videos=x).logits, ref, rtol=1e-4, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(pixel_values_videos=x).logits, ref, rtol=1e-5, atol=1e-6)
    assert vtome.last_run(model).tokens_per_layer[-1] == N0 - 3 * R


# -- tools -----------------------------------------------------------------------------------------------------


def test_eval_preprocessing_reads_the_vjepa2_video_processor(tmp_path):
    from vtome.data.transforms import preprocess_for

    model = tiny()
    pre = preprocess_for(model)
    assert (pre.num_frames, pre.crop, pre.resize) == (FRAMES, SIZE, int(SIZE * 256 / 224))
    assert pre.mean == (0.485, 0.456, 0.406)
    processor = {"crop_size": {"height": SIZE, "width": SIZE}, "size": {"shortest_edge": 80}, "image_mean": [0.5] * 3}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(processor))
    pre = preprocess_for(model, tmp_path)
    assert (pre.resize, pre.mean) == (80, (0.5, 0.5, 0.5))


def test_local_checkpoint_loads_and_flop_ratio_tool_runs(tmp_path):
    from vtome.sweep import flop_ratio
    from vtome.zoo import builtin_names, load_model

    tiny().save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert type(model).__name__ == "VJEPA2ForVideoClassification"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CapWarning)
        assert flop_ratio(model, r=R) > 1.2
    assert "vjepa2-large" in builtin_names() and "demo-vjepa2" in builtin_names()


def test_eval_runs_a_local_vjepa2_checkpoint_with_its_processor(tmp_path):
    from vtome.data.video import write_video
    from vtome.evaluate import EvalConfig, run_eval

    model_dir, root = tmp_path / "model", tmp_path / "data"
    tiny(crop_size=32, num_labels=2).save_pretrained(model_dir)
    processor = {"crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 36}}
    (model_dir / "video_preprocessor_config.json").write_text(json.dumps(processor))
    for label, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        write_video(root / name / "v.mp4", torch.full((10, 40, 48, 3), 60 + 100 * label, dtype=torch.uint8).numpy())
    out = tmp_path / "out"
    summary = run_eval(EvalConfig(model=str(model_dir), dataset="folder", root=str(root), out=str(out), r=2))
    assert summary["num_evaluated"] == 2 and summary["num_failed"] == 0 and summary["merge"]["r"] == 2


def test_measurement_helpers_change_only_what_they_claim():
    from vtome.demo.vjepa2_positions import VARIANTS, variant

    base, x = tiny(), clip()
    out = {name: logits(variant(base, name, 0.5), x) for name in VARIANTS}
    mean = out["merge, mean positions (default)"]
    changed = ("merge, destination positions", "merge, naive positions (stock ids)", "merge, pooler not size-weighted")
    for name in changed:
        assert (out[name] - mean).abs().max() > 1e-4, name
    model = variant(base, "merge, naive positions (stock ids)", 0.5)
    logits(model, x)
    assert vtome.last_run(model).flop_ratio >= 1.9


def test_visualisation_draws_the_merge_groups():
    from vtome.visualize import Clip, visualize_clip

    model = tiny()
    display = (torch.rand(FRAMES, SIZE, SIZE, 3) * 255).byte().numpy()
    drawn, groups = visualize_clip(model, Clip(clip(1), display), r=R)
    assert drawn.shape == display.shape and groups.shape == (N0,)
    assert len(groups.unique()) == N0 - 3 * R and not vtome.is_patched(model)


def test_demo_training_script_runs_for_vjepa2(tmp_path):
    from vtome.demo.train import train
    from vtome.zoo import load_model

    tiny_demo = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "image_size": 32}
    record = train("vjepa2", tmp_path, steps=2, batch_size=4, eval_clips=15, log_every=0, overrides=tiny_demo)
    assert record["steps"] == 2 and 0.0 <= record["test"]["acc"] <= 1.0
    model = load_model(str(tmp_path), attn=None)
    assert type(model).__name__ == "VJEPA2ForVideoClassification" and model.config.num_labels == 15
    assert model.config.crop_size == 32 and model.config.frames_per_clip == 16


def test_bundled_vjepa2_demo_model_reaches_its_recorded_accuracy():
    from vtome.demo import checkpoints
    from vtome.demo.train import evaluate
    from vtome.zoo import load_model

    record = checkpoints.training_record("vjepa2")
    model = load_model("demo-vjepa2")
    assert type(model).__name__ == "VJEPA2ForVideoClassification"
    got = evaluate(model, record["data_seed"], "test", 30)  # the first 30 held-out clips (2 per class)
    assert got["acc"] >= record["test"]["acc"] - 0.15


def test_bench_measures_a_vjepa2_checkpoint(tmp_path):
    from vtome.bench import BenchConfig, run_benchmark

    tiny().save_pretrained(tmp_path)
    report = run_benchmark(BenchConfig(model=str(tmp_path), rs=[0, R], warmup=0, repeats=1))
    merged = next(row for row in report["results"] if row["r"] == R)
    assert merged["tokens_per_layer"] == [N0 - R, N0 - 2 * R, N0 - 3 * R]
    assert merged["flop_ratio"] > 1.2 and merged["speedup"] > 0
