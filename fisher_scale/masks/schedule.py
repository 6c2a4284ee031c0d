"""When a FISH mask is computed during training: after ``warmup_steps`` dense steps, then every
``refresh_every`` steps (0 = never again).

**DECISION** (ALGORITHMS.md §3): warmup 0 (the default) scores at initialisation, which with
LoRA's B = 0 init selects no A entry at all; every (re)computation returns the kept fractions per
A/B kind, block and matrix so that runs show it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from fisher_scale.masks.mask import Mask, MaskedUpdates, mask_report, select_mask
from fisher_scale.masks.scoring import DEFAULT_HEAD, candidate_parameters, fisher_scores
from fisher_scale.optim.pieces import PieceMap


class MaskSchedule:
    """Computes, applies and refreshes the mask of one training run; call :meth:`before_step` with
    the 0-based index of the optimizer step about to run."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        score_batches: Callable[[], Iterable[Mapping[str, Tensor]]],
        *,
        target: str = "peft",
        ratio: float,
        selection: str = "fisher",
        seed: int = 0,
        samples: int = 1024,
        variant: str = "empirical",
        warmup_steps: int = 0,
        refresh_every: int = 0,
        head: Sequence[str] = DEFAULT_HEAD,
        pieces: PieceMap | None = None,
        scoring_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        register: bool = True,
    ) -> None:
        for name, value in (("mask.warmup_steps", warmup_steps), ("mask.refresh_every", refresh_every)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.model, self.optimizer, self.score_batches = model, optimizer, score_batches
        self.target, self.ratio, self.samples, self.variant = target, ratio, samples, variant
        self.selection, self.seed = selection, seed
        self.warmup_steps, self.refresh_every, self.head = warmup_steps, refresh_every, tuple(head)
        self.pieces = pieces
        #: entered around scoring, e.g. to give torch.func whole parameters under ZeRO-3
        self.scoring_context = scoring_context
        self.mask: Mask | None = None
        self.report: dict[str, float] = {}
        self.updates: MaskedUpdates | None = None
        #: False: the caller runs :meth:`pre_step`/:meth:`post_step` in its own ordered list (``MaskedUpdates``)
        self.register = register

    def due(self, step: int) -> bool:
        since = step - self.warmup_steps
        return since == 0 or (self.refresh_every > 0 and since > 0 and since % self.refresh_every == 0)

    def before_step(self, step: int) -> dict[str, float] | None:
        """(Re)compute and apply the mask if ``step`` is due; returns its kept-fraction report then."""
        if not self.due(step):
            return None
        with self.scoring_context():
            scores = self._scores()
        _, heads = candidate_parameters(self.model, self.target, self.head)
        self.restore(select_mask(scores, self.ratio, always_keep=heads, selection=self.selection, seed=self.seed))
        return self.report

    def _scores(self) -> dict[str, Tensor]:
        """Fisher scores of the candidates; a random selection needs only their shapes."""
        if self.selection == "random":
            candidates, _ = candidate_parameters(self.model, self.target, self.head)
            return {name: torch.zeros(p.shape) for name, p in candidates.items()}
        return fisher_scores(
            self.model,
            self.score_batches(),
            target=self.target,
            variant=self.variant,
            samples=self.samples,
            head=self.head,
        )

    def full_state(self) -> AbstractContextManager:
        """The optimizer state at full size inside the block (see :class:`MaskedUpdates`)."""
        return contextlib.nullcontext() if self.updates is None else self.updates.full_state()

    def pre_step(self) -> None:
        if self.updates is not None:
            self.updates.pre_step()

    def post_step(self) -> None:
        if self.updates is not None:
            self.updates.post_step()

    def restore(self, mask: Mask) -> None:
        """Apply ``mask`` (a new selection, or one read back from a checkpoint)."""
        self.mask = mask
        if self.updates is None:
            self.updates = MaskedUpdates(self.model, self.optimizer, mask, self.pieces, register=self.register)
        else:
            self.updates.update(mask)
        self.report = mask_report(mask)
