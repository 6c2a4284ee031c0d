"""DeepSpeed inside a Ray Train worker: the JSON config from an experiment, and process-group setup."""

from __future__ import annotations

import copy
import importlib
from typing import Any

from fisher_scale.config import ExperimentConfig


def deepspeed_config(cfg: ExperimentConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of an experiment; ``distributed.deepspeed`` keys override, recursively."""
    data = cfg.data
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": data.batch_size,
        "gradient_accumulation_steps": data.gradient_accumulation_steps,
        "train_batch_size": data.batch_size * data.gradient_accumulation_steps * world,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        # the Fisher optimizers are client optimizers DeepSpeed does not know
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.distributed.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def init_distributed(use_gpu: bool) -> None:
    """Reuse Ray Train's process group; on CPU skip DeepSpeed's shared-memory op (a 30-60 s compile
    that gloo runs do not need)."""
    import deepspeed

    if not use_gpu:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
