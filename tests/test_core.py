"""The core's promises: settings are values (what settings(model) shows is what the next forward does), a user's
subclass keeps its own code, a compiled forward is one graph with no host synchronisation, and API edges give
clear errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import transformers
from conftest import ALL_FAMILIES, clip, input_tokens, tiny
from torch.utils._python_dispatch import TorchDispatchMode

import vtome
from vtome.merge import MODES
from vtome.settings import FrozenDict, Inflection


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def patch_kwargs(settings: vtome.MergeSettings) -> dict:
    """What to pass to vtome.patch for a fresh model with exactly these settings."""
    out = {k: v for k, v in settings.to_dict().items() if k not in ("num_layers", "flops")}
    per_layer = isinstance(settings.r, tuple) and not isinstance(settings.r, Inflection)
    out["r"] = list(settings.r) if per_layer else settings.r
    return out


# -- settings are values ---------------------------------------------------------------------------------

# field -> (family, value patched with, value assigned afterwards)
CHANGES = {
    "r": ("vivit", 2, [0, 5, 1]),
    "r (schedule)": ("vivit", 2, (6, -1.0)),
    "mode": ("videomae", 4, "drop"),
    "prop_attn": ("vivit", 4, False),
    "head_aggregation": ("videomae", 4, "concat"),
    "threshold": ("vivit", {"r": 4, "mode": "hybrid"}, 0.9),
    "start_layer": ("timesformer", 2, 2),
    "trace_source": ("vivit", 3, True),
    "seed": ("videomae", {"r": 4, "mode": "random_merge", "seed": 0}, 7),
    "duplicate": ("vivit", 3, {1: 2}),
    "layers": ("videomae", 4, [1]),
    "order": ("vivit", 4, "spatial"),
    "divided": ("timesformer", 3, "aligned"),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_what_settings_show_is_what_the_next_forward_does(name):
    family, patched_with, value = CHANGES[name]
    field = name.split()[0]
    kwargs = patched_with if isinstance(patched_with, dict) else {"r": patched_with}
    model = vtome.patch(tiny(family), **kwargs)
    x = clip(model)
    before = logits(model, x)
    s = vtome.settings(model)
    setattr(s, field, value)
    after = logits(model, x)
    # A fresh model patched with what the settings now show does exactly the same.
    twin = vtome.patch(tiny(family), **patch_kwargs(s))
    assert torch.equal(logits(twin, x), after)
    assert vtome.last_run(twin).tokens_per_layer == vtome.last_run(model).tokens_per_layer
    assert (vtome.last_run(model).source is None) == (not s.trace_source)
    if field not in ("trace_source",):
        assert not torch.equal(before, after), f"assigning {field} changed nothing"


def test_position_merge_shows_what_the_forward_does():
    from test_vjepa2 import clip as vjepa2_clip
    from test_vjepa2 import tiny as tiny_vjepa2

    model = vtome.patch(tiny_vjepa2(), r=4)
    x = vjepa2_clip()
    with torch.no_grad():
        before = model(pixel_values_videos=x).logits
        vtome.settings(model).position_merge = "destination"
        after = model(pixel_values_videos=x).logits
        twin = vtome.patch(tiny_vjepa2(), r=4, position_merge="destination")
        assert torch.equal(twin(pixel_values_videos=x).logits, after)
    assert not torch.equal(before, after)


def test_settings_cannot_be_edited_in_place():
    model = vtome.patch(tiny("vivit"), r=[2, 2, 2], duplicate={0: 1}, layers=[0, 1, 2])
    s = vtome.settings(model)
    assert s.r == (2, 2, 2) and s.layers == (0, 1, 2) and s.duplicate == {0: 1}
    with pytest.raises(TypeError):
        s.r[0] = 0
    with pytest.raises(AttributeError):
        s.layers.append(7)
    for edit in (lambda d: d.__setitem__(0, 5), lambda d: d.pop(0), lambda d: d.update({1: 1}), lambda d: d.clear()):
        with pytest.raises(TypeError, match="cannot be changed in place"):
            edit(s.duplicate)
    run_before = logits(model, clip(model))
    assert s.duplicate == {0: 1} and s.schedule() == [2, 2, 2]
    # the settings' own copy: the caller's list and dict are not shared
    r, duplicate = [1, 1, 1], {1: 1}
    s.r, s.duplicate = r, duplicate
    r[0], duplicate[1] = 50, 50
    assert s.r == (1, 1, 1) and s.duplicate == {1: 1}
    assert not torch.equal(logits(model, clip(model)), run_before)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("r", [1, 2, 3, 4]),
        ("r", [1, -5, 1]),
        ("r", (4, 2.0)),
        ("layers", [7]),
        ("layers", "01"),
        ("duplicate", {0: -1}),
        ("duplicate", {"0": 1}),
        ("duplicate", {0: 1.5}),
        ("duplicate", {True: 1}),
        ("threshold", float("nan")),
        ("seed", 1.5),
        ("mode", "average"),
        ("prop_attn", "yes"),
    ],
)
def test_bad_assignments_are_refused_and_change_nothing(name, value):
    model = vtome.patch(tiny("vivit"), r=[2, 2, 2])
    s = vtome.settings(model)
    before = s.to_dict()
    with pytest.raises(ValueError):
        setattr(s, name, value)
    assert s.to_dict() == before


def test_unknown_names_and_model_facts_cannot_be_assigned():
    s = vtome.settings(vtome.patch(tiny("vivit"), r=2))
    with pytest.raises(AttributeError, match="no setting 'rr'"):
        s.rr = 10
    with pytest.raises(ValueError, match="num_layers is a fact"):
        s.num_layers = 99
    with pytest.raises(AttributeError):
        del s.r
    assert s.num_layers == 3 and not hasattr(s, "rr")


def test_a_budget_is_forgotten_when_the_schedule_is_assigned():
    model = vtome.patch(tiny("vivit"), flops=0.5)
    s = vtome.settings(model)
    assert s.flops == 0.5
    s.mode = "drop"  # not a schedule setting: the budget still describes r
    assert s.flops == 0.5
    s.r = 1
    assert s.flops is None
    assert s.to_dict()["flops"] is None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_carry_the_settings_as_shown(how):
    model = vtome.patch(tiny("videomae"), r=[2, 2, 2])
    vtome.settings(model).r = [0, 6, 0]
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    x = clip(model)
    assert torch.equal(logits(twin, x), logits(model, x))
    assert vtome.last_run(twin).tokens_per_layer == [64, 58, 58]
    vtome.settings(twin).r = 1
    assert vtome.settings(model).r == (0, 6, 0)  # independent


def test_frozen_dict_round_trips_as_a_dict():
    d = FrozenDict({1: 2})
    assert pickle.loads(pickle.dumps(d)) == d and copy.deepcopy(d) == {1: 2}
    assert type(pickle.loads(pickle.dumps(d))) is FrozenDict
    import json

    assert json.loads(json.dumps(d)) == {"1": 2}


# -- a user's subclass ----------------------------------------------------------------------------------


class VideoMAEForVideoClassification(transformers.VideoMAEForVideoClassification):
    """A user's class that keeps the stock name: temperature-scaled logits and an extra method."""

    def forward(self, pixel_values=None, labels=None, **kwargs):
        out = super().forward(pixel_values, labels, **kwargs)
        out.logits = out.logits / 100.0
        return out

    def temperature(self) -> float:
        return 100.0


