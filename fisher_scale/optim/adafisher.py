"""AdaFisher and AdaFisherW (ALGORITHMS.md §1): Adam with its second moment replaced by a
diagonal Kronecker-factored empirical Fisher ``F̃[o, i] = S[o]·H[i] + λ``.

DECISIONS (ALGORITHMS.md): ``ema_mode="convex"`` (the paper's Eq. 3) is the default, with
``"official"`` reproducing the reference code (AtlasAnalyticsLab/AdaFisher, eb858c6);
``curvature_interval`` defaults to 1; parameters without a layer rule get AdamW
(``fallback="adamw"``) or, like the reference, ``F̃ = 1`` (``fallback="official"``). Unlike the
reference, parameters are paired with their layer by identity, so an unsupported parameter never
shifts the pairing of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from fisher_scale.optim.curvature import EMA_MODES, CurvatureTracker, LayerCurvature
from fisher_scale.optim.layers import ParamSlot

FALLBACKS = ("adamw", "official")


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model`` that require grad (tied parameters once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the nn.Module to optimise (hooks need it), got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter (none has requires_grad=True)")
    return params


def fragment_preconditioner(slot: ParamSlot, factors: tuple, damping: float, start: int, end: int) -> Tensor:
    """F̃ for elements [start, end) of the flattened parameter, built from the factor vectors only.

    Element ``idx`` of a parameter viewed as (rows, cols) pairs ``row[idx // cols]`` with
    ``col[idx % cols]``; only the rows the fragment touches are expanded, so a ZeRO partition of a
    large matrix never materialises F̃ for the whole matrix.
    """
    (h, _), (s, _) = factors
    rows, cols = slot.factor_pair(h, s)
    width = cols.numel()
    first, last = start // width, (end - 1) // width + 1
    block = torch.outer(rows[first:last], cols).reshape(-1)
    offset = first * width
    return block[start - offset : end - offset] + damping


class FisherOptimizer(torch.optim.Optimizer):
    """Shared machinery: validation, factor tracking, momentum, fallback and state dict.

    Subclasses set ``decoupled`` (AdaFisherW-style weight decay) and may override
    :meth:`_directions` (AdaFish preconditions whole layers).
    """

    decoupled: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        ema_decay: float = 0.8,
        ema_mode: str = "convex",
        curvature_interval: int = 1,
        weight_decay: float = 0.0,
        fallback: str = "adamw",
        *,
        max_full_dim: int = 0,
    ) -> None:
        _check(lr >= 0, "lr", ">= 0", lr)
        _check(0 <= beta < 1, "beta", "in [0, 1)", beta)
        _check(damping > 0, "damping", "> 0 (the normalised factors contain zeros)", damping)
        _check(0 <= ema_decay < 1, "ema_decay", "in [0, 1)", ema_decay)
        _check(ema_mode in EMA_MODES, "ema_mode", f"one of {EMA_MODES}", ema_mode)
        _check(
            isinstance(curvature_interval, int) and curvature_interval >= 1,
            "curvature_interval",
            "an integer >= 1",
            curvature_interval,
        )
        _check(weight_decay >= 0, "weight_decay", ">= 0", weight_decay)
        _check(fallback in FALLBACKS, "fallback", f"one of {FALLBACKS}", fallback)
        params = trainable_parameters(model)
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})
        self.damping = damping
        self.fallback = fallback
        self.curvature = CurvatureTracker(
            model, ema_decay=ema_decay, ema_mode=ema_mode, interval=curvature_interval, max_full_dim=max_full_dim
        )
        self._layer_of: dict[nn.Parameter, tuple[LayerCurvature, ParamSlot]] = {
            slot.param: (layer, slot) for layer in self.curvature.layers.values() for slot in layer.slots
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.curvature.fold()
        for group in self.param_groups:
            fisher = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p in self._layer_of or self.fallback == "official":
                    fisher.append(p)
                else:
                    self._adamw_step(p, group)
            moments = self._momenta(fisher, group)
            for p, direction in self._directions(fisher, moments).items():
                self._apply(p, direction, group)
        self.curvature.steps += 1
        return loss

    def _momenta(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """Advance the momenta ``m ← βm + (1-β)g`` of ``params`` in one batched update.

        AdaFisher (coupled weight decay) adds ``wd·θ`` to g first.
        """
        if not params:
            return []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        grads = [p.grad for p in params]
        if not self.decoupled and group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        moments = [self.state[p]["exp_avg"] for p in params]
        torch._foreach_mul_(moments, group["beta"])
        torch._foreach_add_(moments, grads, alpha=1 - group["beta"])
        return moments

    def _directions(self, params: list[Tensor], moments: list[Tensor]) -> dict[Tensor, Tensor]:
        """Preconditioned momentum ``m / F̃`` per parameter (F̃ = 1 before a layer's first statistic)."""
        directions = {}
        for p, m in zip(params, moments, strict=True):
            layer, slot = self._layer_of.get(p, (None, None))
            factors = None if layer is None else layer.factors
            if factors is None:
                directions[p] = m
            else:
                directions[p] = m / fragment_preconditioner(slot, factors, self.damping, 0, p.numel()).view_as(p)
        return directions

    def _apply(self, p: Tensor, direction: Tensor, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        bias_correction = 1 - group["beta"] ** self.state[p]["step"]
        if self.decoupled:
            p.sub_(lr * (direction / bias_correction + wd * p))
        else:
            p.add_(direction, alpha=-lr / bias_correction)

    def _adamw_step(self, p: Tensor, group: dict) -> None:
        """The default fallback: AdamW with β1 = β, β2 = 0.999, eps = 1e-8 and the group's lr and wd."""
        beta1, beta2, lr = group["beta"], 0.999, group["lr"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        grad = p.grad
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        p.mul_(1 - lr * group["weight_decay"])
        denom = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(1e-8)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** state["step"]))

    def curvature_contrast(self) -> dict[str, float]:
        """Per layer ``(max F̃ - min F̃) / min F̃`` (ALGORITHMS.md §1.5), for logging.

        Near 0 means F̃ ≈ λ everywhere: the method then behaves like momentum SGD with step lr/λ.
        """
        contrast = {}
        for name, layer in self.curvature.layers.items():
            factors = layer.factors
            if factors is None:
                continue
            (h, _), (s, _) = factors
            pairs = [slot.factor_pair(h, s) for slot in layer.slots]
            low = min(float(r.min() * c.min()) for r, c in pairs) + self.damping
            high = max(float(r.max() * c.max()) for r, c in pairs) + self.damping
            contrast[name] = (high - low) / low
        return contrast

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["fisher"] = self.curvature.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        fisher = state_dict.pop("fisher", None)
        if fisher is None:
            raise ValueError("optimizer state has no 'fisher' entry: it was not saved by a Fisher optimizer")
        super().load_state_dict(state_dict)
        self.curvature.load_state_dict(fisher)


class AdaFisher(FisherOptimizer):
    """``g ← g + wd·θ``; ``m ← βm + (1-β)g``; ``θ ← θ - lr/(1-βᵗ) · m / F̃`` (no square root, no eps)."""


class AdaFisherW(FisherOptimizer):
    """``m ← βm + (1-β)g``; ``θ ← θ - lr·(m / ((1-βᵗ)·F̃) + wd·θ)`` (decoupled weight decay)."""

    decoupled = True
