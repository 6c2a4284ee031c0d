"""The metric catalogue: every name a training run reports (to Ray, hence to Tune and MLflow), in one place.

The loop (``train.worker``) writes these keys; the study checks (``tune.metric``, ASHA), ``compare`` and the
scaling analysis read them. Evaluation metrics are named by the dataset's task (``tasks.Task.eval_metric_names``).
Names are grouped by their prefix, as MLflow's UI groups its charts: ``train/``, ``time/``, ``memory/``, ``model/``,
``mask/``, ``curvature_contrast/``, ``system/``, and the evaluation's own (``gsm8k/``, ``glue/<task>/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fisher_scale.config import ExperimentConfig

#: the optimizer step a report was made after: Tune's and ASHA's time axis, MLflow's step (not a metric there)
STEP = "step"
#: the last step's training loss (the other ``train/`` metrics are means over the report's window)
LOSS = "train/loss"
LR = "train/lr"
STEP_TIME = "train/step_time_s"
TOKENS_PER_S = "train/tokens_per_s"
SKIPPED_STEPS = "train/skipped_steps"
DIVERGED = "train/diverged"  # 1.0 once the loss is non-finite or far above its first value (train.worker.diverged)
STATE_BYTES = "memory/optimizer_state_bytes_per_rank"
TRAIN_TIME = "time/train_s"  # training wall time so far, evaluation excluded (time to target)
EVAL_TIME = "time/eval_s"
PEAK_MEMORY = "memory/peak_bytes"
PARAMETERS = "model/parameters"
CONTRAST_MEDIAN = "curvature_contrast/median"
CONTRAST_MAX = "curvature_contrast/max"
#: kept fractions of a FISH mask (``masks.mask_report`` keys under this prefix; per-matrix ones are not reported)
MASK = "mask/"
#: what the machines did during a report's window, per node (``train.system``)
SYSTEM = "system/"
#: metrics that change seldom or never within a run: a tracker logs them when their value changes
UNCHANGING = (PARAMETERS, STATE_BYTES, MASK)


def phase_time(phase: str) -> str:
    """The mean seconds per step of a profiled phase (``train.profile``)."""
    return f"time/{phase}_s"


def reported_metrics(cfg: ExperimentConfig) -> set[str]:
    """Every metric name a run of this config reports (sweeps check their target metric against it); per-block mask
    fractions depend on the model and the per-node system metrics on the cluster, and are left out."""
    from fisher_scale.train.evaluation import eval_metric_names
    from fisher_scale.train.profile import PHASES

    names = {LOSS, LR, STEP, STEP_TIME, TOKENS_PER_S, STATE_BYTES, SKIPPED_STEPS, DIVERGED, TRAIN_TIME, EVAL_TIME}
    names |= {PEAK_MEMORY, PARAMETERS, *eval_metric_names(cfg)}
    if cfg.train.profile:
        names |= {phase_time(phase) for phase in (*PHASES, "comm")}
    if cfg.optimizer.name != "adamw":
        names |= {CONTRAST_MEDIAN, CONTRAST_MAX}
    if cfg.mask.enabled:
        names |= {f"{MASK}kept/all", *((f"{MASK}kept/lora_A", f"{MASK}kept/lora_B") if cfg.peft.enabled else ())}
    return names


#: a classifier giving one class to at least this share of the evaluated examples has collapsed to chance level
COLLAPSED_SHARE = 0.99


def report_outcome(result: Mapping[str, Any]) -> str | None:
    """What a report says of its run: ``diverged`` (the worker's training-loss check), ``collapsed`` (one
    predicted class for ≥ 99 % of the evaluated examples) or ``trained``; None from a report with neither a
    divergence nor an evaluation (it changes nothing)."""
    if result.get(DIVERGED):
        return "diverged"
    shares = [v for k, v in result.items() if k.endswith("/majority_share")]
    if not shares:
        return None
    return "collapsed" if max(shares) >= COLLAPSED_SHARE else "trained"
