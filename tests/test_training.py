"""Training a merged model the way a Hugging Face user trains one: a plain PyTorch loop and `Trainer`, with
dropout, gradient checkpointing, bf16/fp16 autocast and gradient accumulation; gradients through the merge
step against finite differences; `save_pretrained` gives a stock model that patches again."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_FAMILIES, input_tokens, tiny
from test_vjepa2 import N0 as VJEPA2_TOKENS
from test_vjepa2 import tiny as vjepa2_tiny

import vtome
from vtome.adapters import adapter_for
from vtome.adapters.inputs import clip_kwargs, clip_shape
from vtome.merge import bipartite_match, merge_tokens

R = 3
TRAINED_FAMILIES = (*ALL_FAMILIES, "vjepa2")
DROPOUT = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


def model_of(family: str, dropout: bool = False) -> torch.nn.Module:
    """A tiny model of ``family`` (tests/conftest.py; V-JEPA 2 from tests/test_vjepa2.py), with dropout."""
    if family == "vjepa2":
        return vjepa2_tiny(**({"attention_probs_dropout_prob": 0.1, "drop_path_rate": 0.1} if dropout else {}))
    if family == "motionformer":  # no dropout in Motionformer
        return tiny(family)
    return tiny(family, **(DROPOUT if dropout else {}))


def batch(model: torch.nn.Module, n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random clips ``[n, T, C, H, W]`` and labels ``[n]``."""
    frames, channels, size = clip_shape(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, frames, channels, size, size, generator=g)
    return x, torch.arange(n) % 5


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(**clip_kwargs(model, x)).logits.float(), y)


def tokens_in(model: torch.nn.Module) -> int:
    return VJEPA2_TOKENS if hasattr(model.config, "frames_per_clip") else input_tokens(model)


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 8, **autocast: object) -> float:
    """``steps`` AdamW steps on one batch (training mode, under CPU ``autocast`` if given); the loss after
    over the loss before (evaluation mode, float32)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    with torch.no_grad():
        before = loss_of(model.eval(), x, y).item()
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", **autocast) if autocast else contextlib.nullcontext():
            loss = loss_of(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return loss_of(model.eval(), x, y).item() / before


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- a plain PyTorch loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_a_few_steps_reduce_the_loss_of_a_merged_model_with_dropout(family):
    model = vtome.patch(model_of(family, dropout=True), r=R)
    x, y = batch(model)
    assert fit(model, x, y) < 0.7
    assert vtome.last_run(model).tokens_per_layer[-1] < tokens_in(model)  # it ran merged


@pytest.mark.parametrize(
    "setting",
    [
        {"mode": "drop"},
        {"mode": "hybrid", "threshold": 0.8},  # data decide which pairs merge and which drop; the count is r
        {"mode": "random_merge", "seed": 0},
        {"mode": "random_drop", "seed": 0},
        {"mode": "random_merge"},  # unseeded: a new random matching every step (and replayed by checkpointing)
        {"prop_attn": True, "trace_source": True},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_every_mode_trains(setting):
    model = vtome.patch(model_of("videomae", dropout=True), r=R, **setting)
    x, y = batch(model)
    assert fit(model, x, y) < 0.7
    assert vtome.last_run(model).tokens_per_layer == [input_tokens(model) - R * (i + 1) for i in range(3)]


def test_hybrid_merges_some_pairs_and_drops_others_while_training():
    """Hybrid is data-dependent (which pairs merge, which drop) but its token count is fixed: shapes are static
    and the kept tokens get gradients."""
    model = vtome.patch(model_of("videomae"), r=R, mode="hybrid", threshold=0.8, trace_source=True).train()
    x, y = batch(model, 4)
    loss_of(model, x, y).backward()
    run = vtome.last_run(model)
    covered = run.source.sum(-1)  # [B, N] input tokens each output token covers
    dropped = (run.index < 0).sum(-1)  # [B] input tokens dropped
    assert (dropped > 0).any() and (covered > 1).any()  # both happened
    assert (covered.sum(-1) + dropped == input_tokens(model)).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_gradient_accumulation_matches_the_full_batch(family):
    """Clips are matched independently, so two accumulated half-batches give the full batch's gradient."""
    model = vtome.patch(model_of(family), r=R)  # eval mode: no dropout, the two runs see the same network
    x, y = batch(model, 4)
    loss_of(model, x, y).backward()
    full = grads(model)
    model.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        (loss_of(model, x[half], y[half]) / 2).backward()
    accumulated = grads(model)
    assert full.keys() == accumulated.keys() and len(full) > 10
    for name, grad in full.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# bf16 on every family; fp16 (slow on a CPU) on one
