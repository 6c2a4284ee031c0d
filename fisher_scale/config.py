"""Typed, validated schema of the experiment YAML keys (one place; unknown keys are errors).

An experiment is one YAML file (``tune_configs/*.yaml``); ``load_config`` reads it, applies
``--set key=value`` overrides (dotted keys, values parsed as YAML) and validates everything before
any Ray or DeepSpeed work starts. Errors name the offending key and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from fisher_scale.errors import InputError
from fisher_scale.hyperparameters import HYPERPARAMETERS, hyperparameters_of


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _optimizer_field(spec: dataclasses.Field) -> tuple[Any, Any]:
    """A pydantic field with a hyperparameter's default, valid values and meaning."""
    choices = spec.metadata["choices"]
    kind = Literal[choices] if choices is not None else {"float": float, "int": int}[spec.type]
    return kind, Field(spec.default, description=spec.metadata["doc"], **spec.metadata["bounds"])


def _optimizer_fields() -> dict[str, tuple[Any, Any]]:
    """Every optimizer's hyperparameters in one flat section (a study switches optimizers over one base config);
    a key two optimizers share takes its first, widest definition (AdaFisher's ``ema_mode``, not AdaFish's)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for cls in HYPERPARAMETERS.values():
        for spec in dataclasses.fields(cls):
            if spec.name != "lr":
                fields.setdefault(spec.name, _optimizer_field(spec))
    return fields


class _OptimizerBase(Section):
    name: Literal[tuple(HYPERPARAMETERS)] = "adafisher"  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _valid_for_the_optimizer(self) -> _OptimizerBase:
        try:
            hyperparameters_of(self.name, {k: v for k, v in self.hyperparameters(1.0).items() if k != "lr"})
        except ValueError as error:
            raise ValueError(f"{error} for {self.name}") from None
        return self

    def hyperparameters(self, lr: float) -> dict[str, object]:
        """The keyword arguments of ``fisher_scale.optim.build_optimizer``: only those this optimizer takes."""
        taken = [spec.name for spec in dataclasses.fields(HYPERPARAMETERS[self.name])]
        return {key: lr if key == "lr" else getattr(self, key) for key in taken}


OptimizerConfig = create_model(
    "OptimizerConfig",
    __base__=_OptimizerBase,
    __doc__="``optimizer.*``: which optimizer and its hyperparameters (``fisher_scale.hyperparameters``; the "
    "learning rate is the top-level ``lr``).",
    **_optimizer_fields(),
)


class MaskConfig(Section):
    """``mask.*``: FISH Mask / FISH-Tuning (ALGORITHMS.md §3)."""

    enabled: bool = False
    target: Literal["peft", "model"] = Field("peft", description="peft: adapter matrices; model: all parameters")
    ratio: float = Field(0.5, gt=0, le=1, description="kept fraction of the candidates")
    budget_rank: int | None = Field(
        None,
        ge=1,
        description="keep as many entries as plain LoRA at this rank (FISH-Tuning's equal budget; replaces ratio)",
    )
    selection: Literal["fisher", "random", "reversed"] = Field(
        "fisher", description="which entries: highest Fisher scores, seeded random (seed), or lowest scores"
    )
    samples: int = Field(1024, ge=1, description="examples scored (batch-size-1 semantics)")
    batch_size: int | None = Field(
        None, ge=1, description="examples per scoring batch (per-example gradients of each); default: eval.batch_size"
    )
    variant: Literal["empirical", "expect"] = "empirical"
    warmup_steps: int = Field(0, ge=0, description="dense steps before the mask is computed")
    refresh_every: int = Field(0, ge=0, description="recompute every N steps after the first mask (0 = never)")
    head: tuple[str, ...] | None = Field(
        None,
        description="module names of the task head, kept whole under target=model; default: the masks "
        "library's (classifier, score)",
    )


class ModelConfig(Section):
    """``model.*``: what to fine-tune."""

    name: str = Field("tiny", description="built-in preset (tiny, small, tiny-encoder), offline name, hub name or path")
    task: Literal["causal_lm", "classification"] = "causal_lm"
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16 needs GPUs")
    activation_checkpointing: bool = False


class PeftConfig(Section):
    """``peft.*``: LoRA adapters (peft.LoraConfig names); ``enabled: false`` trains the full model."""

    enabled: bool = True
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class DataConfig(Section):
    """``data.*``: the training set and how batches are formed."""

    dataset: str = Field("gsm8k", description="gsm8k or glue/<task> (glue/sst2, glue/mrpc, ...)")
    source: str | None = Field(
        None,
        description="local GSM8K folder/jsonl or GLUE folder, or a hub id; default: ../shared/data beside the checkout",
    )
    max_length: int = Field(256, ge=8)
    max_train_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, description="examples per worker per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1)


#: ``train.lr_schedule`` values (fisher_scale.train.schedule)
LrSchedule = Literal["constant", "linear", "cosine"]


class TrainConfig(Section):
    """``train.*``: the loop."""

    steps: int = Field(50, ge=1, description="optimizer steps")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    lr_schedule: LrSchedule = Field("constant", description="after warm-up: constant, or linear/cosine decay to 0")
    log_every: int = Field(5, ge=1, description="steps between metric reports (Ray reports cost ~1.5 s)")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints Ray Train keeps per run, the newest")
    output_dir: str = Field("outputs/run", description="final adapter/model and result.json")
    skip_nonfinite: bool = Field(False, description="skip a step with a NaN/inf loss or gradient instead of failing")
    resume_from: str | None = Field(None, description="a checkpoint directory of an earlier run to continue from")
    max_grad_norm: float | None = Field(None, gt=0)
    profile: bool = Field(
        False, description="split step time into forward/backward/optimizer/communication (GPU: synchronises)"
    )
    trace_memory: bool = Field(
        False,
        description="on the host, memory/peak_bytes counts live tensor bytes (every operation traced: slow; "
        "what fisher-scale plan plans) instead of the resident set",
    )


class DistributedConfig(Section):
    """``distributed.*``: Ray Train workers and DeepSpeed ZeRO."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: int = Field(0, ge=0, le=3)
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="extra DeepSpeed JSON keys, passed through")
    max_failures: int = Field(0, ge=0, description="Ray FailureConfig: worker failures to recover from")
    storage_path: str | None = Field(None, description="Ray storage (local dir, s3://, NFS); default ~/ray_results")
    address: str | None = Field(None, description="Ray cluster address; default: start or join a local one")
    device_memory_gib: float | None = Field(
        None,
        gt=0,
        description="memory of one worker's device the memory plan checks against; default: the GPU of this "
        "machine (GPU runs), or its memory shared by the workers (local CPU runs)",
    )
    memory_check: bool = Field(True, description="refuse a run whose memory plan does not fit (fisher-scale plan)")


