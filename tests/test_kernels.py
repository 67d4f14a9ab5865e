"""The compiled CPU merge step (vtome.kernels, csrc/merge.cpp) gives the PyTorch code's results to the bit."""

from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ALL_FAMILIES, clip, tiny
from test_vjepa2 import clip as vjepa2_clip
from test_vjepa2 import tiny as vjepa2_tiny

import vtome
from vtome import kernels
from vtome.merge import aggregate_heads, average_tokens, bipartite_match, group_index, rule

COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
buildable = pytest.mark.skipif(
    COMPILER is None or not kernels.enabled(), reason="no C++ compiler here, or VTOME_KERNELS=0"
)
compiled = kernels.ops(torch.zeros(1))
needs_kernels = pytest.mark.skipif(compiled is None, reason="the CPU kernels could not be built here")


@pytest.fixture
def pytorch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything in this test runs the PyTorch code (the reference)."""
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)


def random_metric(seed: int) -> tuple[torch.Tensor, int, int, str, str, float]:
    """A metric [G, N, C] with its settings, drawn from ``seed``: ties (small integers), NaNs and the three
    dtypes included."""
    g = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (), generator=g))

    # rows of up to 70 similarities: the vector loop, its overlapping last load and the short-row pass
    groups, n, protected, c = draw(1, 4), draw(3, 60 if seed % 4 else 140), draw(0, 3), draw(1, 9)
    n = max(n, protected + 2)
    metric = torch.randn(groups, n, c, generator=g)
    if seed % 5 == 0:  # many exact ties
        metric = torch.randint(0, 3, (groups, n, c), generator=g).float()
    if seed % 11 == 0:
        metric[0, draw(0, n), 0] = float("nan")
    metric = metric.to((torch.float32, torch.float64, torch.bfloat16)[seed % 3])
    r = draw(1, (n - protected) // 2 + 1)
    order, mode = ("paper", "spatial")[seed % 2], ("merge", "drop", "hybrid")[seed % 3]
    return metric, r, protected, order, mode, float(torch.rand((), generator=g)) * 2 - 1


@needs_kernels
def test_match_is_the_pytorch_matching_to_the_bit(pytorch_only):
    for seed in range(400):
        metric, r, protected, order, mode, threshold = random_metric(seed)
        reference = bipartite_match(metric, r, protected=protected, mode=mode, threshold=threshold, order=order)
        head, sort_staying, drop, hybrid = rule(protected, mode, order)
        ranked, dest = compiled.match(metric, r, protected, head, sort_staying, drop, hybrid, threshold)
        assert torch.equal(ranked, reference.ranked), seed
        assert torch.equal(dest, reference.dest), seed


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_match_on_model_sized_groups(pytorch_only, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        for groups, n, d in [(1, 1568, 64), (8, 196, 64), (2, 3137, 96), (16, 288, 32)]:
            metric = torch.randn(groups, n, d, generator=g) + 2 * torch.randn(groups, 1, d, generator=g)
            for protected, order, mode in [(0, "paper", "merge"), (1, "paper", "hybrid"), (1, "spatial", "drop")]:
                r = min(150, (n - protected) // 2)
                reference = bipartite_match(metric, r, protected=protected, mode=mode, threshold=0.3, order=order)
                head, sort_staying, drop, hybrid = rule(protected, mode, order)
                _, dest = compiled.match(metric, r, protected, head, sort_staying, drop, hybrid, 0.3)
                assert torch.equal(dest, reference.dest), (groups, n, protected, order, mode)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_average_is_the_pytorch_average_to_the_bit(pytorch_only, dtype):
    g = torch.Generator().manual_seed(3)
    for case in range(60):
        groups, n, c = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(2, 300, (), generator=g)), 1 + case
        tokens = int(torch.randint(1, n + 1, (), generator=g))
        dest = torch.randint(-1 if case % 2 else 0, tokens, (groups, n), generator=g)
        dest[:, :tokens] = torch.arange(tokens)  # every output token gets at least one input
        dest = dest[:, torch.randperm(n, generator=g)]
        spare = bool((dest < 0).any())
        x = (10 * torch.randn(groups, n, c, generator=g)).to(dtype)
        size = None if case % 3 == 0 else torch.randint(1, 9, (groups, n, 1), generator=g).float()
        rows = group_index(dest, tokens, spare)
        out, new_size = average_tokens(x, size, rows, groups, tokens, spare)
        got, got_size = compiled.average(x, size, rows, groups, tokens)
        assert got.dtype == out.dtype == dtype
        assert torch.equal(got, out) and torch.equal(got_size, new_size), case


@needs_kernels
def test_average_signed_zeros_and_unreached_rows_to_the_bit(pytorch_only):
    """A row's first token is written as 0 + product (-0.0 becomes 0.0, as a sum from zeros gives) and a row
    no token reaches is 0 / 0 (NaN), as in the PyTorch code; compared bit for bit."""
    x = torch.tensor([[[-0.0, 1.0], [2.0, -0.0], [-0.0, -0.0], [3.0, 4.0]]])
    dest = torch.tensor([[0, 1, 1, -1]])  # row 2 gets nothing, token 3 is discarded
    rows = group_index(dest, 3, True)
    out, new_size = average_tokens(x, None, rows, 1, 3, True)
    got, got_size = compiled.average(x, None, rows, 1, 3)
    assert torch.equal(got.view(torch.int32), out.view(torch.int32)) and torch.equal(got_size, new_size)
    assert got[0, 0, 0].item() == 0.0 and not torch.signbit(got[0, 0, 0]) and got[0, 2].isnan().all()


@needs_kernels
@pytest.mark.parametrize("heads", [1, 3, 4, 12])
def test_sum_over_heads_adds_in_head_order(pytorch_only, heads):
    g = torch.Generator().manual_seed(heads)
    projected = 30 * torch.randn(2, 50, heads * 16, generator=g)  # [G, N, H*d]
    per_head = 30 * torch.randn(2, 50, heads, 16, generator=g).transpose(1, 2)  # [G, H, N, d], strided
    for keys in (projected, per_head):
        split = keys.unflatten(2, (heads, 16)).transpose(1, 2) if keys.dim() == 3 else keys
        by_hand = functools.reduce(torch.add, split.unbind(1))
        assert torch.equal(compiled.sum_heads(keys, heads), by_hand)
        assert torch.equal(aggregate_heads(keys, heads, scaled=False), by_hand)  # the PyTorch code's order


def forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    with torch.inference_mode():
        logits = model(pixel_values=x).logits
    return logits, vtome.last_run(model)


SETTINGS = [
    dict(r=6),
    dict(r=6, mode="drop"),
    dict(r=6, mode="hybrid", threshold=0.2),
    dict(r=[3, 0, 9], prop_attn=True, order="spatial"),
    dict(r=6, head_aggregation="concat"),
]


@needs_kernels
@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_patched_models_give_the_same_outputs_with_and_without_kernels(family, settings, monkeypatch):
    if family in ("timesformer", "motionformer") and settings["r"] == 6:  # per frame of 16 tokens
        settings = {**settings, "r": 2}
    model = vtome.patch(tiny(family), **settings)
    x = clip(model)
    calls = []
    real_step = compiled.step
    monkeypatch.setattr(
        kernels,
        "_loaded",
        [
            kernels.Ops(
                compiled.match, compiled.average, compiled.sum_heads, lambda *a: calls.append(1) or real_step(*a)
            )
        ],
    )
    logits, run = forward(model, x)
    assert calls, "the fused step was not used"
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)
    reference, reference_run = forward(model, x)
    assert torch.equal(logits, reference)
    assert run.tokens_per_layer == reference_run.tokens_per_layer
    assert torch.equal(run.size, reference_run.size) and torch.equal(run.index, reference_run.index)


@needs_kernels
def test_duplicate_changed_in_place_takes_effect(monkeypatch):
    model = vtome.patch(tiny("videomae"), r=6)
    x = clip(model)
    forward(model, x)
    vtome.settings(model).duplicate[1] = 1  # not an assignment: the dict itself changes
    logits, run = forward(model, x)
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)
    reference, reference_run = forward(model, x)
    assert run.tokens_per_layer == reference_run.tokens_per_layer
    assert torch.equal(logits, reference)


@needs_kernels
def test_autocast_keeps_to_the_pytorch_code(monkeypatch):
    """Under CPU autocast the PyTorch code's products run in bf16; the kernels would not: they stand aside."""
    metrics = [torch.randn(2, 97, 16, generator=torch.Generator().manual_seed(seed)) for seed in range(20)]

    def matchings() -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [bipartite_match(metric, 20, protected=1).dest for metric in metrics]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.ops(metrics[0]) is None
    got = matchings()
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)
    assert all(torch.equal(a, b) for a, b in zip(got, matchings(), strict=True))


