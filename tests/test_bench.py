"""``vtome bench`` on tiny local models: fields, FLOP counts, errors (no timing is asserted)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import tiny

from vtome.bench import BenchConfig, peak_memory_mb, run_benchmark
from vtome.cli import main
from vtome.flops import layer_flops, stack_flops

FIELDS = {
    "model",
    "mode",
    "r",
    "batch_size",
    "clips_per_s",
    "frames_per_s",
    "latency_ms_median",
    "latency_ms_p90",
    "peak_mem_mb",
    "gflops",
    "flop_ratio",
    "speedup",
    "overhead_share",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vivit")
    tiny("vivit", num_hidden_layers=2).save_pretrained(path)
    return str(path)


def test_cli_writes_json_with_every_field_and_a_plot(tiny_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--model",
            tiny_dir,
            "--r",
            "0,4,8",
            "--batch-size",
            "1,2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert code == 0
    report = json.loads(out_json.read_text())
    assert {"cpu", "gpu", "torch", "threads"} <= set(report["machine"])
    rows = report["results"]
    assert len(rows) == 6 and all(FIELDS <= set(row) for row in rows)
    assert {(row["r"], row["batch_size"]) for row in rows} == {(r, b) for r in (0, 4, 8) for b in (1, 2)}
    for row in rows:
        assert row["clips_per_s"] > 0 and row["latency_ms_p90"] >= row["latency_ms_median"] > 0
        assert row["peak_mem_mb"] >= 0
        assert row["frames_per_s"] == pytest.approx(row["clips_per_s"] * 8)
        if row["r"] == 0:
            assert row["speedup"] == 1.0 and row["flop_ratio"] == 1.0 and row["overhead_share"] == 0.0
        else:
            assert row["flop_ratio"] > 1.0 and 0.0 <= row["overhead_share"] < 1.0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speedup" in capsys.readouterr().out


def test_merge_share_finds_a_slow_merge_step_and_leaves_the_model_as_it_was(monkeypatch):
    import vtome
    from vtome.bench import merge_share
    from vtome.merger import Merger
    from vtome.patch import merger

    model = vtome.patch(tiny("videomae", num_hidden_layers=2), r=4)
    x = torch.randn(1, 8, 3, 64, 64)
    with torch.inference_mode():
        want = model(pixel_values=x).logits

    def forward():
        with torch.inference_mode():
            return model(pixel_values=x)

    real = Merger.merge

    def slow(self, *args, **kwargs):
        time.sleep(0.02)  # 2 layers x 20 ms: far more than the tiny model's forward
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Merger, "merge", slow)
    assert merge_share(model, forward, "cpu", repeats=3) > 0.5
    monkeypatch.setattr(Merger, "merge", real)
    assert 0.0 <= merge_share(model, forward, "cpu", repeats=3) < 1.0
    assert not {"merge", "metric"} & set(vars(merger(model)))  # the instrumentation is gone
    steps = merger(model)
    mine = steps.merge  # a user's own instance attribute survives the measurement
    steps.merge = mine
    merge_share(model, forward, "cpu", repeats=1)
    assert vars(steps)["merge"] is mine
    del steps.merge
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values=x).logits, want, rtol=0, atol=0)


def test_cpu_peak_memory_sees_a_known_allocation():
    def work():
        t = torch.ones(10 * 2**20 // 4)  # 10 MiB held for 50 ms (the sampler reads every ~0.2 ms)
        time.sleep(0.05)
        return t.sum()

    assert peak_memory_mb(work, "cpu") == pytest.approx(10, abs=1.5)


def test_flops_match_hand_calculation_for_two_layers(tiny_dir):
    report = run_benchmark(BenchConfig(model=tiny_dir, rs=[0, 10], warmup=0, repeats=1))
    base, merged = report["results"]
    c = 64
    # 65 tokens (64 patches + class token); layer 0 merges 10 -> 55, layer 1 merges 10 -> 45
    hand_base = 2 * (8 * 65 * c * c + 4 * 65 * 65 * c + 16 * 65 * c * c)
    hand_merged = (8 * 65 * c * c + 4 * 65 * 65 * c + 16 * 55 * c * c) + (
        8 * 55 * c * c + 4 * 55 * 55 * c + 16 * 45 * c * c
    )
    assert merged["tokens_per_layer"] == [55, 45]
    assert base["gflops"] * 1e9 == pytest.approx(hand_base)
    assert merged["gflops"] * 1e9 == pytest.approx(hand_merged)
    assert merged["flop_ratio"] == pytest.approx(hand_base / hand_merged)
    assert base["flop_ratio"] == 1.0


def test_paper_flop_ratios():
    def schedule(n0: int, r: int, protected: int) -> list[int]:
        out, n = [], n0
        for _ in range(12):
            n -= min(r, (n - protected) // 2)
            out.append(n)
        return out

    for n0, r, protected, expected in ((1568, 150, 0, 2.47), (3137, 300, 1, 2.56)):
        ratio = stack_flops(n0, [n0] * 12, 768) / stack_flops(n0, schedule(n0, r, protected), 768)
        assert ratio == pytest.approx(expected, abs=0.005)


def test_divided_flops_count_temporal_and_spatial_attention():
    # 1 + 2 slots x 3 frames, C=4, no merge: temporal 8*6*16 + 4*2*9*4 + 2*6*16, spatial 8*3*3*16 + 4*3*9*4
    expected = 8 * 6 * 16 + 4 * 2 * 9 * 4 + 2 * 6 * 16 + 8 * 3 * 3 * 16 + 4 * 3 * 9 * 4 + 16 * 7 * 16
    assert layer_flops(7, 7, 4, frames=3) == expected


def test_compiled_bench_reports_unknown_merge_share(tiny_dir, tmp_path):
    out = tmp_path / "c.json"
    argv = ["bench", "--model", tiny_dir, "--r", "0,4", "--warmup", "0", "--repeats", "1", "--compile"]
    assert main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[1]["overhead_share"] is None  # a compiled model fuses the merge step into its graph
    assert rows[1]["flop_ratio"] > 1.0


def test_timesformer_bench_runs(tmp_path):
    tiny("timesformer", num_hidden_layers=2).save_pretrained(tmp_path)
    report = run_benchmark(BenchConfig(model=str(tmp_path), rs=[0, 3], warmup=0, repeats=1))
    assert report["results"][1]["tokens_per_layer"] == [1 + 4 * 13, 1 + 4 * 10]
    assert report["results"][1]["flop_ratio"] > 1.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "videomae-huge"], "unknown model 'videomae-huge'.*Built-in names: videomae-base"),
        (["--model", "videomae-base", "--r", ""], "--r needs at least one value"),
        (["--model", "videomae-base", "--device", "cuda"], "no CUDA GPU is available"),
        (["--model", "videomae-base", "--dtype", "fp8"], "--dtype must be one of fp32, bf16, fp16"),
        (["--model", "videomae-base", "--mode", "average"], "argument --mode: invalid choice: 'average'"),
        (["--model", "videomae-base", "--warmup", "-1"], "--warmup must be >= 0; got -1"),
        (["--model", "demo-joint", "--start-layer", "-1"], "--start-layer must be an int in"),
        (["--model", "demo-joint", "--divided", "aligned"], "divided='aligned' applies to divided space-time"),
        (["--suite", "gpu", "--r", "0,4"], "--r do not apply to --suite"),
        (["--r", "0,4"], "give --model \\(or --suite gpu\\)"),
        (["--model", "./no/such/dir"], "unknown model './no/such/dir'"),
    ],
)
def test_bad_arguments_give_clear_errors(argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert "vtome bench: error:" in err and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_gpu_suite_runs_every_variant_and_writes_json_and_a_table(tmp_path, capsys, monkeypatch):
    """``vtome bench --suite gpu`` on CPU with one tiny bundled model: eager under every SDPA backend (those
    the CPU lacks are reported, not fatal) and compiled with fullgraph=True (traced by dynamo without code
    generation, so the test stays fast)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "eager"}))
    out = tmp_path / "suite.json"
    argv = ["bench", "--suite", "gpu", "--model", "demo-joint", "--device", "cpu", "--dtype", "fp32"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is fastest and does not wait on a busy machine
    try:
        assert main([*argv, "--batch-size", "1", "--warmup", "1", "--repeats", "2", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    rows = report["results"]
    eager = [r for r in rows if not r["compiled"]]
    compiled = [r for r in rows if r["compiled"]]
    assert [r["backend"] for r in eager] == ["default", "math", "efficient", "flash", "cudnn"]
    assert [(r["batch_size"], r["backend"]) for r in compiled] == [(1, "default")]
    for row in rows:
        assert row["flops"] == 0.5 and row["flop_ratio"] >= 2.0 and row["r"] > 0
    for row in [*compiled, *(r for r in eager if r["backend"] in ("default", "math"))]:
        assert row["status"] == "ok", row
        assert row["unpatched_ms"] > 0 and row["patched_ms"] > 0
        assert row["speedup"] == pytest.approx(row["unpatched_ms"] / row["patched_ms"])
    cpu_lacks = [r for r in eager if r["backend"] in ("efficient", "cudnn")]
    assert all(r["status"].startswith("unpatched: unavailable") and r["speedup"] is None for r in cpu_lacks)
    assert report["skipped"] == [] and report["config"]["dtype"] == "fp32"
    printed = capsys.readouterr().out
    assert "unpatched ms" in printed and "compiled" in printed and "demo-joint" in printed


def test_gpu_suite_skips_compiled_work_that_does_not_fit_its_time_budget():
    from vtome.bench import SuiteConfig, run_suite

    cfg = SuiteConfig(
        models=("demo-joint",),
        batch_sizes=(1,),
        device="cpu",
        dtype="fp32",
        backends=("default",),
        warmup=1,
        repeats=1,
        budget_s=30.0,
        compile_guess_s=60.0,
    )
    report = run_suite(cfg)
    assert [r["compiled"] for r in report["results"]] == [False]
    assert report["skipped"] == [{"model": "demo-joint", "batch_size": 1, "compiled": True, "reason": "time budget"}]
