"""Optimizers by name, as configs and sweeps refer to them, and their state size."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fisher_scale.optim.adafish import AdaFish
from fisher_scale.optim.adafisher import AdaFisher, AdaFisherW, trainable_parameters

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adafisher": AdaFisher,
    "adafisherw": AdaFisherW,
    "adafish": AdaFish,
}


def build_optimizer(name: str, model: nn.Module, **hyperparameters: object) -> torch.optim.Optimizer:
    """``name`` (adamw | adafisher | adafisherw | adafish) over the trainable parameters of ``model``.

    AdamW takes ``lr``, ``beta`` (its β1; β2 = 0.999, eps = 1e-8) and ``weight_decay``; the Fisher
    optimizers take their constructor's arguments. Any other key is an error.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        unknown = set(hyperparameters) - {"lr", "beta", "weight_decay"}
        if unknown:
            raise ValueError(f"adamw does not take {sorted(unknown)} (only lr, beta, weight_decay)")
        return torch.optim.AdamW(
            trainable_parameters(model),
            lr=float(hyperparameters.get("lr", 1e-3)),
            betas=(float(hyperparameters.get("beta", 0.9)), 0.999),
            eps=1e-8,
            weight_decay=float(hyperparameters.get("weight_decay", 0.0)),
        )
    cls = OPTIMIZERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    unknown = set(hyperparameters) - accepted
    if unknown:
        raise ValueError(f"{name} does not take {sorted(unknown)} (it takes {sorted(accepted)})")
    return cls(model, **hyperparameters)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor a checkpoint of ``optimizer`` holds (moments, Fisher factors)."""
    total = 0

    def visit(value: object) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    state = optimizer.state_dict()
    visit(state["state"])
    visit(state.get("fisher"))
    return total
