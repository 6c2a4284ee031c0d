"""Evaluation of a training run's model on its dataset's evaluation split (GSM8K test, GLUE dev),
sharded over the ranks by ``fisher_scale.eval``; also what ``fisher-scale eval`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fisher_scale.config import ExperimentConfig
from fisher_scale.data import default_data_dir, glue_task, load_glue, load_gsm8k
from fisher_scale.eval import (
    evaluate_glue_classifier,
    evaluate_glue_lm,
    evaluate_gsm8k,
    glue_metric_names,
    glue_metric_prefix,
)


def data_source(cfg: ExperimentConfig) -> str:
    """``data.source``, or the offline copy beside the checkout for the dataset."""
    glue = cfg.data.dataset.startswith("glue/")
    return cfg.data.source or str(default_data_dir() / ("glue" if glue else "gsm8k"))


def _glue_eval_split(cfg: ExperimentConfig) -> tuple[str, str]:
    task = cfg.data.dataset.split("/", 1)[1]
    return task, "dev_matched" if glue_task(task).name == "mnli" else "dev"


def eval_metric_names(cfg: ExperimentConfig) -> set[str]:
    """The names :func:`evaluate_experiment` reports for this config (none when evaluation is off)."""
    if not cfg.eval.enabled:
        return set()
    if not cfg.data.dataset.startswith("glue/"):
        return {"gsm8k/accuracy", "gsm8k/loss"}
    task, split = _glue_eval_split(cfg)
    prefix = glue_metric_prefix(task, split)
    extra = () if glue_task(task).is_regression else ("majority_share",)
    return {f"{prefix}/{name}" for name in (*glue_metric_names(task), "loss", *extra)}


def evaluate_experiment(cfg: ExperimentConfig, model: nn.Module, tokenizer: Any) -> dict[str, float]:
    """``gsm8k/accuracy`` (+ eval loss) or ``glue/<task>/<metric>``; every rank returns the same dict."""
    ev, source = cfg.eval, data_source(cfg)
    if not cfg.data.dataset.startswith("glue/"):
        result = evaluate_gsm8k(
            model,
            tokenizer,
            load_gsm8k("test", source),
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            max_length=cfg.data.max_length,
            max_examples=ev.max_examples,
        )
        return result.metrics
    task, split = _glue_eval_split(cfg)
    records = load_glue(task, split, source)
    evaluate = evaluate_glue_lm if cfg.model.task == "causal_lm" else evaluate_glue_classifier
    return evaluate(
        model,
        tokenizer,
        task,
        records,
        split=split,
        batch_size=ev.batch_size,
        max_length=cfg.data.max_length,
        max_examples=ev.max_examples,
    ).metrics


def adapter_directory(path: Path) -> Path:
    """The adapter a path names: an adapter directory, or a run's output or checkpoint directory holding one."""
    adapter = path / "adapter" if (path / "adapter").is_dir() else path
    if not adapter.is_dir():
        raise FileNotFoundError(f"--checkpoint: no adapter directory at {path}")
    return adapter


def evaluate_checkpoint(cfg: ExperimentConfig, adapter: Path) -> dict[str, float]:
    """What ``fisher-scale eval`` reports: the config's model with the saved adapter (or weights) loaded,
    evaluated in one process, on the GPU when ``distributed.use_gpu``."""
    from fisher_scale.models import load_tokenizer
    from fisher_scale.train.checkpoint import load_weights
    from fisher_scale.train.dataset import TrainingSet
    from fisher_scale.train.worker import build_model

    if cfg.distributed.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("distributed.use_gpu=true, but torch sees no CUDA device")
    model = build_model(cfg, TrainingSet.label_count(cfg))
    load_weights(adapter, model)
    model.to("cuda" if cfg.distributed.use_gpu else "cpu").eval()
    with torch.no_grad():
        return evaluate_experiment(cfg, model, load_tokenizer(cfg.model.name))
