"""The merge step compiled for the CPU (``csrc/merge.cpp``), built on first use; PyTorch code is the fallback.

At batch 1 on small models a merge step is bound by per-operation overhead, not arithmetic: summing the
keys over heads, the best partner of each A token, the ranking, the destination map and the size-weighted
average are ~30 small tensor operations in PyTorch and one C++ call here. The kernels compute the cosine
similarities with the same ATen operations as :func:`vtome.merge.bipartite_match` and do everything else in
the same order with the same roundings, so they give the PyTorch code's results bit for bit (tested); only
the time differs.

They are used on CPU tensors in eager mode, where no autograd graph is needed for the merged tokens (the
matching itself never needs one). ``torch.compile``, ``torch.export`` and ``torch.jit`` trace the PyTorch
code, so their graphs hold only ATen operations; forward-mode AD, ``torch.func`` transforms and CUDA use the
PyTorch code too.

The functions are a Python extension module (pybind11; a call costs less than a dispatched operator, and
the GIL is released while one runs); their loops are compiled for AVX-512 and AVX2 beside the baseline and
picked by the CPU at load time (element-wise arithmetic only, so every version gives the same bits). The
source is compiled with PyTorch's C++ extension tools (a C++ compiler is needed; ninja comes with vtome) into
``$VTOME_CACHE`` (default ``~/.cache/vtome``), once per PyTorch version, Python version and source: about
15-30 s, the first time a model merges on the CPU. ``VTOME_KERNELS=0`` never builds nor uses
them. Where they cannot be built, vtome warns once (:class:`KernelWarning`, with the reason) and uses the
PyTorch code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd import forward_ad

SOURCE = Path(__file__).parent / "csrc" / "merge.cpp"


class KernelWarning(UserWarning):
    """The compiled kernels could not be built or loaded; the (slower) PyTorch code is used instead."""


@dataclass(frozen=True)
class Ops:
    """The compiled functions (the ``vtome_kernels`` extension module, CPU tensors):

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


FLAGS = ["-O3", "-ffp-contract=off"]  # no fused multiply-adds: PyTorch's roundings


def build_directory() -> Path:
    """Where the kernels are built: one folder per PyTorch version, Python version and source (a build is tied
    to all three, so environments sharing the cache never overwrite each other's build)."""
    root = Path(os.environ.get("VTOME_CACHE") or Path.home() / ".cache" / "vtome")
    code = SOURCE.read_bytes() if SOURCE.is_file() else b""
    source = hashlib.sha256(code + " ".join(FLAGS).encode()).hexdigest()[:12]
    version = f"torch-{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}{sys.version_info[1]}-{source}"
    return root / "kernels" / version


def enabled() -> bool:
    """False when ``VTOME_KERNELS`` is ``0``, ``false``, ``no`` or ``off``: the PyTorch code everywhere."""
    return os.environ.get("VTOME_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


_lock = threading.Lock()
_loaded: list[Ops | None] = []  # empty until the first attempt; then its result, for the whole process


BUILD_TIMEOUT_S = 600  # how long a process waits for another one's build before using the PyTorch code


def _compile() -> ModuleType:
    """Build (or find built) and import the extension module.

    One process builds at a time (an OS lock on the build folder, released if the process dies); while holding
    it, a lock file that PyTorch's builder left behind (a process killed mid-build) is removed, since PyTorch
    would otherwise wait for it forever."""
    from torch.utils.cpp_extension import load

    path = build_directory()
    path.mkdir(parents=True, exist_ok=True)
    path_before = os.environ.get("PATH")
    with _build_lock(path / "vtome.lock"):
        (path / "lock").unlink(missing_ok=True)  # PyTorch's own lock: stale, as we hold the build lock
        if shutil.which("ninja") is None:  # PyTorch runs `ninja` from PATH; the ninja wheel has one
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + (path_before or "")
        try:
            return load(
                name="vtome_kernels",
                sources=[str(SOURCE)],
                extra_cflags=FLAGS,
                build_directory=str(path),
                is_python_module=True,
                verbose=False,
            )
        finally:
            if path_before is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path_before


@contextlib.contextmanager
def _build_lock(file: Path) -> Iterator[None]:
    """An exclusive lock on ``file`` for this process (POSIX ``flock``: the OS drops it if the process dies);
    raises TimeoutError after :data:`BUILD_TIMEOUT_S`. Without ``fcntl`` (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(file, "a") as handle:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building for {BUILD_TIMEOUT_S} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> Ops | None:
    """The compiled functions, building them on the first call of the process (thread-safe), or None."""
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            _loaded.append(_attempt())
    return _loaded[0]


def _attempt() -> Ops | None:
    if not enabled():
        return None
    try:
        module = _compile()
    except Exception as error:  # no compiler, read-only cache, ...: the same results from the PyTorch code
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        causes = ("error:", "not found", "no such file", "permission denied")
        reason = next((line for line in lines if any(c in line.lower() for c in causes)), lines[-1] if lines else "")
        warnings.warn(
            f"vtome: the CPU merge kernels could not be built in {build_directory()} "
            f"({type(error).__name__}: {reason.strip()}); using the PyTorch code (same results, slower merge "
            "steps at small batch). Install a C++ compiler or set VTOME_CACHE to a writable folder; "
            "VTOME_KERNELS=0 turns the kernels off without this warning.",
            KernelWarning,
            stacklevel=4,
        )
        return None
    return Ops(module.match, module.average, module.sum_heads, module.step)


def ops(*tensors: torch.Tensor | None) -> Ops | None:
    """The compiled functions if they apply to ``tensors`` (None entries ignored): plain CPU tensors none of
    which needs an autograd graph (the functions record none), not while tracing for
    ``torch.compile``/``torch.export``/``torch.jit`` (whose graphs keep to ATen operations), nor under
    forward-mode AD or a ``torch.func`` transform (no rules for our functions), nor under CPU autocast (whose
    casts only the PyTorch code gets); else None."""
    # (runs at every merge step: the functions are looked up once, at import)
    grad = _grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or type(t) is not _Tensor or grad and t.requires_grad):
            return None
    if _is_compiling() or _is_exporting() or _is_tracing():
        return None
    if forward_ad._current_level >= 0 or _transforms() is not None or _autocast("cpu"):
        return None
    return _loaded[0] if _loaded else _load()


_Tensor = torch.Tensor
_grad_enabled = torch.is_grad_enabled
_is_compiling, _is_exporting = torch.compiler.is_compiling, torch.compiler.is_exporting
_is_tracing = torch._C._is_tracing
_transforms = torch._C._functorch.peek_interpreter_stack
_autocast = torch.is_autocast_enabled
