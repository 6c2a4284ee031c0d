"""Non-finite losses and gradients: stop with the step and the layer, or skip the step exactly.

The guard hooks the client optimizer's ``step()`` (DeepSpeed calls it for every ZeRO stage). Ranks
agree through one all-reduce of a flag, so all of them stop or skip together. A skipped step leaves
parameters, optimizer state and Fisher factors exactly as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisher_scale.optim import FisherOptimizer
from fisher_scale.optim.distributor import all_reduce_numbers
from fisher_scale.optim.pieces import PieceMap


class NonFiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, pieces: PieceMap, *, skip: bool) -> None:
        self.optimizer, self.pieces, self.skip = optimizer, pieces, skip
        self.step = 0
        self.skipped = 0
        self._bad_loss = False
        self._snapshot: tuple[dict[Tensor, Tensor], dict[Tensor, dict], int] | None = None
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def check_loss(self, loss: Tensor, step: int) -> None:
        self.step = step
        if not torch.isfinite(loss.detach()).all():
            if not self.skip:
                raise FloatingPointError(f"non-finite loss {float(loss.detach())} at optimizer step {step}")
            self._bad_loss = True

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

    def _before(self, *_: object) -> None:
        bad = self._first_bad_parameter()
        (flag,) = all_reduce_numbers(float(bad is not None or self._bad_loss), op="max")
        if flag == 0:
            return
        if not self.skip:
            where = f"in parameter {bad!r}" if bad else "on another rank"
            raise FloatingPointError(f"non-finite gradient {where} at optimizer step {self.step}")
        tensors = [t for g in self.optimizer.param_groups for t in g["params"]]
        values = {t: t.detach().clone() for t in tensors}
        states = {
            t: {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.optimizer.state.get(t, {}).items()}
            for t in tensors
        }
        curvature_steps = self.optimizer.curvature.steps if isinstance(self.optimizer, FisherOptimizer) else 0
        self._snapshot = values, states, curvature_steps
        for tensor in tensors:
            if tensor.grad is not None:
                tensor.grad.zero_()
        if isinstance(self.optimizer, FisherOptimizer):
            self.optimizer.curvature.discard()

    @torch.no_grad()
    def _after(self, *_: object) -> None:
        if self._snapshot is None:
            return
        values, states, curvature_steps = self._snapshot
        for tensor, value in values.items():
            tensor.copy_(value)
            if states[tensor]:
                self.optimizer.state[tensor] = states[tensor]
            else:
                self.optimizer.state.pop(tensor, None)
        if isinstance(self.optimizer, FisherOptimizer):
            self.optimizer.curvature.steps = curvature_steps
        self._snapshot = None
        self._bad_loss = False
        self.skipped += 1