class QuietLayer(transformers.models.vivit.modeling_vivit.VivitLayer):
    """A user's layer subclass that adds a method but keeps the stock forward."""

    def describe(self) -> str:
        return "quiet"


class LoudLayer(transformers.models.vivit.modeling_vivit.VivitLayer):
    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return super().forward(hidden_states, attention_mask, **kwargs) * 2


def user_model() -> VideoMAEForVideoClassification:
    stock = tiny("videomae")
    model = VideoMAEForVideoClassification(stock.config).eval()
    model.load_state_dict(stock.state_dict())
    return model


def test_a_users_subclass_keeps_its_forward_and_methods():
    model = user_model()
    x = clip(model)
    ref = logits(model, x)
    vtome.patch(model, r=0)
    assert isinstance(model, VideoMAEForVideoClassification) and model.temperature() == 100.0
    assert torch.equal(logits(model, x), ref)  # the user's forward (temperature) still runs: exact at r = 0
    vtome.settings(model).r = 4
    merged = logits(model, x)
    assert vtome.last_run(model).tokens_per_layer == [60, 56, 52]
    assert merged.abs().max() < ref.abs().max() * 10  # still scaled by the user's forward
    for twin in (copy.deepcopy(model), torch.load(_saved(model), weights_only=False)):
        assert isinstance(twin, VideoMAEForVideoClassification) and vtome.is_patched(twin)
        assert torch.equal(logits(twin, x), merged)
    vtome.unpatch(model)
    assert type(model) is VideoMAEForVideoClassification
    assert torch.equal(logits(model, x), ref)