AUTOCAST = [(f, torch.bfloat16) for f in TRAINED_FAMILIES] + [("timesformer", torch.float16)]


@pytest.mark.parametrize(("family", "dtype"), AUTOCAST)
def test_autocast_training_reduces_the_loss(family, dtype):
    model = vtome.patch(model_of(family), r=R)
    x, y = batch(model)
    seen = []
    linear = next(m for m in adapter_for(model).layers(model)[-1].modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ratio = fit(model, x, y, dtype=dtype)
    assert set(seen[1:-1]) == {dtype} and seen[0] == seen[-1] == torch.float32  # trained in half, evaluated not
    assert vtome.last_run(model).tokens_per_layer[-1] < tokens_in(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert ratio < 0.7


# -- gradient checkpointing ----------------------------------------------------------------------------------


def checkpointed_grads(
    setting: dict, checkpointing: dict | None, family: str = "videomae", dropout: bool = True
) -> dict[str, torch.Tensor]:
    model = vtome.patch(model_of(family, dropout), r=R, **setting).train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    x, y = batch(model, 2)
    torch.manual_seed(7)  # dropout (and unseeded random modes) draw from the global RNG
    loss_of(model, x, y).backward()
    return grads(model)


@pytest.mark.parametrize(
    "setting",
    [{"mode": "hybrid", "threshold": 0.8}, {"mode": "drop"}, {"mode": "random_drop"}, {"trace_source": True}],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_checkpointing_with_dropout_gives_the_same_gradients(setting):
    """A recomputed layer replays the RNG (dropout, unseeded random modes) and sees the same track: the same
    matching, so the same gradients (tests/test_workflows.py covers merge and random_merge in every family)."""
    ref = checkpointed_grads(setting, None)
    got = checkpointed_grads(setting, {"use_reentrant": False})
    assert ref.keys() == got.keys() and len(ref) > 10
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["random_merge", "random_drop"])
def test_seeded_random_modes_need_no_rng_replay_under_checkpointing(mode):
    """With a seed the random matching is a function of (seed, layer, step): exact even when checkpointing
    does not restore the RNG (no dropout here, which would itself differ)."""
    no_replay = {"use_reentrant": False, "preserve_rng_state": False}
    ref = checkpointed_grads({"mode": mode, "seed": 3}, None, "vivit", dropout=False)
    got = checkpointed_grads({"mode": mode, "seed": 3}, no_replay, "vivit", dropout=False)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["random_merge", "random_drop"])
def test_unseeded_random_modes_are_refused_when_checkpointing_does_not_replay_the_rng(mode):
    """Without RNG replay the recompute draws another matching: the gradients would belong to a network that
    never ran (silently wrong). The forward must refuse and say to pass a seed."""
    model = vtome.patch(model_of("vivit"), r=R, mode=mode).train()
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False}
    )
    x, y = batch(model, 2)
    with pytest.raises(ValueError, match="seed"):
        loss_of(model, x, y).backward()


def test_trace_source_changes_no_gradient_and_its_map_is_detached():
    """trace_source keeps a [B, N, N0] float32 map per forward (memory, no autograd graph), nothing more."""
    ref = checkpointed_grads({}, None)
    got = checkpointed_grads({"trace_source": True}, None)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)
    model = vtome.patch(model_of("videomae"), r=R, trace_source=True).train()
    x, y = batch(model, 2)
    loss_of(model, x, y).backward()
    source = vtome.last_run(model).source
    assert source.shape == (2, input_tokens(model) - 3 * R, input_tokens(model)) and source.dtype == torch.float32
    assert not source.requires_grad


