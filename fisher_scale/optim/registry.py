"""Optimizers by name, as configs and sweeps refer to them, and their state size."""

from __future__ import annotations

import torch
from torch import nn

from fisher_scale.hyperparameters import ADAMW_BETA2, hyperparameters_of
from fisher_scale.optim.adafish import AdaFish
from fisher_scale.optim.adafisher import AdaFisher, AdaFisherW, FisherOptimizer, trainable_parameters
from fisher_scale.optim.layout import StateLayout

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adafisher": AdaFisher,
    "adafisherw": AdaFisherW,
    "adafish": AdaFish,
}


def build_optimizer(name: str, model: nn.Module, **hyperparameters: object) -> torch.optim.Optimizer:
    """``name`` (adamw | adafisher | adafisherw | adafish) over the trainable parameters of ``model``, with that
    optimizer's hyperparameters (``fisher_scale.hyperparameters``: AdamW's ``lr``, ``beta`` (β1; β2 = 0.999),
    ``eps``, ``weight_decay``; the Fisher optimizers' add damping, EMA, ...). Any other key is an error."""
    settings = hyperparameters_of(name, hyperparameters)
    if name != "adamw":
        return OPTIMIZERS[name](model, **settings.as_dict())
    return torch.optim.AdamW(
        trainable_parameters(model),
        lr=settings.lr,
        betas=(settings.beta, ADAMW_BETA2),
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )


def state_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> StateLayout:
    """The layout of ``optimizer`` built over ``model`` (a meta-device skeleton will do: nothing is allocated)."""
    if isinstance(optimizer, FisherOptimizer):
        return optimizer.state_layout(model)
    if isinstance(optimizer, torch.optim.AdamW):
        return StateLayout(per_element=8, per_tensor=4)  # exp_avg, exp_avg_sq; step is an fp32 scalar tensor
    raise TypeError(f"no state layout for {type(optimizer).__name__}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (moments; Fisher factors and their cached eigenbases).

    Walks ``optimizer.state`` itself: under ZeRO 3 the client optimizer's ``param_groups`` are empty
    outside its step, so ``state_dict()`` cannot be used there.
    """
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if isinstance(optimizer, FisherOptimizer):
        for layer in optimizer.curvature.layers.values():
            tensors += [t for t in (layer.H, layer.S) if t is not None]
            tensors += [t for factor in layer.eigen.values() for t in factor]
    return sum(t.numel() * t.element_size() for t in tensors)