def _saved(model) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_subclassed_layers_are_patched_and_forward_overrides_refused():
    model = tiny("vivit")
    x = clip(model)
    ref = logits(model, x)
    for layer in model.vivit.layers:
        layer.__class__ = QuietLayer
    vtome.patch(model, r=0)
    assert all(layer.describe() == "quiet" for layer in model.vivit.layers)
    assert torch.equal(logits(model, x), ref)
    vtome.unpatch(model)
    assert all(type(layer) is QuietLayer for layer in model.vivit.layers)
    model.vivit.layers[1].__class__ = LoudLayer
    with pytest.raises(TypeError, match="LoudLayer: it overrides forward"):
        vtome.patch(model, r=2)
    assert not vtome.is_patched(model) and type(model.vivit.layers[0]) is QuietLayer


# -- compiled forwards: one graph, no recompiles, no host synchronisation ------------------------------


class HostSyncs(TorchDispatchMode):
    """Counts the operations that copy a value to the host (what stalls a GPU and breaks CUDA graphs)."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::equal")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_a_merged_forward_makes_no_host_synchronisation(family, mode):
    model = vtome.patch(tiny(family), r=3, mode=mode, seed=0, duplicate={1: 1})
    x = clip(model)
    with HostSyncs() as syncs, torch.no_grad():
        model(pixel_values=x)
    assert syncs.seen == []
    assert vtome.last_run(model).tokens_per_layer[-1] < input_tokens(model)


@pytest.mark.parametrize(
    ("family", "mode"), [("videomae", "merge"), ("timesformer", "hybrid"), ("videomae", "random_drop")]
)
def test_compiled_forward_is_one_graph_without_recompiles(family, mode):
    torch._dynamo.reset()
    model = vtome.patch(tiny(family), r=3, mode=mode, seed=0, duplicate={1: 1}, trace_source=True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for seed in (1, 2, 3):
            x = clip(model, seed=seed)
            torch.testing.assert_close(compiled(pixel_values=x).logits, model(pixel_values=x).logits)


# -- API edges -----------------------------------------------------------------------------------------


def test_unmerge_refuses_what_is_not_a_tensor():
    model = vtome.patch(tiny("vivit"), r=2)
    with torch.no_grad():
        hidden = model.vivit(pixel_values=clip(model)).last_hidden_state
    with pytest.raises(TypeError, match="torch.Tensor"):
        vtome.unmerge(model, hidden.tolist())
    with pytest.raises(TypeError, match="torch.Tensor"):
        vtome.unmerge(model, hidden.numpy())
    assert vtome.unmerge(model, hidden).shape == (2, input_tokens(model), 64)


@pytest.mark.parametrize("family", ["timesformer", "motionformer"])
@pytest.mark.parametrize("mode", ["merge", "drop", "hybrid"])
def test_an_empty_batch_runs_as_in_the_stock_model(family, mode):
    model = tiny(family)
    x = clip(model)[:0]
    stock = logits(model, x)
    vtome.patch(model, r=3, mode=mode)
    assert logits(model, x).shape == stock.shape == (0, 5)


def test_unpatch_of_a_submodule_is_refused_and_leaves_the_model_patched():
    model = vtome.patch(tiny("videomae"), r=2)
    x = clip(model)
    merged = logits(model, x)
    with pytest.raises(ValueError, match="part of a patched model"):
        vtome.unpatch(model.videomae.encoder.layer[0])
    assert vtome.is_patched(model) and torch.equal(logits(model, x), merged)
    with pytest.raises(ValueError, match="part of a patched model"):
        vtome.patch(model.videomae, r=1)


def test_unpatch_of_a_container_of_patched_modules_is_refused():
    model = vtome.patch(tiny("videomae"), r=2)
    with pytest.raises(ValueError, match="part of a patched model"):
        vtome.unpatch(model.videomae.encoder.layer)  # a ModuleList vtome did not swap, holding patched layers
    assert vtome.is_patched(model) and logits(model, clip(model)).shape == (2, 5)


def test_a_module_of_another_class_at_a_patched_place_is_refused_when_patching():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, hidden_states, *args, **kwargs):
            return self.inner(hidden_states, *args, **kwargs)

    model = tiny("videomae")
    layer = model.videomae.encoder.layer[1]
    layer.attention.attention = Wrapper(layer.attention.attention)
    with pytest.raises(TypeError, match="'layer.attention.attention' is a Wrapper"):
        vtome.patch(model, r=2)
    assert not vtome.is_patched(model)


def test_a_huge_duplicate_stops_when_nothing_is_left_to_merge():
    model = vtome.patch(tiny("vivit"), r=4, duplicate={0: 10**9})
    logits(model, clip(model))
    assert vtome.last_run(model).tokens_per_layer == [1 + 1, 2, 2]  # layer 0 merged 64 patches down to 1
    budget = vtome.patch(tiny("vivit"), flops=0.5, duplicate={0: 10**9})
    assert vtome.settings(budget).r >= 1


@pytest.mark.parametrize("r", [(2, 0.5), [2, -1.0], (4, 1.0)])
def test_an_inflection_round_trips_through_json(r):
    import json

    s = vtome.settings(vtome.patch(tiny("vivit"), r=r))
    assert isinstance(s.r, Inflection) and s.r == (r[0], float(r[1]))
    again = vtome.settings(vtome.patch(tiny("vivit"), r=json.loads(json.dumps(s.to_dict()))["r"]))
    assert again.r == s.r and again.schedule() == s.schedule()


def test_integer_pairs_are_per_layer_schedules_at_every_depth():
    two = vtome.patch(tiny("vivit", num_hidden_layers=2), r=(2, 1))
    assert vtome.settings(two).schedule() == [2, 1]
    with pytest.raises(ValueError, match="inflection a float"):
        vtome.patch(tiny("vivit"), r=(2, 1))  # 3 layers: two ints are not a schedule, nor an inflection


def test_numpy_integers_are_accepted_as_ints():
    np = pytest.importorskip("numpy")
    model = vtome.patch(tiny("vivit"), r=np.int64(2), start_layer=np.int64(1), seed=np.int64(3))
    s = vtome.settings(model)
    s.layers = [np.int64(1), np.int64(2)]
    s.duplicate = {np.int64(1): np.int64(1)}
    assert type(s.r) is int and s.layers == (1, 2) and s.duplicate == {1: 1} and type(s.seed) is int
    s.r = [np.int64(1)] * 3
    assert s.r == (1, 1, 1)


def test_position_merge_is_refused_where_tokens_have_no_positions():
    with pytest.raises(ValueError, match="position_merge.*rotary positions"):
        vtome.patch(tiny("videomae"), r=2, position_merge="destination")
    s = vtome.settings(vtome.patch(tiny("videomae"), r=2))
    assert s.position_merge is None
    with pytest.raises(ValueError, match="rotary positions"):
        s.position_merge = "destination"


def test_frozen_dict_cannot_be_refilled():
    s = vtome.settings(vtome.patch(tiny("vivit"), r=2, duplicate={0: 1}))
    s.duplicate.__init__({0: 5})
    assert s.duplicate == {0: 1} and s.plan.steps[0] == 2


def test_patching_a_subclass_leaves_its_output_capture_as_it_was():
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    model = user_model()
    key = str(type(model))
    before = dict.get(_CAN_RECORD_REGISTRY, key, "absent")
    vtome.patch(model, r=2)
    vtome.unpatch(model)
    assert dict.get(_CAN_RECORD_REGISTRY, key, "absent") == before


def test_unmerge_before_any_forward_says_so():
    model = vtome.patch(tiny("vivit"), r=2)
    with pytest.raises(ValueError, match="none has run yet"):
        vtome.unmerge(model, torch.zeros(2, 59, 64))
    model_r0 = vtome.patch(tiny("vivit"), r=0)
    logits(model_r0, clip(model_r0))
    with pytest.raises(ValueError, match="had batch 2"):
        vtome.unmerge(model_r0, torch.zeros(3, input_tokens(model_r0), 64))


def test_a_budget_no_layer_can_use_resolves_to_r0():
    from vtome.flops import BudgetWarning

    with pytest.warns(BudgetWarning, match="no layer can merge"):
        model = vtome.patch(tiny("vivit"), flops=0.5, layers=[])
    assert vtome.settings(model).r == 0
