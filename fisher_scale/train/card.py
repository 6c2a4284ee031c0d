"""The model card of a saved adapter: what a reader of the folder (or of the Hub) needs to know of where it came
from, in place of PEFT's empty template, and the base model in ``adapter_config.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fisher_scale.config import ExperimentConfig
from fisher_scale.tasks import is_eval_metric
from fisher_scale.train.metrics import LOSS, STEP

CARD = "README.md"
PROVENANCE = "## Provenance"


def _table(rows: Mapping[str, Any]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows.items())]


def model_card(cfg: ExperimentConfig, metrics: Mapping[str, Any], made_by: Mapping[str, str]) -> str:
    """The card's text: a Hugging Face YAML header, the setup, the metrics of the last report, the provenance."""
    optimizer = ", ".join(f"{k}={v}" for k, v in cfg.optimizer.hyperparameters(cfg.lr).items())
    peft = cfg.peft
    lora = f"rank {peft.rank}, alpha {peft.alpha:g}, dropout {peft.dropout:g}, on {', '.join(peft.target_modules)}"
    mask = cfg.mask
    budget = f"the rank-{mask.budget_rank} count" if mask.budget_rank else f"{mask.ratio:g} of the entries"
    setup = {
        "base model": f"`{cfg.model.name}` ({cfg.model.task}, {cfg.model.dtype})",
        "data": f"{cfg.data.dataset}, batch {cfg.data.batch_size}, max_length {cfg.data.max_length}",
        "optimizer": f"{cfg.optimizer.name} ({optimizer}), {cfg.train.lr_schedule} schedule",
        "adapter": f"LoRA {lora}" if peft.enabled else "full fine-tuning",
        "FISH mask": f"{mask.selection} selection keeping {budget}" if mask.enabled else "off",
        "training": f"{cfg.train.steps} steps, seed {cfg.seed}, DeepSpeed ZeRO {cfg.distributed.zero_stage}",
    }
    shown = {k: f"{v:.4g}" for k, v in sorted(metrics.items()) if (k == LOSS or is_eval_metric(k)) and _number(v)}
    header = [
        "---",
        f"base_model: {cfg.model.name}",
        "library_name: peft" if peft.enabled else "library_name: transformers",
        f"tags: [fisher-scale, {cfg.optimizer.name}{', lora' if peft.enabled else ''}]",
        "---",
    ]
    lines = [*header, "", f"# {cfg.name}: {cfg.model.name} fine-tuned on {cfg.data.dataset}", "", *_table(setup)]
    lines += ["", f"## Metrics at step {metrics.get(STEP, '?')}", "", *(_table(shown) if shown else ["none reported"])]
    lines += ["", PROVENANCE, "", *(f"- {key}: {value}" for key, value in made_by.items())]
    return "\n".join(lines) + "\n"


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_model_card(
    directory: Path, cfg: ExperimentConfig, metrics: Mapping[str, Any], made_by: Mapping[str, str]
) -> None:
    """``README.md`` in a saved adapter's folder, and its ``adapter_config.json`` naming the base model the run
    loaded (PEFT leaves it empty for a model built from a config)."""
    (directory / CARD).write_text(model_card(cfg, metrics, made_by))
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        settings = json.loads(adapter_config.read_text())
        settings["base_model_name_or_path"] = cfg.model.name
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True))


def add_provenance(directory: Path, made_by: Mapping[str, str]) -> None:
    """More provenance lines on a saved card (the study, trial and MLflow run, known only to the driver)."""
    card = directory / CARD
    if card.is_file() and PROVENANCE in card.read_text():
        card.write_text(card.read_text() + "".join(f"- {key}: {value}\n" for key, value in made_by.items()))
