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

import contextlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from fisher_scale.hyperparameters import ADAMW_BETA2, AdaFisherHyperparameters
from fisher_scale.optim.curvature import CurvatureTracker, LayerCurvature
from fisher_scale.optim.distributor import Distributor
from fisher_scale.optim.layers import ParamSlot
from fisher_scale.optim.layout import StateLayout
from fisher_scale.optim.pieces import Piece


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

    #: the hyperparameters this optimizer takes, with their defaults and valid values
    hyperparameter_class: ClassVar[type[AdaFisherHyperparameters]] = AdaFisherHyperparameters

    def __init__(self, model: nn.Module, **hyperparameters: object) -> None:
        """``model``'s trainable parameters, with the keyword arguments of :attr:`hyperparameter_class`
        (``lr``, ``beta``, ``damping``, ``ema_decay``, ...; README's optimizer table). A bad value is a
        ``ValueError`` naming the argument; an unknown one a ``TypeError``."""
        settings = self.hyperparameter_class(**hyperparameters)
        params = trainable_parameters(model)
        super().__init__(
            params,
            {"lr": settings.lr, "beta": settings.beta, "weight_decay": settings.weight_decay, "eps": settings.eps},
        )
        self.hyperparameters = settings
        self.damping = settings.damping
        self.fallback = settings.fallback
        self.curvature = CurvatureTracker(
            model,
            ema_decay=settings.ema_decay,
            ema_mode=settings.ema_mode,
            interval=settings.curvature_interval,
            max_full_dim=getattr(settings, "max_full_dim", 0),
        )
        self._layer_of: dict[nn.Parameter, tuple[LayerCurvature, ParamSlot]] = {
            slot.param: (layer, slot) for layer in self.curvature.layers.values() for slot in layer.slots
        }
        self.distributor = Distributor(model)
        self._in_step = False  # inside one_step()
        self._folded = False  # this optimizer step's statistics are folded into the factors
        self._skipped = False  # this optimizer step is skipped: it does not count

    def distribute(self, distributor: Distributor) -> None:
        """Optimise the tensors ``distributor`` maps (e.g. the ZeRO partitions a DeepSpeed engine hands over,
        disjoint across ranks) instead of the parameters."""
        self.distributor = distributor

    @property
    def pieces(self) -> dict[Tensor, list[Piece]]:
        return self.distributor.pieces

    @contextlib.contextmanager
    def one_step(self) -> Iterator[None]:
        """One optimizer step made of every ``step()`` call inside (a DeepSpeed engine's step calls its client once
        per param group, or per ZeRO-3 sub-group): the factors fold at the first call and the step counts once, at
        the end; a step DeepSpeed dropped without calling the client leaves the factors as they were and does not
        count. A ``step()`` outside is a whole optimizer step by itself."""
        self._in_step, self._folded, self._skipped = True, False, False
        try:
            yield
        finally:
            self._in_step = False
            if not self._folded:  # no step() call: DeepSpeed dropped the step (a non-finite gradient norm)
                self.skip_step()
            self._end_step()

    def skip_step(self) -> None:
        """Leave this optimizer step's statistics out and do not count it (a skipped non-finite step)."""
        self.curvature.discard()
        self._skipped = True

    def _end_step(self) -> None:
        if not self._skipped:
            self.curvature.steps += 1
        self._skipped = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        whole_step = not self._in_step
        if whole_step:
            self._folded = False
        if not self._folded:
            self.curvature.fold()
            self._folded = True
        for group in self.param_groups:
            fisher: list[tuple[Tensor, Piece]] = []
            for tensor in group["params"]:
                if tensor.grad is None or tensor.numel() == 0:
                    continue
                state = self.state[tensor]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
                state["step"] += 1
                for piece in self.pieces.get(tensor, ()):
                    if piece.param in self._layer_of or self.fallback == "official":
                        self._momentum(tensor, piece, group)
                        fisher.append((tensor, piece))
                    else:
                        self._adamw_step(tensor, piece, group)
            for (tensor, piece), direction in zip(fisher, self._directions(fisher), strict=True):
                self._apply(tensor, piece, direction, group)
        if whole_step:
            self._end_step()
        return loss

    def _momentum(self, tensor: Tensor, piece: Piece, group: dict) -> None:
        """``m ← βm + (1-β)g`` on the piece (AdaFisher adds ``wd·θ`` to g first)."""
        grad = piece.of(tensor.grad)
        if not self.decoupled and group["weight_decay"] != 0:
            grad = grad.add(piece.of(tensor), alpha=group["weight_decay"])
        piece.of(self.state[tensor]["exp_avg"]).mul_(group["beta"]).add_(grad, alpha=1 - group["beta"])

    def _directions(self, work: list[tuple[Tensor, Piece]]) -> list[Tensor]:
        """Preconditioned momentum ``m / F̃`` per piece (F̃ = 1 before a layer's first statistic)."""
        directions, computed = [], {}
        for tensor, piece in work:
            m = piece.of(self.state[tensor]["exp_avg"])
            layer, slot = self._layer_of.get(piece.param, (None, None))
            if layer is not None and layer not in computed:
                computed[layer] = layer.factors
            factors = None if layer is None else computed[layer]
            if factors is None:
                directions.append(m)
            else:
                directions.append(m / fragment_preconditioner(slot, factors, self.damping, piece.start, piece.end))
        return directions

    def _apply(self, tensor: Tensor, piece: Piece, direction: Tensor, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        bias_correction = 1 - group["beta"] ** self.state[tensor]["step"]
        theta = piece.of(tensor)
        if self.decoupled:
            theta.sub_(lr * (direction / bias_correction + wd * theta))
        else:
            theta.add_(direction, alpha=-lr / bias_correction)

    def _adamw_step(self, tensor: Tensor, piece: Piece, group: dict) -> None:
        """The default fallback: AdamW with β1 = β, β2 = 0.999 and the group's lr, eps and wd."""
        beta1, beta2, lr = group["beta"], ADAMW_BETA2, group["lr"]
        state = self.state[tensor]
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        step, grad, theta = state["step"], piece.of(tensor.grad), piece.of(tensor)
        m, v = piece.of(state["exp_avg"]), piece.of(state["exp_avg_sq"])
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        theta.mul_(1 - lr * group["weight_decay"])
        denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])
        theta.addcdiv_(m, denom, value=-lr / (1 - beta1**step))

    def state_layout(self, model: nn.Module) -> StateLayout:
        """Momentum per element, the factors whole on every rank, and AdamW's second moment where a parameter
        falls back to AdamW (a tensor holding any such part keeps it for all its elements)."""
        falls_back = self.fallback == "adamw"
        fallback = frozenset(n for n, p in model.named_parameters() if p.requires_grad and p not in self._layer_of)
        return StateLayout(
            per_element=4,
            replicated=self.curvature.planned_bytes(),
            fallback=fallback if falls_back else frozenset(),
            fallback_per_element=4 * falls_back,
        )

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
