"""The package's floors: no import cycles, and no module imports a floor above its own (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vtome

ROOT = Path(vtome.__file__).parent
# Lowest first. A module may import its own floor and the floors below.
FLOORS = [
    ("algorithm", ["vtome.merge", "vtome.flops"]),
    ("merge state", ["vtome.settings", "vtome.layout", "vtome.merger"]),
    ("adapters", ["vtome.adapters", "vtome.architectures"]),
    ("api", ["vtome.patch", "vtome"]),
    (
        "tools",
        [
            "vtome.zoo",
            "vtome.bench",
            "vtome.calibrate",
            "vtome.evaluate",
            "vtome.outdir",
            "vtome.sweep",
            "vtome.visualize",
            "vtome.analysis",
            "vtome.data",
            "vtome.demo",
        ],
    ),
    ("cli", ["vtome.cli", "vtome.__main__"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["vtome", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def floor(module: str) -> int:
    best = None
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or (prefix != "vtome" and module.startswith(prefix + ".")):
                best = level
    assert best is not None, f"{module} is on no floor: add it to FLOORS and docs/architecture.md"
    return best


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every vtome module ``module`` imports, at the top or inside functions."""
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "vtome"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "vtome":
                continue
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.add(child if child in known else base)
    return {m for m in out if m in known and m != module}


def test_every_module_is_on_a_floor_and_imports_none_above_it():
    known = modules()
    upward = []
    for module, path in known.items():
        for target in imports(module, path, known):
            if floor(target) > floor(module):
                upward.append(f"{module} ({FLOORS[floor(module)][0]}) imports {target} ({FLOORS[floor(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_every_module_imports_on_its_own_in_any_order():
    names = sorted(m for m in modules() if m != "vtome.__main__")
    for order in (names, names[::-1]):
        code = f"import importlib\nfor name in {order!r}:\n    importlib.import_module(name)\n"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
