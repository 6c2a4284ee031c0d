"""Typed, validated schema of the experiment YAML keys (one place; unknown keys are errors).

Sections land here as their capabilities do: ``optimizer.*`` and ``mask.*`` so far; the
training, data, tune and scale sections come with their issues.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fisher_scale.masks.scoring import DEFAULT_HEAD


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(Section):
    """``optimizer.*``: which optimizer and its hyperparameters (the learning rate is the top-level ``lr``)."""

    name: Literal["adamw", "adafisher", "adafisherw", "adafish"] = "adafisher"
    beta: float = Field(0.9, ge=0, lt=1, description="momentum β (AdamW's β1)")
    damping: float = Field(1e-3, gt=0, description="λ added to F̃")
    ema_decay: float = Field(0.8, ge=0, lt=1, description="γ of the factor EMA")
    ema_mode: Literal["convex", "official"] = "convex"
    curvature_interval: int = Field(1, ge=1, description="statistics on steps k with k % T == 0")
    weight_decay: float = Field(0.0, ge=0)
    fallback: Literal["adamw", "official"] = "adamw"
    max_full_dim: int = Field(64, ge=0, description="AdaFish: factor sides up to this size are full matrices")

    def hyperparameters(self, lr: float) -> dict[str, object]:
        """The keyword arguments of ``fisher_scale.optim.build_optimizer`` for this optimizer."""
        if self.name == "adamw":
            return {"lr": lr, "beta": self.beta, "weight_decay": self.weight_decay}
        fisher = self.model_dump(exclude={"name", "max_full_dim"})
        if self.name == "adafish":
            fisher["max_full_dim"] = self.max_full_dim
        return {"lr": lr, **fisher}


class MaskConfig(Section):
    """``mask.*``: FISH Mask / FISH-Tuning (ALGORITHMS.md §3)."""

    enabled: bool = False
    target: Literal["peft", "model"] = Field("peft", description="peft: adapter matrices; model: all parameters")
    ratio: float = Field(0.5, gt=0, le=1, description="kept fraction of the candidates")
    samples: int = Field(1024, ge=1, description="examples scored (batch-size-1 semantics)")
    variant: Literal["empirical", "expect"] = "empirical"
    warmup_steps: int = Field(0, ge=0, description="dense steps before the mask is computed")
    refresh_every: int = Field(0, ge=0, description="recompute every N steps after the first mask (0 = never)")
    head: tuple[str, ...] = Field(DEFAULT_HEAD, description="module names of the task head (target=model)")
