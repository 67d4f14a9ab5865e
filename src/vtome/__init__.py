"""vtome: training-free token merging for video transformers (Pollard & Wray 2025, after Bolya et al. 2023)."""

from vtome.merge import MODES
from vtome.merger import RunInfo
from vtome.patch import is_patched, last_run, layout, patch, settings, unmerge, unpatch
from vtome.settings import Inflection, MergeSettings

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "Inflection",
    "MergeSettings",
    "RunInfo",
    "is_patched",
    "last_run",
    "layout",
    "patch",
    "settings",
    "unmerge",
    "unpatch",
]
