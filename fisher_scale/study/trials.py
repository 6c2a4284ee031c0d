"""What a study calls its trials (study keys, the trial → study mapping, a trial's resolved config) and their
MLflow child runs (:class:`TrialRuns`).

No Ray here: :class:`TrialRuns` runs in the MLflow writer process (``tracking.Writer``), which imports this module
and MLflow, not Ray Tune.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fisher_scale import tracking
from fisher_scale.config import ExperimentConfig, with_values
from fisher_scale.train.launcher import track_report
from fisher_scale.train.metrics import LOSS, STEP, UNCHANGING, report_outcome

#: the trial config key naming the trial's study (its label) when one Tune experiment runs several
STUDY_KEY = "study"
#: the trial config key carrying the number of the Optuna trial that sampled it (set by the search), and the
#: MLflow tag that shows it
OPTUNA_TRIAL_KEY, OPTUNA_TRIAL_TAG = "optuna_trial", "optuna_trial_number"


#: how a study key names its replicate under ``tune.seeds``: ``<label>/seed<n>`` (labels hold no slash)
_REPLICATE = "/seed"


def replicate_key(label: str, seed: int) -> str:
    """The key of study ``label``'s replicate with this seed."""
    return f"{label}{_REPLICATE}{seed}"


def split_study_key(key: str) -> tuple[str, str | None]:
    """A study key's label (what ``compare`` groups by) and replicate (``seed<n>``, None without ``tune.seeds``)."""
    label, mark, seed = key.rpartition(_REPLICATE)
    return (label, f"seed{seed}") if mark else (key, None)


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's dotted-key values: Optuna samples them as the trial config (beside its study's label); a
    scaling grid passes each point as one dict under ``point`` (Tune's grid search over whole points)."""
    return {k: v for k, v in config.get("point", config).items() if k not in (STUDY_KEY, OPTUNA_TRIAL_KEY)}


def study_label(config: dict[str, Any], labels: Iterable[str]) -> str:
    """The label of the study a trial belongs to: named in its config, or the experiment's only study."""
    if STUDY_KEY in config:
        return config[STUDY_KEY]
    (only,) = labels
    return only


def optuna_study_name(study: str, key: str) -> str:
    """The Optuna study of one study key (label and replicate) of a ``fisher-scale`` study."""
    return f"{study}/{key}"


def stopped_at_step(result: dict[str, Any] | None, max_steps: int) -> int | None:
    """The step at which a trial that ended without an error stopped, when that is before ``max_steps``: only a
    scheduler (ASHA) ends a trial early, a failure is an error and an interrupted trial does not end."""
    step = (result or {}).get(STEP)
    return int(step) if step is not None and step < max_steps else None


def trial_config(bases: dict[str, dict[str, Any]], config: dict[str, Any], trial_id: str) -> ExperimentConfig:
    """The resolved config of one trial: its study's base config with its sampled point."""
    base = bases[study_label(config, bases)]
    return with_values(ExperimentConfig.model_validate(base), trial_values(config), origin=f"trial {trial_id}")


class TrialRuns:
    """One MLflow child run per trial under the study's parent run, tagged with the Ray trial id, so a
    trial resumed after an interruption logs into the run it started (no duplicates), and with its
    ``outcome`` (``train.metrics.report_outcome`` of its latest report); a trial its scheduler stopped early is tagged
    ``stopped_by`` and ``stopped_at_step``, and a searched one names its Optuna study and trial (``optuna_study``,
    ``optuna_trial_number``; the Optuna trial carries the Ray trial id as a user attribute). Reports wait in each
    run's log until :meth:`send`. A trial here is what the callback copied of Tune's (``trial_id``, ``config``).
    It pickles as its settings: its client is made on first use."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        study: str,
        bases: dict[str, dict],
        kind: str = tracking.RUN_KINDS["tune"].child,
        scheduler: str | None = None,
    ) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.study, self.bases, self.kind, self.scheduler = study, bases, kind, scheduler
        self._client: Any = None
        self._runs: dict[str, tracking.RunLog] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = tracking.client(self.uri)
        return self._client

    def find(self, trial_id: str) -> str | None:
        """The id of a trial's run, by its tags (None before the trial started)."""
        return tracking.find_run(
            self.client, self.experiment_id, **{tracking.TRIAL_TAG: trial_id, tracking.STUDY_TAG: self.study}
        )

    def start(self, trial: Any) -> tracking.RunLog:
        """The trial's child run: found by its tag (a resumed trial) or created with params and config."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        settings: dict[str, Any] = {"step": STEP, "unchanging": UNCHANGING}
        run_id = self.find(trial.trial_id)
        if run_id is None:
            key = study_label(trial.config, self.bases)
            label, replicate = split_study_key(key)
            cfg = trial_config(self.bases, trial.config, trial.trial_id)
            tags = {
                tracking.PARENT_TAG: self.parent_run_id,
                tracking.TRIAL_TAG: trial.trial_id,
                tracking.STUDY_TAG: self.study,
                tracking.KIND_TAG: self.kind,
                "optimizer": cfg.optimizer.name,
                "study_label": label,
                tracking.SEARCHED_TAG: ",".join(sorted(trial_values(trial.config))),
            }
            if replicate is not None:
                tags[tracking.REPLICATE_TAG] = replicate
            if self.kind == tracking.RUN_KINDS["tune"].child:
                tags["optuna_study"] = optuna_study_name(self.study, key)
            if OPTUNA_TRIAL_KEY in trial.config:
                tags[OPTUNA_TRIAL_TAG] = str(trial.config[OPTUNA_TRIAL_KEY])
            name = f"{key}-{trial.trial_id}"
            log = tracking.RunLog(
                self.client, tracking.create_run(self.client, self.experiment_id, name, tags, cfg), **settings
            )
        else:
            log = tracking.RunLog.reopened(self.client, run_id, progress=LOSS, **settings)
        self._runs[trial.trial_id] = log
        return log

    def result(self, trial: Any, report: dict[str, Any]) -> None:
        """A training report (Tune's own keys removed) and, when it relays one, its Ray Train checkpoint."""
        if track_report(self.start(trial), report) and report.get("checkpoint_path"):
            self.checkpoint(trial, report["checkpoint_path"])

    def checkpoint(self, trial: Any, path: str) -> None:
        self.start(trial).tag("checkpoint", path)

    def complete(self, trial: Any, last_result: dict[str, Any]) -> None:
        log = self.start(trial)
        log.tag("outcome", report_outcome(last_result) or "trained")
        steps = trial_config(self.bases, trial.config, trial.trial_id).train.steps
        stopped = stopped_at_step(last_result, steps)
        if stopped is not None:
            log.tag(tracking.STOPPED_BY_TAG, self.scheduler or "scheduler")
            log.tag(tracking.STOPPED_AT_TAG, str(stopped))
        log.end("FINISHED")

    def error(self, trial: Any, error_file: str | None) -> None:
        log = self.start(trial)
        if error_file:
            log.tag("error_file", error_file)
        log.end("FAILED")

    def send(self) -> None:
        """Write every run's kept reports and tags, one request per run."""
        for log in self._runs.values():
            log.send()
