"""The algorithm on its own: bipartite matching, size-weighted merging, modes, schedules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtome.merge import attention_bias, bipartite_match, max_merge, merge_tokens, parse_schedule


def reference_merge(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int):
    """Slow, loop-based bipartite merge of one group, written from the method's description."""
    unit = F.normalize(metric, dim=-1)
    a_idx, b_idx = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = []
    for i in a_idx:
        sims = [float(unit[i] @ unit[j]) for j in b_idx]
        k = max(range(len(sims)), key=lambda t: sims[t])
        best.append((sims[k], i, b_idx[k]))
    leaving = sorted(best, key=lambda t: -t[0])[:r]
    gone = {i for _, i, _ in leaving}
    feats = {j: x[j] * size[j] for j in b_idx}
    sizes = {j: size[j].clone() for j in b_idx}
    for _, i, j in leaving:
        feats[j] = feats[j] + x[i] * size[i]
        sizes[j] = sizes[j] + size[i]
    kept = [i for i in a_idx if i not in gone]
    out = [x[i] for i in kept] + [feats[j] / sizes[j] for j in b_idx]
    out_size = [size[i] for i in kept] + [sizes[j] for j in b_idx]
    return torch.stack(out), torch.stack(out_size)


def test_merge_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 11, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, 11, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 11, 1), generator=g).double()
    merge = bipartite_match(metric, 4, order="spatial")
    out, out_size, _ = merge_tokens(merge, x, size)
    assert out.shape == (3, 7, 5)
    for b in range(3):
        ref, ref_size = reference_merge(metric[b], x[b], size[b], 4)
        torch.testing.assert_close(out[b], ref)
        torch.testing.assert_close(out_size[b], ref_size)


def test_merge_conserves_size_and_weighted_sum():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 16, generator=g)
    size = torch.randint(1, 5, (2, 40, 1), generator=g).float()
    merge = bipartite_match(x, 15)
    out, out_size, _ = merge_tokens(merge, x, size)
    torch.testing.assert_close(out_size.sum(1), size.sum(1))
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-4)


def test_identical_pairs_merge_first():
    # Tokens 0/1 and 4/5 are duplicates: with r=2 exactly these pairs merge, nothing else changes.
    x = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(2))
    x[0, 1] = x[0, 0]
    x[0, 5] = x[0, 4]
    out, size, _ = merge_tokens(bipartite_match(x, 2), x, torch.ones(1, 8, 1))
    assert sorted(size.flatten().tolist()) == [1, 1, 1, 1, 2, 2]
    for i in (2, 6, 3, 7, 1, 5):  # every survivor is an input token, unchanged
        assert any(torch.equal(x[0, i], o) for o in out[0])


def test_drop_discards_instead_of_averaging():
    x = torch.randn(2, 20, 4, generator=torch.Generator().manual_seed(3))
    size = torch.ones(2, 20, 1)
    out, out_size, _ = merge_tokens(bipartite_match(x, 6, mode="drop"), x, size)
    assert out.shape == (2, 14, 4)
    assert torch.equal(out_size, torch.ones(2, 14, 1))  # survivors keep their size, dropped ones vanish
    for b in range(2):  # every output token is an unchanged input token
        assert all(any(torch.equal(o, t) for t in x[b]) for o in out[b])
    # the dropped tokens are the ones merge would have merged away: same survivors in A
    merged, _, _ = merge_tokens(bipartite_match(x, 6), x, size)
    torch.testing.assert_close(out[:, :4], merged[:, :4])


def test_hybrid_threshold():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 8, generator=g)
    size = torch.ones(2, 30, 1)
    merged = merge_tokens(bipartite_match(x, 10), x, size)
    # every similarity is >= -1: hybrid is plain merging
    low = merge_tokens(bipartite_match(x, 10, mode="hybrid", threshold=-1.0), x, size)
    torch.testing.assert_close(low[0], merged[0])
    torch.testing.assert_close(low[1], merged[1])
    # no similarity reaches 1: each chosen A token replaces its B partner, whose patches are dropped
    high_x, high_size, _ = merge_tokens(bipartite_match(x, 10, mode="hybrid", threshold=1.0), x, size)
    assert high_x.shape == (2, 20, 8)
    assert (high_size.sum(1) < 30).all() and (high_size.sum(1) >= 20).all()


