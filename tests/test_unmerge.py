"""vtome.unmerge: merged tokens back on the input grid, checked against the traced source maps."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES, clip, tiny

import vtome


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize(
    "options", [{"mode": "merge"}, {"mode": "drop"}, {"mode": "hybrid", "threshold": 0.5}, {"duplicate": {1: 1}}]
)
def test_each_input_position_gets_the_token_that_covers_it(family, options):
    model = vtome.patch(tiny(family), r=3, trace_source=True, **options)
    with torch.no_grad():
        model(pixel_values=clip(model))
    run = vtome.last_run(model)
    tokens = torch.randn(2, run.tokens_per_layer[-1], 7)
    full = vtome.unmerge(model, tokens)
    assert full.shape == (2, run.input_tokens, 7)
    assert run.index.shape == (2, run.input_tokens) and run.index.dtype == torch.long
    for b in range(2):
        for i in range(run.input_tokens):
            covering = run.source[b, :, i].nonzero().flatten()
            assert len(covering) <= 1
            if len(covering) == 1:
                assert run.index[b, i] == covering[0]
                assert torch.equal(full[b, i], tokens[b, covering[0]])
            else:  # dropped
                assert run.index[b, i] == -1 and (full[b, i] == 0).all()


def test_unmerge_without_merging_is_the_identity_and_checks_shapes():
    model = vtome.patch(tiny("vivit"), r=0)
    with torch.no_grad():
        model(pixel_values=clip(model))
    tokens = torch.randn(2, 65, 4)
    assert vtome.unmerge(model, tokens) is tokens
    with pytest.raises(ValueError, match="expects the 65 tokens"):
        vtome.unmerge(model, torch.randn(2, 60, 4))