class EvalConfig(Section):
    """``eval.*``: evaluation during and after training."""

    enabled: bool = True
    every: int = Field(0, ge=0, description="steps between evaluations (0 = only at the end)")
    max_examples: int | None = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1, description="GSM8K generation length")


class Dimension(Section):
    """One searched key: exactly one of ``loguniform: [low, high]``, ``uniform: [low, high]``,
    ``int: [low, high]`` (inclusive) or ``choice: [a, b, ...]``."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")
    choice: tuple[Any, ...] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in ("loguniform", "uniform", "int_", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, int, choice")
        if self.choice is not None and not self.choice:
            raise ValueError("choice: empty list of values")
        bounds = self.loguniform or self.uniform or self.int_
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"empty range [{bounds[0]}, {bounds[1]}]: low must be below high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice") if self.values_of(k) is not None)

    def values_of(self, kind: str) -> tuple[Any, ...] | None:
        return getattr(self, "int_" if kind == "int" else kind)

    def edges(self) -> tuple[Any, ...]:
        """Values a sampled point can take at the edges of the range (all values of a choice)."""
        return self.values_of(self.kind)


def default_space() -> dict[str, Dimension]:
    """The keys the issue names: damping, EMA decay, LoRA rank, mask ratio and lr."""
    return {
        "lr": Dimension(loguniform=(1e-4, 1e-1)),
        "optimizer.damping": Dimension(loguniform=(1e-4, 1e-1)),
        "optimizer.ema_decay": Dimension(uniform=(0.5, 0.99)),
        "peft.rank": Dimension(choice=(4, 8, 16)),
        "mask.ratio": Dimension(uniform=(0.1, 1.0)),
    }


class TuneConfig(Section):
    """``tune.*``: the hyperparameter study that ``fisher-scale tune`` runs (Ray Tune + Optuna)."""

    space: dict[str, Dimension] = Field(default_factory=default_space, description="dotted config key → dimension")
    optimizers: dict[str, dict[str, Dimension | None]] | None = Field(
        None,
        description="one Optuna study per listed optimizer with equal trial budgets; per-optimizer overrides of "
        "space (null drops a key); unset: optimizer.name is fixed or searched like any key",
    )
    arms: dict[str, dict[str, Any]] | None = Field(
        None,
        description="arm → fixed dotted config values; every optimizer's study runs once per arm, labelled "
        "<optimizer>-<arm>, with the same trial budget (e.g. with and without a FISH mask)",
    )
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="repeat every study once per seed (its training, mask and sampler seed), labelled "
        "<study>/seed<n>; the final table compares the arms over these replicates",
    )
    num_samples: int = Field(8, ge=1, description="trials per study (per optimizer and arm when those are set)")
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once over all studies; default: as many as the cluster fits"
    )
    metric: str = Field("gsm8k/loss", description="reported metric to optimise (an eval or training metric)")
    mode: Literal["min", "max"] = "min"
    sampler: Literal["tpe", "random", "qmc"] = Field(
        "tpe", description="Optuna sampler (qmc: scrambled Sobol), seeded with the top-level seed"
    )
    storage: str = Field("sqlite:///optuna.db", description="Optuna storage URL (SQLite file or database URL)")
    scheduler: Literal["none", "asha"] = Field("none", description="asha: stop poor trials early (on step)")
    grace_period: int = Field(10, ge=1, description="ASHA: steps before a trial can be stopped")
    reduction_factor: float = Field(3, gt=1, description="ASHA: keeps 1/reduction_factor at each rung")
    max_failures: int = Field(
        0,
        ge=0,
        description="Ray Tune FailureConfig: restarts of a failed trial (of tune and scale studies), each resuming "
        "from the trial's last Ray Train checkpoint; distributed.max_failures recovers workers within a run first",
    )
    train_in_trial: bool = Field(
        False,
        description="a one-worker trial trains in Tune's trial actor, reused from trial to trial, instead of a Ray "
        "Train run of its own (whose worker group costs 20-40 s per trial before its first step)",
    )


class ScaleConfig(Section):
    """``scale.*``: the scaling study that ``fisher-scale scale`` runs (one training run per grid point)."""

    grid: dict[str, tuple[Any, ...]] = Field(
        default_factory=dict,
        description="dotted config key (or global_batch) → values; the study runs every combination",
    )
    target_loss: float | None = Field(None, description="eval loss for the steps/time-to-target measures")


class TrackingConfig(Section):
    """``tracking.*``: MLflow."""

    uri: str | None = Field(
        None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here"
    )


class ExperimentConfig(Section):
    """One experiment: every key of the YAML, validated."""

    name: str = Field("fisher-scale", description="MLflow experiment / Ray run name")
    seed: int = 0
    lr: float = Field(1e-3, gt=0)
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    mask: MaskConfig = MaskConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    eval: EvalConfig = EvalConfig()
    tune: TuneConfig = TuneConfig()
    scale: ScaleConfig = ScaleConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _compatible(self) -> ExperimentConfig:
        if self.optimizer.name == "adafish" and not self.peft.enabled:
            raise ValueError("optimizer.name=adafish needs peft.enabled=true (it preconditions LoRA's r×r sides)")
        if self.mask.enabled and self.mask.target == "peft" and not self.peft.enabled:
            raise ValueError("mask.target=peft needs peft.enabled=true")
        budget = self.mask.budget_rank
        if self.mask.enabled and budget is not None and (self.mask.target != "peft" or budget > self.peft.rank):
            raise ValueError(
                f"mask.budget_rank={budget} needs mask.target=peft and at most peft.rank={self.peft.rank} "
                "(it keeps the entries of a LoRA of that rank out of the wider one)"
            )
        if self.tune.train_in_trial and self.distributed.num_workers > 1:
            raise ValueError(
                f"tune.train_in_trial trains in one process: it needs distributed.num_workers=1, not "
                f"{self.distributed.num_workers}"
            )
        if self.mask.enabled and self.mask.samples < self.distributed.num_workers:
            raise ValueError(
                f"mask.samples={self.mask.samples} is below distributed.num_workers={self.distributed.num_workers}: "
                "every rank scores its share of the samples"
            )
        if self.model.dtype == "bfloat16" and not self.distributed.use_gpu:
            raise ValueError("model.dtype=bfloat16 needs distributed.use_gpu=true (CPU training runs in float32)")
        bf16 = self.model.dtype == "bfloat16" or _deepspeed_enables(self.distributed.deepspeed, "bf16")
        if _deepspeed_enables(self.distributed.deepspeed, "fp16"):
            raise ValueError(
                "distributed.deepspeed.fp16 is not supported: its dynamic loss scale multiplies the gradients the "
                "Fisher statistics and FISH scores are built from, and the steps it drops on overflow would stop "
                "the run; use model.dtype=bfloat16 (no loss scaling)"
            )
        if bf16 and self.distributed.zero_stage == 0:
            raise ValueError(
                "bf16 at distributed.zero_stage=0 runs DeepSpeed's bf16 optimizer wrapper, which fisher_scale does not "
                "support with its client optimizers: use zero_stage 1, 2 or 3 (the same fp32 master weights)"
            )
        return self


def _deepspeed_enables(deepspeed: dict[str, Any], section: str) -> bool:
    """Whether the DeepSpeed config overrides switch ``section`` (``{"enabled": true}``) on."""
    value = deepspeed.get(section)
    return isinstance(value, dict) and value.get("enabled") is True


class ConfigError(InputError):
    """An invalid experiment config; the message lists every offending key."""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``key=value`` strings to (dotted key, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        pairs.append((key.strip(), yaml.safe_load(text) if text.strip() else None))
    return pairs


def build_config(tree: dict[str, Any], overrides: Iterable[str] = (), *, origin: str = "config") -> ExperimentConfig:
    """Validate a config tree (plus overrides); every problem is reported with its dotted key."""
    tree = yaml.safe_load(yaml.safe_dump(tree, sort_keys=False)) or {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            if problem["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key")
            elif problem["loc"]:
                lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
            else:
                lines.append(f"  {problem['msg'].removeprefix('Value error, ')}")
        raise ConfigError(f"{origin} is invalid:\n" + "\n".join(lines)) from None


def with_values(cfg: ExperimentConfig, values: dict[str, Any], *, origin: str = "config") -> ExperimentConfig:
    """``cfg`` with dotted keys set to new values (a sweep's sampled point), validated again."""
    tree = cfg.model_dump(mode="json")
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return build_config(tree, origin=origin)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return build_config(tree, overrides, origin=str(path))


def flatten(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted key → value for every leaf (MLflow params, search-space validation)."""
    flat: dict[str, Any] = {}
    for key, value in config:
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


#: config sections a study cannot search or grid over (they describe the study itself)
_NOT_SEARCHABLE = ("tune.", "scale.", "tracking.", "name")


@functools.cache
def searchable_keys() -> tuple[str, ...]:
    """The dotted keys a search space, an arm or a scaling grid may set (the schema's, built once)."""
    return tuple(sorted(k for k in flatten(ExperimentConfig()) if not k.startswith(_NOT_SEARCHABLE)))
