"""The metric catalogue: every name a training run reports (to Ray, hence to Tune and MLflow), in one place.

The loop (``train.worker``) writes these keys; the study checks (``tune.metric``, ASHA), ``compare`` and the
scaling analysis read them. Evaluation metrics are named by the dataset's task (``tasks.Task.eval_metric_names``).
"""

from __future__ import annotations

from fisher_scale.config import ExperimentConfig

LOSS = "loss"  # the last step's training loss (the other step metrics are means over the report's window)
LR = "lr"
STEP = "step"
STEP_TIME = "step_time_s"
TOKENS_PER_S = "tokens_per_s"
STATE_BYTES = "optimizer_state_bytes_per_rank"
SKIPPED_STEPS = "skipped_steps"
DIVERGED = "diverged"  # 1.0 once the loss is non-finite or far above its first value (train.worker.diverged)
TRAIN_TIME = "time/train_s"  # training wall time so far, evaluation excluded (time to target)
EVAL_TIME = "time/eval_s"
PEAK_MEMORY = "memory/peak_bytes"
PARAMETERS = "model/parameters"
CONTRAST_MEDIAN = "curvature_contrast/median"
CONTRAST_MAX = "curvature_contrast/max"
#: kept fractions of a FISH mask (``masks.mask_report`` keys under this prefix; per-matrix ones are not reported)
MASK = "mask/"


def phase_time(phase: str) -> str:
    """The mean seconds per step of a profiled phase (``train.profile``)."""
    return f"time/{phase}_s"


def reported_metrics(cfg: ExperimentConfig) -> set[str]:
    """Every metric name a run of this config reports (sweeps check their target metric against it); per-block mask
    fractions depend on the model and are left out."""
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
