"""The merge step compiled for the CPU (``csrc/merge.cpp``), built on first use; PyTorch code is the fallback.

At batch 1 on small models a merge step is bound by per-operation overhead, not arithmetic: summing the
keys over heads, the best partner of each A token, the ranking, the destination map and the size-weighted
average are ~30 small tensor operations in PyTorch and one C++ call here. The kernels compute the cosine
similarities with the same ATen operations as :func:`vtome.merge.bipartite_match` and do everything else in
the same order with the same roundings, so they give the PyTorch code's results bit for bit (tested); only
the time differs.

They are used on CPU tensors in eager mode, where no autograd graph is needed for the merged tokens (the
matching itself never needs one). ``torch.compile``, ``torch.export`` and ``torch.jit`` trace the PyTorch
code, so their graphs hold only ATen operations; CUDA uses the PyTorch code.

The source is compiled with PyTorch's C++ extension tools (a C++ compiler is needed; ninja comes with
vtome) into ``$VTOME_CACHE`` (default ``~/.cache/vtome``), once per PyTorch and Python version: about
10-30 s, the first time a model merges on the CPU. ``VTOME_KERNELS=0`` never builds nor uses them. Where they
cannot be built, vtome warns once (:class:`KernelWarning`, with the reason) and uses the PyTorch code.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "merge.cpp"


class KernelWarning(UserWarning):
    """The compiled kernels could not be built or loaded; the (slower) PyTorch code is used instead."""


@dataclass(frozen=True)
class Ops:
    """The compiled operators (``torch.ops.vtome``, CPU tensors):

    ``match(metric [G, N, C], r, protected, head, sort_staying, drop, hybrid, threshold) -> (ranked [G, n_a],
    dest [G, N])``, as :func:`vtome.merge.bipartite_match` builds them (the arguments from
    :func:`vtome.merge.rule`);
    ``average(x [..., C], size [..., 1] float32 or None, rows, groups, tokens) -> (out [groups, tokens, C],
    sizes [groups, tokens, 1])``: :func:`vtome.merge.average_tokens` (a row >= ``groups * tokens`` discards);
    ``sum_heads(keys [G, H, N, d] or [G, N, H*d], heads) -> [G, N, d]``: float32/64 keys added in head order;
    ``step(keys, heads, x, size, index, r, protected, head, sort_staying, drop, hybrid, threshold, frames,
    set_aside, time_minor) -> (tokens [B, N', C], sizes [B, N', 1], index [G, n0])``: a whole merge step of
    :class:`vtome.merger.Merger` (one matching per group, no positions or source maps), see ``csrc/merge.cpp``.
    """

    match: Callable
    average: Callable
    sum_heads: Callable
    step: Callable


def build_directory() -> Path:
    """Where the kernels are built: one folder per PyTorch and Python version (a build is tied to both)."""
    root = Path(os.environ.get("VTOME_CACHE") or Path.home() / ".cache" / "vtome")
    version = f"torch-{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}{sys.version_info[1]}"
    return root / "kernels" / version


def enabled() -> bool:
    """False when ``VTOME_KERNELS`` is ``0``, ``false``, ``no`` or ``off``: the PyTorch code everywhere."""
    return os.environ.get("VTOME_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


_lock = threading.Lock()
_loaded: list[Ops | None] = []  # empty until the first attempt; then its result, for the whole process


def _compile() -> None:
    """Build (or find built) and load the extension; it registers ``torch.ops.vtome``."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # PyTorch runs `ninja` from PATH; the ninja wheel puts it beside Python
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    path = build_directory()
    path.mkdir(parents=True, exist_ok=True)
    load(
        name="vtome_kernels",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-ffp-contract=off"],  # no fused multiply-adds: PyTorch's roundings
        build_directory=str(path),
        is_python_module=False,
        verbose=False,
    )


def _load() -> Ops | None:
    """The operators, building them on the first call of the process (thread-safe), or None."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_attempt())
    return _loaded[0]


def _attempt() -> Ops | None:
    if not enabled():
        return None
    if not hasattr(torch.ops.vtome, "step"):  # an operator namespace registers once per process
        try:
            _compile()
        except Exception as error:  # no compiler, read-only cache, ...: the same results from the PyTorch code
            lines = str(error).strip().splitlines()
            reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
            warnings.warn(
                f"vtome: the CPU merge kernels could not be built in {build_directory()} "
                f"({type(error).__name__}: {reason.strip()}); using the PyTorch code (same results, slower merge "
                "steps at small batch). Install a C++ compiler or set VTOME_CACHE to a writable folder; "
                "VTOME_KERNELS=0 turns the kernels off without this warning.",
                KernelWarning,
                stacklevel=4,
            )
            return None
    vtome = torch.ops.vtome
    return Ops(vtome.match.default, vtome.average.default, vtome.sum_heads.default, vtome.step.default)


def ops(*tensors: torch.Tensor) -> Ops | None:
    """The compiled operators if they apply to ``tensors`` (plain CPU tensors, not while tracing for
    ``torch.compile``/``torch.export``/``torch.jit``, whose graphs keep to ATen operations), else None."""
    for t in tensors:
        if not t.is_cpu or type(t) is not torch.Tensor:
            return None
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return None
    return _load()
