"""A :class:`Task` per dataset: where its files are, its training features, its head, its evaluation and the
names of its metrics. Everything that depends on ``data.dataset`` asks :func:`task_of` instead of testing a
string prefix."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from fisher_scale.config import ExperimentConfig
from fisher_scale.data import (
    Features,
    GlueTask,
    Record,
    default_data_dir,
    glue_classifier_features,
    glue_lm_features,
    glue_task,
    gsm8k_features,
    is_hub_id,
    load_glue,
    load_gsm8k,
)
from fisher_scale.errors import InputError
from fisher_scale.eval import (
    evaluate_glue_classifier,
    evaluate_glue_lm,
    evaluate_gsm8k,
    glue_metric_names,
    glue_metric_prefix,
)

#: the first part of every evaluation metric's name (``gsm8k/accuracy``, ``glue/sst2/accuracy``)
EVAL_METRIC_ROOTS = ("gsm8k", "glue")


def is_eval_metric(name: str) -> bool:
    """Whether a reported metric comes from evaluation (as opposed to the training loop's own)."""
    return name.split("/", 1)[0] in EVAL_METRIC_ROOTS and "/" in name


class Task(ABC):
    """One dataset as training and evaluation see it."""

    #: the folder of its offline copy in ``../shared/data``
    folder: ClassVar[str]

    def source(self, cfg: ExperimentConfig) -> str:
        """``data.source``, or the offline copy beside the checkout."""
        return cfg.data.source or str(default_data_dir() / self.folder)

    @abstractmethod
    def check(self, cfg: ExperimentConfig) -> None:
        """A ``ValueError`` naming the key when the config cannot train on this task."""

    @abstractmethod
    def training_records(self, source: str) -> list[Record]: ...

    @abstractmethod
    def evaluation_records(self, source: str) -> list[Record]: ...

    def check_data(self, cfg: ExperimentConfig) -> None:
        """Parse a local copy whole, as the workers will (the files are small): a malformed line is a ``ValueError``
        naming file:line, a missing file or split a ``FileNotFoundError``, an empty training split names the source.
        Hub ids are left to the workers."""
        source = self.source(cfg)
        if is_hub_id(source):
            return
        if not self.training_records(source):
            raise InputError(f"data.source: {source} holds no training examples of {cfg.data.dataset}")
        if cfg.eval.enabled:
            self.evaluation_records(source)

    @abstractmethod
    def features(self, record: Record, tokenizer: Any, cfg: ExperimentConfig) -> Features:
        """One training example tokenised for ``model.task``, cut to ``data.max_length``."""

    def num_labels(self, cfg: ExperimentConfig) -> int | None:
        """Outputs of the classification head the config needs (None: a causal LM, no head)."""
        return None

    @abstractmethod
    def eval_metric_names(self, cfg: ExperimentConfig) -> set[str]:
        """The names :meth:`evaluate` reports."""

    @abstractmethod
    def evaluate(self, cfg: ExperimentConfig, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """The metrics on the evaluation split (sharded over the ranks; every rank returns the same dict)."""


class Gsm8k(Task):
    """GSM8K: a causal LM trained on the worked answers, evaluated by greedy generation on the test split."""

    folder = "gsm8k"

    def training_records(self, source: str) -> list[Record]:
        return load_gsm8k("train", source)

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.model.task != "causal_lm":
            raise InputError("data.dataset=gsm8k needs model.task=causal_lm (its answers are generated)")

    def features(self, record: Record, tokenizer: Any, cfg: ExperimentConfig) -> Features:
        return gsm8k_features(record, tokenizer, cfg.data.max_length)

    def evaluation_records(self, source: str) -> list[Record]:
        return load_gsm8k("test", source)

    def eval_metric_names(self, cfg: ExperimentConfig) -> set[str]:
        return {"gsm8k/accuracy", "gsm8k/loss"}

    def evaluate(self, cfg: ExperimentConfig, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        ev = cfg.eval
        return evaluate_gsm8k(
            model,
            tokenizer,
            self.evaluation_records(self.source(cfg)),
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            max_length=cfg.data.max_length,
            max_examples=ev.max_examples,
        ).metrics


@dataclass(frozen=True)
class Glue(Task):
    """A GLUE task: a classifier head or a causal LM answering with the task's verbalisers, scored on dev
    (MNLI: dev_matched)."""

    spec: GlueTask
    folder: ClassVar[str] = "glue"

    @property
    def eval_split(self) -> str:
        return "dev_matched" if self.spec.name == "mnli" else "dev"

    def check(self, cfg: ExperimentConfig) -> None:
        """Either ``model.task`` trains on GLUE (a classifier head, or a causal LM answering with verbalisers)."""

    def training_records(self, source: str) -> list[Record]:
        return load_glue(self.spec.name, "train", source)

    def features(self, record: Record, tokenizer: Any, cfg: ExperimentConfig) -> Features:
        build = glue_lm_features if cfg.model.task == "causal_lm" else glue_classifier_features
        return build(self.spec, record, tokenizer, cfg.data.max_length)

    def evaluation_records(self, source: str) -> list[Record]:
        return load_glue(self.spec.name, self.eval_split, source)

    def num_labels(self, cfg: ExperimentConfig) -> int | None:
        return None if cfg.model.task == "causal_lm" else self.spec.num_labels

    def eval_metric_names(self, cfg: ExperimentConfig) -> set[str]:
        prefix = glue_metric_prefix(self.spec.name, self.eval_split)
        extra = () if self.spec.is_regression else ("majority_share",)
        return {f"{prefix}/{name}" for name in (*glue_metric_names(self.spec.name), "loss", *extra)}

    def evaluate(self, cfg: ExperimentConfig, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        evaluate = evaluate_glue_lm if cfg.model.task == "causal_lm" else evaluate_glue_classifier
        return evaluate(
            model,
            tokenizer,
            self.spec.name,
            self.evaluation_records(self.source(cfg)),
            split=self.eval_split,
            batch_size=cfg.eval.batch_size,
            max_length=cfg.data.max_length,
            max_examples=cfg.eval.max_examples,
        ).metrics


def task_of(dataset: str) -> Task:
    """The task ``data.dataset`` names: ``gsm8k`` or ``glue/<task>``; anything else is a ``ValueError``."""
    kind, _, name = dataset.partition("/")
    if dataset == "gsm8k":
        return Gsm8k()
    if kind == "glue" and name:
        return Glue(glue_task(name))
    raise InputError(f"data.dataset must be gsm8k or glue/<task> (glue/sst2, glue/mrpc, ...), got {dataset!r}")
