"""What a user's environment needs: the core imports and patches without the tools' packages, a command
without them says which extra to install, and the declared dependencies are ranges with tested pins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import vtome

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("rich", "matplotlib", "PIL", "av")
# Makes the tools' packages unimportable in a fresh interpreter (as if never installed).
HIDE = f"import sys\nfor name in {TOOLS!r}:\n    sys.modules[name] = None\n"


def run(code: str) -> subprocess.CompletedProcess:
    src = str(Path(vtome.__file__).parents[1])
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "VTOME_KERNELS": "0", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-c", HIDE + code], capture_output=True, text=True, env=env, timeout=300)


def test_patching_needs_none_of_the_tools_packages():
    code = """
import importlib, pkgutil, torch, vtome
from transformers import VideoMAEConfig, VideoMAEForVideoClassification
cfg = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
model = vtome.patch(VideoMAEForVideoClassification(cfg).eval(), r=2)
model(pixel_values=torch.randn(1, 4, 3, 32, 32))
print(vtome.last_run(model).tokens_per_layer)
# every module but the CLI's printing imports without them too (the Python API of the tools included)
for info in pkgutil.walk_packages(vtome.__path__, "vtome."):
    if info.name not in ("vtome.demo.report", "vtome.__main__"):
        importlib.import_module(info.name)
print(sorted(m for m in ("rich", "matplotlib", "PIL", "av") if sys.modules.get(m) is not None))
"""
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[6, 4]", "[]"]


def test_a_command_without_the_tools_names_the_extra_in_one_line():
    done = run("from vtome.cli import main\nsys.exit(main(['bench', '--model', 'demo-joint']))")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "vtome bench: error: needs rich, matplotlib, pillow, av; install the command-line tools with: "
        'pip install "vtome[tools]"'
    )


def test_dependencies_are_ranges_and_the_constraints_pin_what_is_tested():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=!~ ;\[]", d)[0]: d for d in project["dependencies"]}
    assert set(core) == {"torch", "transformers", "safetensors", "numpy"}
    assert "==" not in core["torch"] and core["torch"].startswith("torch>=")
    assert core["transformers"] == "transformers>=5,<6"
    tools = {re.split(r"[<>=!~ ;]", d)[0] for d in project["optional-dependencies"]["tools"]}
    assert tools == {"rich", "matplotlib", "pillow", "av"}
    assert "vtome[tools]" in project["optional-dependencies"]["dev"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0" and {"transformers", "rich", "pytest"} <= set(pins)
    readme = (ROOT / "README.md").read_text()
    assert 'python3 -m pip install -c constraints.txt -e ".[dev]"' in readme
    assert "-c constraints.txt" in (ROOT / ".ci" / "run").read_text()
