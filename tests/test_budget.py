"""FLOP budgets: vtome.patch(model, flops=...) resolved from the FLOP model, and the token simulation it uses."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ALL_FAMILIES, clip, tiny

import vtome
from vtome.adapters import adapter_for
from vtome.flops import BudgetWarning, simulate_tokens
from vtome.patch import _fraction_for


def forward(model):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", vtome.merger.CapWarning)
        model(pixel_values=clip(model))
    return vtome.last_run(model)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize(
    "options",
    [{}, {"inflection": 0.5}, {"inflection": -1.0}, {"start_layer": 1}, {"layers": [0, 2], "duplicate": {0: 1}}],
)
@pytest.mark.parametrize("budget", [0.9, 0.78])
def test_budget_is_met_as_closely_as_one_r_step_allows(family, options, budget):
    model = vtome.patch(tiny(family), flops=budget, **options)
    s = vtome.settings(model)
    run = forward(model)
    assert 1 / run.flop_ratio <= budget + 1e-12  # the forward itself keeps within the budget
    r = s.r if isinstance(s.r, int) else s.r[0]
    fraction = _fraction_for(model, adapter_for(model), s)
    less = r - 1 if isinstance(s.r, int) else (r - 1, s.r[1])
    assert fraction(s.r) == pytest.approx(1 / run.flop_ratio)
    assert r >= 1 and fraction(less) > budget  # one step less merging would exceed it
    assert s.flops == budget
    if "inflection" in options:
        assert s.r[1] == options["inflection"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_simulated_token_counts_equal_the_forward(family):
    model = vtome.patch(tiny(family), r=[5, 2, 9], duplicate={1: 2})
    run = forward(model)
    layout = vtome.layout(model)
    simulated = simulate_tokens(
        run.input_tokens,
        vtome.settings(model).schedule(),
        layout.protected,
        layout.frames,
        vtome.settings(model).duplicate,
    )
    assert simulated == run.tokens_per_layer


def test_budget_errors_and_unreachable_budget_warns():
    with pytest.raises(ValueError, match="either r .* or flops"):
        vtome.patch(tiny("vivit"), r=4, flops=0.5)
    with pytest.raises(ValueError, match=r"number in \(0, 1\]"):
        vtome.patch(tiny("vivit"), flops=1.5)
    with pytest.raises(ValueError, match="inflection goes with flops"):
        vtome.patch(tiny("vivit"), r=3, inflection=0.5)
    with pytest.warns(BudgetWarning, match=r"cannot be reached; merging saturates at 0\.\d+"):
        model = vtome.patch(tiny("vivit"), flops=0.05)
    saturated = vtome.settings(model).r
    sat_ratio = forward(model).flop_ratio
    assert 1 / sat_ratio < 0.5
    vtome.settings(model).r = saturated - 1
    assert forward(model).flop_ratio < sat_ratio  # one less does not saturate: the smallest such r was chosen
    vtome.settings(model).r = saturated + 5
    assert forward(model).flop_ratio == pytest.approx(sat_ratio)  # more gains nothing
    with pytest.raises(ValueError, match="resolved to r when patching"):
        vtome.settings(model).flops = 0.3
    assert vtome.settings(vtome.patch(tiny("vivit"), flops=1.0)).r == 0
