"""FISH Mask and FISH-Tuning (ALGORITHMS.md §3): Fisher-selected sparse updates for any optimizer.

Imports nothing but torch (peft lazily, for ``target="peft"``; safetensors for files).
"""

from fisher_scale.masks.mask import (
    MaskedUpdates,
    apply_mask,
    equal_budget_ratio,
    load_mask,
    mask_report,
    save_mask,
    select_mask,
)
from fisher_scale.masks.schedule import MaskSchedule
from fisher_scale.masks.scoring import DEFAULT_HEAD, TARGETS, VARIANTS, candidate_parameters, fisher_scores

__all__ = [
    "DEFAULT_HEAD",
    "TARGETS",
    "VARIANTS",
    "MaskSchedule",
    "MaskedUpdates",
    "apply_mask",
    "candidate_parameters",
    "equal_budget_ratio",
    "fisher_scores",
    "load_mask",
    "mask_report",
    "save_mask",
    "select_mask",
]