def test_hybrid_mixed_pairs_follow_threshold():
    # Tokens are orthogonal except two near-duplicate pairs (0~1, 2~3). With r=3 and threshold 0.99 the
    # duplicates merge; the third chosen A token (4, similarity 0, partner B token 1) replaces token 1,
    # whose own patch is dropped, and ends up averaged with token 0 in that slot.
    x = torch.eye(8).unsqueeze(0) * 3
    x[0, 1] = x[0, 0] + 1e-3
    x[0, 3] = x[0, 2] + 1e-3
    out, size, src = merge_tokens(
        bipartite_match(x, 3, mode="hybrid", threshold=0.99), x, torch.ones(1, 8, 1), torch.eye(8).unsqueeze(0)
    )
    assert out.shape[1] == 5
    covered = src[0].sum(0)
    assert covered.tolist() == [1, 0, 1, 1, 1, 1, 1, 1]  # token 1 dropped, every other patch kept once
    slot = src[0][:, 0].argmax()
    assert src[0][slot].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]  # tokens 0 and 4 share token 1's slot
    torch.testing.assert_close(out[0, slot], (x[0, 0] + x[0, 4]) / 2)
    assert (src.sum(-1) == size.squeeze(-1)).all()  # sizes count the patches covered


def test_random_modes_reproducible_with_generator():
    x = torch.randn(2, 50, 8)
    size = torch.ones(2, 50, 1)
    for mode in ("random_merge", "random_drop"):
        runs = [
            merge_tokens(bipartite_match(x, 12, mode=mode, generator=torch.Generator().manual_seed(7)), x, size)[0]
            for _ in range(2)
        ]
        assert torch.equal(runs[0], runs[1])
        other = merge_tokens(bipartite_match(x, 12, mode=mode, generator=torch.Generator().manual_seed(8)), x, size)
        assert not torch.equal(runs[0], other[0])


def test_r_zero_is_identity_and_cap_is_enforced():
    x = torch.randn(1, 9, 4)
    assert bipartite_match(x, 0)(x) is x
    assert max_merge(9) == 4
    with pytest.raises(ValueError, match="half"):
        bipartite_match(x, 5)


def test_attention_bias_is_log_size():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = attention_bias(size, torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.log(torch.tensor([1.0, 2.0, 4.0])))


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (5, [5, 5, 5, 5, 5]),
        ((10, 0.0), [10, 10, 10, 10, 10]),
        ((10, -1.0), [20, 15, 10, 5, 0]),
        ((10, 1.0), [0, 5, 10, 15, 20]),
        ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]),
    ],
)
def test_parse_schedule(r, expected):
    assert parse_schedule(r, 5) == expected


def test_parse_schedule_start_layer():
    assert parse_schedule(7, 4, start_layer=2) == [0, 0, 7, 7]


def published_reference(metric, x, size, r, protected, mode, threshold=0.0, draws=None):
    """The published rule for one group ``[N, D]``, in plain loops over token indices (see vtome.merge):
    A = even positions, B = odd positions over the whole sequence; protected tokens never leave nor receive;
    stable descending sort of the A scores; output [staying A, B], staying A in score order without a
    protected token and in position order with one. ``draws`` = (scores, partners) for the random modes."""
    n = len(x)
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    unit = F.normalize(metric, dim=-1)
    score, partner = [], []
    for k, i in enumerate(a_pos):
        if i < protected:
            score.append(float("-inf"))
            partner.append(None)
            continue
        if draws is not None:
            score.append(float(draws[0][k]))
            partner.append(b_pos[int(draws[1][k])])
            continue
        best, best_j = float("-inf"), None
        for j in b_pos:
            if j >= protected and float(unit[i] @ unit[j]) > best:
                best, best_j = float(unit[i] @ unit[j]), j
        score.append(best)
        partner.append(best_j)
    ranked = sorted(range(len(a_pos)), key=lambda k: -score[k])  # Python's sort is stable
    leaving, staying = ranked[:r], ranked[r:]
    if protected:
        staying = sorted(staying)
    feats = {j: x[j] * size[j] for j in b_pos}
    sizes = {j: size[j].clone() for j in b_pos}
    if mode == "hybrid":  # a B token receiving any dissimilar A token is replaced
        for k in leaving:
            if score[k] < threshold:
                feats[partner[k]], sizes[partner[k]] = torch.zeros_like(x[0]), torch.zeros_like(size[0])
    if mode not in ("drop", "random_drop"):
        for k in leaving:
            i, j = a_pos[k], partner[k]
            feats[j] = feats[j] + x[i] * size[i]
            sizes[j] = sizes[j] + size[i]
    out = [x[a_pos[k]] for k in staying] + [feats[j] / sizes[j] for j in b_pos]
    out_size = [size[a_pos[k]] for k in staying] + [sizes[j] for j in b_pos]
    return torch.stack(out), torch.stack(out_size)