NOT_PATCH_ARGUMENTS = ("num_layers", "position_merge", "flops")


@needs_kernels
@pytest.mark.parametrize("family", ["videomae", "timesformer"])
def test_settings_changed_between_forwards_take_effect(family):
    """The compiled step keeps constants derived from the settings: assigning a setting must renew them."""
    r = 2 if family == "timesformer" else 6
    model = vtome.patch(tiny(family), r=r)
    x = clip(model)
    forward(model, x)
    changes = [dict(mode="hybrid"), dict(threshold=0.5), dict(order="spatial"), dict(duplicate={1: 1}), dict(r=1)]
    for change in changes:
        for name, value in change.items():
            setattr(vtome.settings(model), name, value)
        logits, run = forward(model, x)
        settings = dataclasses.asdict(vtome.settings(model))
        fresh = vtome.patch(tiny(family), **{k: settings[k] for k in settings if k not in NOT_PATCH_ARGUMENTS})
        reference, reference_run = forward(fresh, x)
        assert torch.equal(logits, reference), change
        assert run.tokens_per_layer == reference_run.tokens_per_layer, change


@needs_kernels
def test_vjepa2_positions_take_the_general_step_and_match(monkeypatch):
    model = vtome.patch(vjepa2_tiny(), r=8)
    x = vjepa2_clip()
    with torch.inference_mode():
        out = model(pixel_values_videos=x).logits
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)
    with torch.inference_mode():
        reference = model(pixel_values_videos=x).logits
    assert torch.equal(out, reference)


