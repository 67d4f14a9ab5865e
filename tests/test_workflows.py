"""What a Hugging Face user does with a model, on merged models (r > 0): gradient checkpointing, deepcopy,
pickling, torch.export and torch.compile, and no activations kept between forwards."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
from conftest import ALL_FAMILIES, clip, input_tokens, tiny

import vtome

R = 3


def logits(model, x, **kw):
    out = model(pixel_values=x, **kw)
    return out.logits if hasattr(out, "logits") else out[0]


def merged(family: str, attn: str = "sdpa", **kw) -> torch.nn.Module:
    return vtome.patch(tiny(family, attn), r=R, **kw)


@pytest.fixture(params=ALL_FAMILIES)
def any_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("mode", ["merge", "random_merge"])
def test_gradient_checkpointing_gives_the_same_gradients(any_family, reentrant, mode):
    x = clip(tiny(any_family))
    grads = []
    for checkpointing in (False, True):
        model = merged(any_family, mode=mode, seed=None).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        calls = []
        first = vtome.adapters.adapter_for(model).layers(model)[0]
        first.layernorm_after.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(5)  # random modes draw from the global RNG; checkpointing replays its state
        logits(model, x).square().sum().backward()
        assert len(calls) == (2 if checkpointing else 1)  # the layer really was recomputed
        assert vtome.last_run(model).tokens_per_layer[-1] < input_tokens(model)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("when", ["before", "after_no_grad", "after_grad"])
def test_deepcopy_is_an_independent_merging_model(any_family, when):
    model = merged(any_family, trace_source=True)
    x = clip(model)
    if when == "after_no_grad":
        with torch.no_grad():
            logits(model, x)
    elif when == "after_grad":
        logits(model, x).sum().backward()
    before = vtome.last_run(model)
    twin = copy.deepcopy(model)
    assert vtome.is_patched(twin) and vtome.settings(twin) is not vtome.settings(model)
    with torch.no_grad():
        out_twin = logits(twin, x[:1])
    assert vtome.last_run(model) is before  # running the copy leaves the original's record alone
    assert vtome.last_run(twin).tokens_per_layer[-1] < input_tokens(model)  # the copy merges
    with torch.no_grad():
        torch.testing.assert_close(out_twin, logits(model, x[:1]), rtol=0, atol=0)
    vtome.settings(twin).r = 0  # settings are the copy's own
    assert vtome.settings(model).r == R


def test_whole_model_pickle_round_trip_still_merges(any_family):
    model = merged(any_family)
    x = clip(model)
    with torch.no_grad():
        ref = logits(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, x), ref, rtol=0, atol=0)
    assert vtome.last_run(loaded).tokens_per_layer == vtome.last_run(model).tokens_per_layer
    assert vtome.last_run(loaded).tokens_per_layer[-1] < input_tokens(model)
    vtome.unpatch(loaded)
    assert type(loaded) is type(tiny(any_family))


def test_no_activation_outlives_the_forward(any_family):
    model = merged(any_family, trace_source=True)
    seen = []
    last = vtome.adapters.adapter_for(model).layers(model)[-1]
    handle = last.register_forward_hook(lambda m, i, o: seen.append(weakref.ref(o[0])))
    out = logits(model, clip(model))  # with autograd: the graph references every activation
    handle.remove()
    out_ref = weakref.ref(out)
    del out
    gc.collect()
    assert out_ref() is None and seen and seen[0]() is None
    run = vtome.last_run(model)
    assert not run.size.requires_grad and not run.source.requires_grad


def test_torch_export_matches_eager(any_family):
    model = merged(any_family)
    x = clip(model)
    with torch.no_grad():
        ref = logits(model, x)
        program = torch.export.export(model, (), {"pixel_values": x})
        out = program.module()(pixel_values=x)
    out = out.logits if hasattr(out, "logits") else out[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_vivit_user_padding_mask_is_refused_clearly():
    model = merged("vivit")
    x = clip(model)
    mask = torch.ones(2, input_tokens(model), dtype=torch.long)
    mask[:, -5:] = 0
    with pytest.raises(ValueError, match="attention_mask cannot follow merged tokens"):
        model(pixel_values=x, attention_mask=mask)
    vtome.settings(model).r = 0  # without merging the mask works as in the stock model
    ref = tiny("vivit")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x, attention_mask=mask), logits(ref, x, attention_mask=mask))


@pytest.mark.parametrize("family", ["videomae", "vivit"])
def test_deepcopy_then_switch_backend_agrees(family):
    model = merged(family, prop_attn=True)
    twin = copy.deepcopy(model)
    twin.config._attn_implementation = "eager"
    assert model.config._attn_implementation == "sdpa"
    x = clip(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(twin, x), logits(model, x), rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_matches_eager():
    model = merged("videomae")
    x = clip(model)
    with torch.no_grad():
        ref = logits(model, x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(logits(compiled, x), ref, rtol=1e-5, atol=1e-6)
    assert vtome.last_run(model).tokens_per_layer[-1] < input_tokens(model)


def test_output_hidden_states_and_attentions_still_work():
    model = merged("vivit", attn="eager")
    with torch.no_grad():
        out = model(pixel_values=clip(model), output_hidden_states=True, output_attentions=True)
    counts = [h.shape[1] for h in out.hidden_states]
    assert counts == [input_tokens(model), *vtome.last_run(model).tokens_per_layer]
    assert len(out.attentions) == 3 and out.attentions[1].shape[-1] == counts[1]
