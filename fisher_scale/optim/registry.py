"""Optimizers by name, as configs and sweeps refer to them, and their state size."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fisher_scale.optim.adafish import AdaFish
from fisher_scale.optim.adafisher import (
    ADAMW_BETA2,
    ADAMW_EPS,
    AdaFisher,
    AdaFisherW,
    FisherOptimizer,
    trainable_parameters,
)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adafisher": AdaFisher,
    "adafisherw": AdaFisherW,
    "adafish": AdaFish,
}


def build_optimizer(name: str, model: nn.Module, **hyperparameters: object) -> torch.optim.Optimizer:
    """``name`` (adamw | adafisher | adafisherw | adafish) over the trainable parameters of ``model``.

    AdamW takes ``lr``, ``beta`` (its β1; β2 = 0.999), ``eps`` and ``weight_decay``; the Fisher
    optimizers take their constructor's arguments. Any other key is an error.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        unknown = set(hyperparameters) - {"lr", "beta", "eps", "weight_decay"}
        if unknown:
            raise ValueError(f"adamw does not take {sorted(unknown)} (only lr, beta, eps, weight_decay)")
        return torch.optim.AdamW(
            trainable_parameters(model),
            lr=float(hyperparameters.get("lr", 1e-3)),
            betas=(float(hyperparameters.get("beta", 0.9)), ADAMW_BETA2),
            eps=float(hyperparameters.get("eps", ADAMW_EPS)),
            weight_decay=float(hyperparameters.get("weight_decay", 0.0)),
        )
    cls = OPTIMIZERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    unknown = set(hyperparameters) - accepted
    if unknown:
        raise ValueError(f"{name} does not take {sorted(unknown)} (it takes {sorted(accepted)})")
    return cls(model, **hyperparameters)


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
