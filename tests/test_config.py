"""Config sections: defaults, validation errors that name the key, and the optimizer they build."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fisher_scale.config import MaskConfig, OptimizerConfig
from fisher_scale.optim import AdaFish, AdaFisher, build_optimizer

from .conftest import tiny_lora_qwen2


@pytest.mark.parametrize(
    "section,values,key",
    [
        (MaskConfig, {"ratio": 0.0}, "ratio"),
        (MaskConfig, {"ratio": 1.2}, "ratio"),
        (MaskConfig, {"samples": 0}, "samples"),
        (MaskConfig, {"variant": "fisher"}, "variant"),
        (MaskConfig, {"target": "adapters"}, "target"),
        (MaskConfig, {"warmup_steps": -1}, "warmup_steps"),
        (MaskConfig, {"ratoi": 0.1}, "ratoi"),
        (OptimizerConfig, {"damping": -1e-3}, "damping"),
        (OptimizerConfig, {"ema_decay": 1.0}, "ema_decay"),
        (OptimizerConfig, {"name": "sgd"}, "name"),
        (OptimizerConfig, {"curvature_interval": 0}, "curvature_interval"),
    ],
)
def test_invalid_values_and_unknown_keys_name_the_key(section, values: dict, key: str) -> None:
    with pytest.raises(ValidationError) as error:
        section(**values)
    assert [e["loc"] for e in error.value.errors()] == [(key,)]


def test_optimizer_section_builds_the_named_optimizer() -> None:
    model = tiny_lora_qwen2()
    optimizer = build_optimizer("adafisher", model, **OptimizerConfig(damping=0.01).hyperparameters(lr=0.1))
    assert isinstance(optimizer, AdaFisher) and optimizer.damping == 0.01
    assert optimizer.param_groups[0]["lr"] == 0.1
    adafish = build_optimizer("adafish", model, **OptimizerConfig(name="adafish", max_full_dim=8).hyperparameters(1.0))
    assert isinstance(adafish, AdaFish)
    adamw = build_optimizer("adamw", model, **OptimizerConfig(name="adamw", beta=0.8, eps=1e-5).hyperparameters(1e-3))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.999) and adamw.param_groups[0]["eps"] == 1e-5
    with pytest.raises(ValueError, match=r"adamw does not take \['damping'\]"):
        build_optimizer("adamw", model, lr=1e-3, damping=1e-3)
