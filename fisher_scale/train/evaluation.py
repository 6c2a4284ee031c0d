"""Evaluation around a training run: the metric names it reports (the dataset's ``tasks.Task`` evaluates, sharded
over the ranks), and what ``fisher-scale eval`` runs on a saved adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from fisher_scale.config import ExperimentConfig
from fisher_scale.errors import InputError, MissingInput
from fisher_scale.tasks import task_of


def eval_metric_names(cfg: ExperimentConfig) -> set[str]:
    """The names evaluation reports for this config (none when evaluation is off)."""
    return task_of(cfg.data.dataset).eval_metric_names(cfg) if cfg.eval.enabled else set()


def adapter_directory(path: Path) -> Path:
    """The adapter a path names: an adapter directory, or a run's output or checkpoint directory holding one
    (a checkpoint's files are checked against its manifests)."""
    from fisher_scale.train.checkpoint import check_files

    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    if not adapter.is_dir():
        raise MissingInput(f"--checkpoint: no adapter directory at {path}")
    check_files(path)
    return adapter


def evaluate_checkpoint(cfg: ExperimentConfig, adapter: Path) -> dict[str, float]:
    """What ``fisher-scale eval`` reports: the config's model with the saved adapter (or weights) loaded,
    evaluated in one process, on the GPU when ``distributed.use_gpu``."""
    from fisher_scale.models import load_tokenizer
    from fisher_scale.train.checkpoint import load_weights
    from fisher_scale.train.worker import build_model

    if cfg.distributed.use_gpu and not torch.cuda.is_available():
        raise InputError("distributed.use_gpu=true, but torch sees no CUDA device")
    model = build_model(cfg, task_of(cfg.data.dataset).num_labels(cfg))
    load_weights(adapter, model)
    model.to("cuda" if cfg.distributed.use_gpu else "cpu").eval()
    with torch.no_grad():
        return task_of(cfg.data.dataset).evaluate(cfg, model, load_tokenizer(cfg.model.name))
