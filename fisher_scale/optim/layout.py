"""What an optimizer keeps, described without building its state (``fisher_scale.plan`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateLayout:
    """An optimizer's state as a memory plan counts it: ``per_element`` bytes for each element of every tensor
    it updates (moments; partitioned with those tensors under ZeRO), ``per_tensor`` bytes for each such tensor
    (AdamW's step count), and ``replicated`` bytes every rank holds whole (the Fisher factors). A tensor holding a
    part of one of ``fallback`` (parameters AdamW updates inside a Fisher optimizer) keeps ``fallback_per_element``
    more per element."""

    per_element: int
    per_tensor: int = 0
    replicated: int = 0
    fallback: frozenset[str] = frozenset()
    fallback_per_element: int = 0