# -- finite differences --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merge", "drop", "hybrid"])
@pytest.mark.parametrize("protected", [0, 1])
def test_merge_step_gradients_match_finite_differences(mode, protected):
    """float64 features ``[G, N, C]`` and sizes through a fixed matching (the matching is piecewise constant in
    its metric: away from ties it does not move under a finite-difference step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, dtype=torch.float64, generator=g, requires_grad=True)
    size = torch.randint(1, 4, (2, 12, 1), generator=g).float()
    match = bipartite_match(torch.randn(2, 12, 6, generator=g), 4, protected=protected, mode=mode, threshold=0.3)
    assert torch.autograd.gradcheck(lambda x: merge_tokens(match, x, size)[0], (x,))


@pytest.mark.parametrize("mode", ["merge", "hybrid"])
def test_matching_on_the_merged_tokens_themselves_matches_finite_differences(mode):
    """Match on ``x`` and merge ``x``: the matching is recomputed at every finite-difference point and stays
    the same (a random point is away from ties), so the step is differentiable there and its gradient is
    the merge's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        return merge_tokens(bipartite_match(x, 3, mode=mode, threshold=0.2), x, None)[0]

    moved = bipartite_match(x.detach() + 1e-4 * torch.randn(x.shape, generator=g, dtype=x.dtype), 3, mode=mode)
    assert torch.equal(moved.dest, bipartite_match(x.detach(), 3, mode=mode).dest)  # away from ties
    assert torch.autograd.gradcheck(step, (x,))


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_whole_merged_model_gradients_match_finite_differences(family):
    """float64 model, directional derivatives of the logits along 3 random directions of the input clip."""
    model = vtome.patch(model_of(family), r=R).double()
    x, _ = batch(model, 2)
    x = x.double()
    g = torch.Generator().manual_seed(2)
    directions = torch.randn(3, *x.shape, dtype=torch.float64, generator=g)

    def logits(t: torch.Tensor) -> torch.Tensor:
        return model(**clip_kwargs(model, x + torch.einsum("d,d...->...", t, directions))).logits

    t = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        logits(t)
        index = vtome.last_run(model).index
        for step in (1e-6, -1e-6):  # gradcheck's steps
            logits(torch.full((3,), step, dtype=torch.float64))
            assert torch.equal(vtome.last_run(model).index, index)  # the matching holds
    assert vtome.last_run(model).tokens_per_layer[-1] < tokens_in(model)
    assert torch.autograd.gradcheck(logits, (t,), atol=1e-6, rtol=1e-4)


# -- Trainer, save_pretrained -------------------------------------------------------------------------------


class ClipDataset(torch.utils.data.Dataset):
    def __init__(self, model: torch.nn.Module, n: int) -> None:
        self.key = next(iter(clip_kwargs(model, torch.empty(0))))
        self.x, self.y = batch(model, n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.key: self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("family", ["videomae", "timesformer"])  # a joint and a divided family
def test_trainer_trains_saves_and_reloads_a_merged_model(family, tmp_path):
    pytest.importorskip("accelerate")  # Trainer needs it (a dev dependency)
    from transformers import AutoModelForVideoClassification, Trainer, TrainingArguments

    model = vtome.patch(model_of(family, dropout=True), r=R)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        bf16=True,  # CPU autocast
        activation_checkpointing=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ClipDataset(model, 12), eval_dataset=ClipDataset(model, 4))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    layers = adapter_for(model).layers(model)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert vtome.last_run(model).tokens_per_layer[-1] < tokens_in(model)  # it trained merged
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))

    trainer.save_model(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and "vtome" not in json.dumps(config)
    reloaded = AutoModelForVideoClassification.from_pretrained(
        tmp_path / "saved", attn_implementation=model.config._attn_implementation
    ).eval()
    assert not vtome.is_patched(reloaded) and type(reloaded) is type(model_of(family))
    state = reloaded.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name
    settings = vtome.settings(model)
    vtome.patch(reloaded, r=settings.r, mode=settings.mode, prop_attn=settings.prop_attn)
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()  # bf16 autocast off
    assert trained is model
    x, _ = batch(model, 2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**clip_kwargs(reloaded, x)).logits, model(**clip_kwargs(model, x)).logits, rtol=0, atol=0
        )
    assert vtome.last_run(reloaded).tokens_per_layer == vtome.last_run(model).tokens_per_layer