@needs_kernels
@pytest.mark.parametrize("family", ["videomae", "timesformer"])
def test_training_takes_the_autograd_path_with_the_same_matching(family, monkeypatch):
    """With gradients the merged tokens come from PyTorch operations (so autograd records them), the matching
    from the kernel; gradients equal those of the PyTorch code alone."""
    model = vtome.patch(tiny(family), r=2 if family == "timesformer" else 6).train()
    x = clip(model)

    def grads() -> list[torch.Tensor]:
        trained = copy.deepcopy(model)
        trained(pixel_values=x).logits.square().sum().backward()
        return [p.grad for p in trained.parameters() if p.grad is not None]

    with_kernels = grads()
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)
    assert all(torch.equal(a, b) for a, b in zip(with_kernels, grads(), strict=True))


@needs_kernels
def test_strided_metrics_match_too(pytorch_only):
    metric = torch.randn(2, 3137, 96).transpose(1, 2).contiguous().transpose(1, 2)  # rows not contiguous
    for protected, order in [(0, "paper"), (1, "spatial")]:
        reference = bipartite_match(metric, 150, protected=protected, order=order)
        head, sort_staying, drop, hybrid = rule(protected, "merge", order)
        ranked, dest = compiled.match(metric, 150, protected, head, sort_staying, drop, hybrid, 0.0)
        assert torch.equal(ranked, reference.ranked) and torch.equal(dest, reference.dest)


@needs_kernels
def test_forward_mode_ad_and_gradients_of_the_metric_keep_to_pytorch(monkeypatch):
    """The kernels have no autograd rules: forward-mode AD (torch.func.jvp) and a metric that needs a gradient
    take the PyTorch code, so derivatives are those of the PyTorch code."""
    model = vtome.patch(tiny("videomae", attn="eager"), r=6)
    x, tangent = clip(model, batch=1), clip(model, batch=1, seed=2)

    def jvp() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.jvp(lambda v: model(pixel_values=v).logits, (x,), (tangent,))

    keys = torch.randn(2, 10, 32, requires_grad=True)
    aggregate_heads(keys, 4, scaled=False).square().sum().backward()
    out, derivative = jvp()
    assert derivative.abs().sum() > 0
    monkeypatch.setattr(kernels, "ops", lambda *tensors: None)
    reference, reference_derivative = jvp()
    assert torch.equal(out, reference) and torch.equal(derivative, reference_derivative)
    keys_reference = keys.detach().clone().requires_grad_()
    aggregate_heads(keys_reference, 4, scaled=False).square().sum().backward()
    assert keys.grad is not None and torch.equal(keys.grad, keys_reference.grad)


def test_kernels_off_by_environment(monkeypatch):
    monkeypatch.setenv("VTOME_KERNELS", "0")
    assert not kernels.enabled() and kernels._attempt() is None
    monkeypatch.setenv("VTOME_KERNELS", "1")
    assert kernels.enabled()


@buildable
def test_kernels_are_built_where_a_compiler_is():
    """CI has a compiler: the fast path must really be the one under test, not a silent fallback."""
    assert compiled is not None


@buildable
def test_a_build_killed_midway_does_not_hang_the_next_process(tmp_path):
    """PyTorch's builder waits forever on a lock file left by a killed build; vtome removes it under its own
    lock (which the OS releases when a process dies)."""
    script = textwrap.dedent(
        """
        import torch
        from vtome import kernels
        folder = kernels.build_directory()
        folder.mkdir(parents=True)
        (folder / "lock").write_text("")  # what a build killed midway leaves
        assert kernels.ops(torch.zeros(1)) is not None
        """
    )
    env = {**__import__("os").environ, "VTOME_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_failed_build_warns_once_and_falls_back_to_the_same_results(tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    script = textwrap.dedent(
        f"""
        import warnings, torch, vtome
        from vtome import kernels
        kernels.SOURCE = __import__("pathlib").Path({str(broken)!r})
        import sys; sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from conftest import tiny, clip
        model = vtome.patch(tiny("videomae"), r=6)
        x = clip(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.inference_mode():
                first = model(pixel_values=x).logits
                second = model(pixel_values=x).logits
        built = [w for w in caught if issubclass(w.category, kernels.KernelWarning)]
        assert len(built) == 1, [str(w.message) for w in caught]
        assert "could not be built" in str(built[0].message) and "VTOME_KERNELS=0" in str(built[0].message)
        assert kernels.ops(x) is None and torch.equal(first, second)
        torch.save(first, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**__import__("os").environ, "VTOME_CACHE": str(tmp_path / "cache"), "VTOME_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = vtome.patch(tiny("videomae"), r=6)
    with torch.inference_mode():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(pixel_values=clip(model)).logits)
