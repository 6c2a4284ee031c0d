"""Code that runs around every ``step()`` call of an optimizer, in one explicit nesting order.

A FISH mask restores its masked entries and packs their state after each step; the training loop's non-finite
guard snapshots and restores a skipped step. Both change what the other sees, so they are registered together,
as one list that nests them: ``pre_step`` runs outermost first and ``post_step`` innermost first, so each wrapper
undoes its own change around exactly what the inner ones did, and the result does not depend on which is outer
(before, two hook pairs interleaved, and the mask had to recognise state the guard had put back packed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class StepWrapper(Protocol):
    def pre_step(self) -> None: ...

    def post_step(self) -> None: ...


class AroundStep:
    """``wrappers`` (outermost first) around every ``optimizer.step()`` call, through one pre- and one post-hook."""

    def __init__(self, optimizer: torch.optim.Optimizer, wrappers: Sequence[StepWrapper]) -> None:
        self.wrappers = tuple(wrappers)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, *_: object) -> None:
        for wrapper in self.wrappers:
            wrapper.pre_step()

    def _post(self, *_: object) -> None:
        for wrapper in reversed(self.wrappers):
            wrapper.post_step()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