@pytest.mark.parametrize("mode", ["merge", "drop", "random_merge", "random_drop", "hybrid"])
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("n", [12, 13])
def test_published_order_matches_reference(mode, protected, n):
    g = torch.Generator().manual_seed(n + 10 * protected)
    groups, r = 3, 4
    metric = torch.randn(groups, n, 8, generator=g, dtype=torch.float64)
    x = torch.randn(groups, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (groups, n, 1), generator=g).double()
    n_a, n_b = (n + 1) // 2, n // 2
    draws = None
    if mode.startswith("random"):  # the random modes draw scores, then partners among the unprotected B tokens
        rng = torch.Generator().manual_seed(7)
        draws = (torch.rand(groups, n_a, generator=rng), torch.randint(n_b, (groups, n_a), generator=rng))
    match = bipartite_match(
        metric, r, protected=protected, mode=mode, threshold=0.3, generator=torch.Generator().manual_seed(7)
    )
    out, out_size, _ = merge_tokens(match, x, size)
    assert out.shape == (groups, n - r, 5)
    for b in range(groups):
        d = None if draws is None else (draws[0][b], draws[1][b])
        ref, ref_size = published_reference(metric[b], x[b], size[b], r, protected, mode, 0.3, d)
        torch.testing.assert_close(out[b], ref)
        torch.testing.assert_close(out_size[b], ref_size)
        if protected:
            assert torch.equal(out[b, 0], x[b, 0])  # the class token stays first, untouched


def test_spatial_order_keeps_positions_and_differs_from_published():
    g = torch.Generator().manual_seed(4)
    metric = torch.randn(2, 17, 8, generator=g)
    positions = torch.arange(17.0).view(1, 17, 1).expand(2, 17, 1)
    spatial = bipartite_match(metric, 5, protected=1, order="spatial")(positions)
    # set-aside class token, then staying A (odd positions after it) in order, then B (even positions >= 2)
    staying = spatial[:, 1 : 1 + 8 - 5, 0]
    assert (spatial[:, 0, 0] == 0).all() and (staying.diff(dim=1) > 0).all() and (staying % 2 == 1).all()
    paper = bipartite_match(metric, 5, protected=1)(positions)
    assert (paper[:, 0, 0] == 0).all() and (paper[:, 1 : 1 + 9 - 1 - 5, 0] % 2 == 0).all()
    assert not torch.equal(spatial, paper)
    without_cls = bipartite_match(metric, 5)(positions)  # no protected token: staying A in score order
    assert not (without_cls[:, : 9 - 5, 0].diff(dim=1) > 0).all()


@pytest.mark.parametrize("time_minor", [True, False])
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("mode", ["merge", "drop", "hybrid"])
def test_divided_token_index_equals_regrouping(time_minor, protected, mode):
    """Applying per-frame merges straight to the model's token order (one index_add_) gives what splitting
    into frames, merging each and joining back gives."""
    from vtome.layout import Layout
    from vtome.merge import average_tokens, sum_tokens

    g = torch.Generator().manual_seed(3)
    layout = Layout(protected=protected, frames=3, time_minor=time_minor)
    batch, slots, channels = 2, 9, 4
    x = torch.randn(batch, protected + 3 * slots, channels, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, protected + 3 * slots, 1), generator=g).double()
    head, groups = layout.split(x)
    match = bipartite_match(layout.split(x)[1], 3, mode=mode, threshold=0.2)
    want_x, want_size = match.average(groups, layout.split(size)[1])
    rows, tokens = layout.token_index(match.dest, slots - 3, match.discards)
    got_x, got_size = average_tokens(x, size, rows, batch, tokens, match.discards)
    assert tokens == protected + 3 * (slots - 3)
    torch.testing.assert_close(got_x, layout.join(head, want_x))
    torch.testing.assert_close(got_size, layout.join(layout.split(size)[0], want_size))
    ids = torch.arange(x.shape[1], dtype=torch.float64).view(1, -1, 1).expand(batch, -1, 1)
    torch.testing.assert_close(
        sum_tokens(ids, rows, batch, tokens, match.discards),
        layout.join(layout.split(ids)[0], match(layout.split(ids)[1])),
    )
