"""The paper's analyses: is merging semantic or visual (clip splicing), and what merging does to the
confusion matrix (its difference between two evaluations)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vtome.adapters import adapter_for
from vtome.adapters.inputs import clip_shape
from vtome.visualize import groups_after_layer


def splice(a: torch.Tensor, b: torch.Tensor, kind: str = "temporal") -> torch.Tensor:
    """``[T, C, H, W]`` clips -> one clip: first half of the frames from ``a`` and the rest from ``b``
    (``temporal``), or the left half of every frame from ``a`` and the right half from ``b`` (``spatial``)."""
    if a.shape != b.shape:
        raise ValueError(f"clips to splice must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    out = a.clone()
    if kind == "temporal":
        out[a.shape[0] // 2 :] = b[a.shape[0] // 2 :]
    elif kind == "spatial":
        out[..., a.shape[-1] // 2 :] = b[..., a.shape[-1] // 2 :]
    else:
        raise ValueError(f"--kind must be temporal or spatial; got {kind!r}")
    return out


def token_sides(model: nn.Module, kind: str) -> torch.Tensor:
    """Which side of the splice each input token lies on, ``[N0]``: 0 (from ``a``), 1 (from ``b``), -1
    (class token)."""
    positions, _, patch = adapter_for(model).token_positions(model)
    if kind == "temporal":
        side = (positions[:, 0] >= clip_shape(model)[0] // 2).long()
    else:
        side = (positions[:, 2] >= (clip_shape(model)[2] // patch) // 2).long()
    side[positions[:, 0] < 0] = -1
    return side


def crossing_groups(groups: torch.Tensor, sides: torch.Tensor) -> tuple[int, int]:
    """``(groups holding tokens from both sides, groups of more than one token)``."""
    keep = (groups >= 0) & (sides >= 0)
    crossing = merged = 0
    for g in groups[keep].unique().tolist():
        members = sides[keep][groups[keep] == g]
        if len(members) > 1:
            merged += 1
            crossing += int(members.min() != members.max())
    return crossing, merged


def splice_study(
    model: nn.Module, a: torch.Tensor, b: torch.Tensor, kind: str = "temporal", **patch_kwargs: object
) -> list[dict]:
    """Per layer: merge groups crossing the splice of ``a`` with ``b``, against ``a`` spliced with itself
    (the same-clip control). ``a``, ``b``: normalised ``[T, C, H, W]``."""
    sides = token_sides(model, kind)
    spliced = splice(a, b, kind)[None]
    control = a[None]
    rows = []
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        s_cross, s_merged = crossing_groups(groups_after_layer(model, spliced, layer, **patch_kwargs), sides)
        c_cross, c_merged = crossing_groups(groups_after_layer(model, control, layer, **patch_kwargs), sides)
        rows.append(
            {
                "layer": layer,
                "spliced_crossing": s_cross,
                "spliced_groups": s_merged,
                "control_crossing": c_cross,
                "control_groups": c_merged,
                "spliced_share": s_cross / s_merged if s_merged else 0.0,
                "control_share": c_cross / c_merged if c_merged else 0.0,
            }
        )
    return rows


def plot_splice(rows: list[dict], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [100 * r["spliced_share"] for r in rows], "o-", label="two clips spliced")
    ax.plot(layers, [100 * r["control_share"] for r in rows], "s--", label="same clip (control)")
    ax.set_xlabel("layer")
    ax.set_ylabel("merge groups crossing the splice (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _eval_folder(run: str | Path) -> Path:
    path = Path(run)
    return path if path.is_dir() else path.parent


def load_confusion(run: str | Path) -> tuple[list[str], np.ndarray]:
    """Class names and confusion matrix ``[K, K]`` (rows: true, columns: predicted) of an eval folder (or
    its ``confusion.json``); ``ValueError`` naming the file when it is not one."""
    path = Path(run)
    path = path / "confusion.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no confusion.json (run `vtome eval --out {run}` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names, matrix = data["classes"], np.asarray(data["matrix"])
        ok = (
            isinstance(names, list)
            and matrix.ndim == 2
            and matrix.shape[0] == matrix.shape[1] >= len(names)
            and np.issubdtype(matrix.dtype, np.integer)
            and (matrix >= 0).all()
        )
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, OSError):
        ok = False
    if not ok:
        raise ValueError(
            f"{path} is not a confusion.json written by `vtome eval` (expected classes and a square matrix of "
            "counts); pass an eval folder"
        )
    names = [str(n) for n in names]  # classes the dataset does not name (predicted only) go by index
    return names + [str(i) for i in range(len(names), len(matrix))], matrix


# What two evaluations must share to be compared: everything about the data (the model and the merge
# settings may differ; comparing them is the point). Keys are manifest ``settings`` keys, flattened.
_SAME_DATA = ("data.", "epic.verb_classes")


def check_comparable(before: str | Path, after: str | Path) -> None:
    """``ValueError`` unless the eval folders ``before`` and ``after`` evaluated the same videos with the same
    labels: their manifests must agree on the dataset, its root, the split and labels files (by content),
    the class mapping and the ``--limit``. The error names each field that differs."""
    from vtome.outdir import MANIFEST, _flat, _short

    manifests, limits = [], []
    for run in (before, after):
        if not Path(run).exists():
            raise FileNotFoundError(f"{run} does not exist; pass the --out folder of a `vtome eval` run")
        folder = _eval_folder(run)
        path = folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            settings = manifest["settings"]
            if not isinstance(settings, dict):
                raise TypeError
        except FileNotFoundError:
            raise ValueError(
                f"{folder} has no {MANIFEST}, so what it evaluated is unknown; compare folders written by `vtome eval`"
            ) from None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, OSError):
            raise ValueError(f"{path} is damaged, so what {folder} evaluated is unknown") from None
        files = settings.get("data", {}).get("files", {})
        if isinstance(files, dict):  # compared by content: the same split file may sit at another path
            settings = {**settings, "data": {**settings["data"], "files": sorted(files.values())}}
        manifests.append(_flat(settings))
        try:
            limits.append(json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("limit"))
        except (OSError, ValueError, AttributeError):
            limits.append("<unknown>")
    a, b = manifests
    keys = sorted(k for k in set(a) | set(b) if k.startswith(_SAME_DATA))
    diff = [
        f"{k}: {_short(a.get(k, '<not set>'))} in {before}, {_short(b.get(k, '<not set>'))} in {after}"
        for k in keys
        if a.get(k, "<not set>") != b.get(k, "<not set>")
    ]
    if limits[0] != limits[1]:
        diff.append(f"limit (--limit): {limits[0]} in {before}, {limits[1]} in {after}")
    if diff:
        raise ValueError(
            "the two evaluations do not cover the same data, so their confusion matrices cannot be compared:\n  "
            + "\n  ".join(diff)
            + "\nEvaluate both models on the same dataset, split, labels and --limit"
        )


def confusion_change(before: str | Path, after: str | Path, top: int = 20) -> dict:
    """How predictions moved from run ``before`` to run ``after`` (two eval folders of the same data, see
    :func:`check_comparable`): the difference matrix (more / fewer predictions per cell) and the classes
    whose accuracy dropped most (at most ``top``)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"--top must be an integer >= 0 (classes to list); got {top!r}")
    check_comparable(before, after)
    names_a, a = load_confusion(before)
    names_b, b = load_confusion(after)
    k = max(len(a), len(b))  # a matrix grows with the highest class predicted: pad the smaller with zeros
    if names_a[: min(len(a), len(b))] != names_b[: min(len(a), len(b))]:
        raise ValueError(f"{before} and {after} name their classes differently; compare runs of one dataset")
    names_a = names_a if len(a) == k else names_b
    a, b = (np.pad(m, (0, k - len(m))) for m in (a, b))
    counts_a, counts_b = a.sum(1), b.sum(1)
    if (counts_a != counts_b).any():
        c = int(np.flatnonzero(counts_a != counts_b)[0])
        raise ValueError(
            f"the two evaluations scored different videos: class {names_a[c]!r} has {counts_a[c]} scored videos in "
            f"{before} and {counts_b[c]} in {after} ({int(counts_a.sum())} vs {int(counts_b.sum())} in all; videos "
            "that failed to decode in one run are left out of its matrix). Compare runs where the same videos "
            "were evaluated"
        )
    diff = b - a
    totals = np.maximum(a.sum(1), 1)
    drop = (np.diag(a) - np.diag(b)) / totals
    order = np.argsort(-drop, kind="stable")
    lost = [
        {
            "class": names_a[i],
            "accuracy_before": float(a[i, i] / totals[i]),
            "accuracy_after": float(b[i, i] / totals[i]),
            "drop": float(drop[i]),
        }
        for i in order[:top]
        if drop[i] > 0
    ]
    return {"classes": names_a, "diff": diff, "lost_most": lost}


def plot_confusion_change(change: dict, path: str | Path, k: int = 20) -> None:
    """Image of the difference for the first ``k`` classes: red, more predictions; blue, fewer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--classes must be an integer >= 1 (classes drawn); got {k!r}")
    diff = change["diff"][:k, :k]
    bound = max(1, int(np.abs(diff).max()))
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound)
    names = change["classes"][:k]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, label="predictions after - before")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
