"""One vocabulary: every command that patches a model declares the same merge flags, with the library's
choices, maps them to the same ``vtome.patch`` keyword arguments, and tells library errors in its flags."""

from __future__ import annotations

import pytest
from conftest import tiny

from vtome.cli import build_parser, main, merge_kwargs
from vtome.merge import HEAD_AGGREGATIONS, MODES, ORDERS
from vtome.settings import DIVIDED

PATCHING = ("bench", "calibrate", "eval", "sweep", "visualize", "splice")


def options(command: str) -> dict:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.option_strings[0]: a for a in sub._actions if a.option_strings}


@pytest.mark.parametrize("command", PATCHING)
def test_every_patching_command_has_the_merge_flags_with_the_library_choices(command):
    flags = options(command)
    for flag in ("--threshold", "--prop-attn", "--layers"):
        assert flag in flags
    assert list(flags["--order"].choices) == list(ORDERS)
    assert list(flags["--divided"].choices) == list(DIVIDED)
    assert list(flags["--head-aggregation"].choices) == list(HEAD_AGGREGATIONS)
    if command == "sweep":  # lists of settings instead
        assert "--modes" in flags and "--start-layers" in flags and "--mode" not in flags
    else:
        assert list(flags["--mode"].choices) == list(MODES) and "--start-layer" in flags
    assert ("--r" in flags) == (command != "calibrate")
    assert ("--flops" in flags) == (command in ("bench", "calibrate", "visualize", "splice"))


def test_flags_become_patch_keyword_arguments():
    argv = ["visualize", "clip.mp4", "--model", "m", "--flops", "0.5", "--mode", "hybrid", "--threshold", "0.3"]
    argv += ["--prop-attn", "off", "--head-aggregation", "concat", "--start-layer", "1", "--layers", "1,2"]
    argv += ["--order", "spatial", "--divided", "aligned"]
    assert merge_kwargs(build_parser().parse_args(argv)) == {
        "flops": 0.5,
        "mode": "hybrid",
        "threshold": 0.3,
        "prop_attn": False,
        "head_aggregation": "concat",
        "start_layer": 1,
        "layers": [1, 2],
        "order": "spatial",
        "divided": "aligned",
    }
    # what is not given is left to the library's defaults
    assert merge_kwargs(build_parser().parse_args(["eval", "--model", "m", "--dataset", "k400", "--root", "."])) == {}


def test_r_and_flops_exclude_each_other_and_choices_are_checked(capsys):
    assert main(["visualize", "clip.mp4", "--model", "m", "--r", "2", "--flops", "0.5"]) == 2
    assert "argument --flops: not allowed with argument --r" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--dataset", "k400", "--root", ".", "--order", "papr"]) == 2
    assert "argument --order: invalid choice: 'papr'" in capsys.readouterr().err


def test_library_errors_are_told_in_the_commands_flags(tmp_path, capsys):
    tiny("videomae", num_hidden_layers=2).save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["calibrate", "--model", str(tmp_path), "--flops", "0.5", "--start-layer", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vtome calibrate: error: --start-layer must be an int in [0, 2]; got 9"), err
    assert main(["calibrate", "--model", str(tmp_path), "--flops", "1.5"]) == 2
    assert "vtome calibrate: error: --flops is the fraction of the FLOPs to keep" in capsys.readouterr().err
