"""Non-finite losses and gradients: stop with the step and the layer, or skip the step exactly.

The guard wraps the client optimizer's ``step()`` calls (DeepSpeed makes one per param group or ZeRO-3
sub-group) as one of the loop's nested :class:`~fisher_scale.optim.around_step.AroundStep` wrappers: it
restores only what it snapshotted, whatever a mask inside or outside it does. Ranks agree through an
all-reduce of a flag in each call, so all of them stop or skip together. A skipped step leaves parameters,
optimizer state and Fisher factors exactly as they were, and does not count; every call of a skipped step
is skipped. A non-finite gradient first seen in a later call of an optimizer step cannot be skipped exactly
(the groups before it have stepped): that stops the run, saying so. Under ZeRO 1-3 DeepSpeed itself drops a
step whose gradient norm is non-finite without calling the client: the loop reports that through
:meth:`end_step`, which stops or counts the skip the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_scale.errors import NonFiniteError
from fisher_scale.optim import FisherOptimizer
from fisher_scale.optim.distributor import all_reduce_numbers
from fisher_scale.optim.pieces import PieceMap


class NonFiniteGuard:
    def __init__(
        self, optimizer: torch.optim.Optimizer, pieces: PieceMap, *, skip: bool, loss_scaling: bool = False
    ) -> None:
        self.optimizer, self.pieces, self.skip = optimizer, pieces, skip
        #: fp16 with DeepSpeed's dynamic loss scale: its dropped steps are overflows it answers by lowering the scale
        self.loss_scaling = loss_scaling
        self.step = 0
        self.skipped = 0
        self._bad_loss = False
        self._calls = 0  # step() calls so far in this optimizer step
        self._skipping = False  # this optimizer step is being skipped
        self._snapshot: tuple[dict[Tensor, Tensor], dict[Tensor, dict]] | None = None

    def begin_step(self, step: int) -> None:
        self.step = step
        self._bad_loss, self._calls, self._skipping = False, 0, False

    def check_loss(self, loss: Tensor) -> None:
        """Every micro-batch's loss, before its backward. A non-finite one is remembered and acted on at the step's
        optimizer call, where the ranks agree: a rank that stopped alone would leave the others in a collective."""
        if not torch.isfinite(loss.detach()).all():
            self._bad_loss = True

    def end_step(self, applied: bool, loss_finite: bool) -> None:
        """After the engine step that runs the optimizer. ``applied``: DeepSpeed's ``was_step_applied()``;
        ``loss_finite``: whether the step's loss summed over the ranks is finite (every rank sees the same sum)."""
        if not (applied or self._skipping):
            if not (self.skip or self.loss_scaling):
                what = "loss" if self._bad_loss else "gradient"
                raise NonFiniteError(
                    f"non-finite {what} at optimizer step {self.step}: DeepSpeed found the gradient norm non-finite "
                    "and dropped the step"
                )
            self.skipped += 1
        if not (loss_finite or self.skip):
            raise NonFiniteError(f"non-finite loss at optimizer step {self.step}")

    def _first_bad_parameter(self) -> str | None:
        for group in self.optimizer.param_groups:
            for tensor in group["params"]:
                if tensor.grad is None or torch.isfinite(tensor.grad).all():
                    continue
                for piece in self.pieces.get(tensor, ()):
                    if not torch.isfinite(piece.of(tensor.grad)).all():
                        return piece.name
                return "(padding)"
        return None

    def pre_step(self) -> None:
        self._calls += 1
        if not self._skipping:
            bad = self._first_bad_parameter()
            (flag,) = all_reduce_numbers(2.0 if self._bad_loss else float(bad is not None), op="max")
            if flag == 0:
                return
            where = "loss" if flag == 2 else f"gradient in parameter {bad!r}" if bad else "gradient on another rank"
            if not self.skip:
                raise NonFiniteError(f"non-finite {where} at optimizer step {self.step}")
            if self._calls > 1:
                raise NonFiniteError(
                    f"non-finite {where} at optimizer step {self.step}, first seen in step() call "
                    f"{self._calls} of that step (a later param group or ZeRO-3 sub-group): the groups stepped "
                    "before it cannot be restored, so it cannot be skipped exactly; keep the trainable parameters "
                    "in one group (raise zero_optimization.sub_group_size)"
                )
            self._skipping, self._bad_loss = True, False
            self.skipped += 1
            if isinstance(self.optimizer, FisherOptimizer):
                self.optimizer.skip_step()
        tensors = [t for g in self.optimizer.param_groups for t in g["params"]]
        values = {t: t.detach().clone() for t in tensors}
        states = {
            t: {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.optimizer.state.get(t, {}).items()}
            for t in tensors
        }
        self._snapshot = values, states
        for tensor in tensors:
            if tensor.grad is not None:
                tensor.grad.zero_()

    @torch.no_grad()
    def post_step(self) -> None:
        if self._snapshot is None:
            return
        values, states = self._snapshot
        for tensor, value in values.items():
            tensor.copy_(value)
            if states[tensor]:
                self.optimizer.state[tensor] = states[tensor]
            else:
                self.optimizer.state.pop(tensor, None)
        self._snapshot = None
