"""Ray Tune callbacks that run on the driver: MLflow child runs per trial, the live trial table, and the
scheduler's state saved with the experiment.

Tune pickles its callbacks with the experiment state (``Tuner.restore`` brings them back), so the MLflow
and table callbacks keep only plain settings and rebuild their MLflow client / console on first use.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from fisher_scale import tracking
from fisher_scale.config import ExperimentConfig, with_values
from fisher_scale.train.launcher import track_report
from fisher_scale.train.metrics import LOSS, STEP, UNCHANGING, report_outcome

#: keys Tune adds to every result, not training metrics
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "trial_id", "done", "config", "checkpoint_dir_name", "should_checkpoint"}


#: the driver writes MLflow at most this often (seconds): each trial's reports since then go in one request, whose
#: fixed cost in MLflow's SQL store is shared by more reports the longer the wait (on SQLite, CPU per report:
#: 5.4-6.6 ms alone, 2.2-2.9 ms four to a request, 1.3-2.0 ms twenty to a request); the MLflow UI lags by as much
WRITE_EVERY_S = 5.0

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


class MlflowTrials(Callback):
    """One MLflow child run per trial under the study's parent run, tagged with the Ray trial id, so a
    trial resumed after an interruption logs into the run it started (no duplicates), and with its
    ``outcome`` (``train.metrics.report_outcome`` of its latest report); a trial its scheduler stopped early is tagged
    ``stopped_by`` and ``stopped_at_step``, and a searched one names its Optuna study and trial (``optuna_study``,
    ``optuna_trial_number``; the Optuna trial carries the Ray trial id as a user attribute). MLflow is written on
    one background thread (``tracking.Writer``), each trial's queued reports in one request: Tune's event loop waits
    for every callback, and with tens of trials synchronous writes stall it; the experiment's end waits for them."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_run_id: str,
        study: str,
        bases: dict[str, dict],
        kind: str = tracking.RUN_KINDS["tune"].child,
        scheduler: str | None = None,
        write_every_s: float = WRITE_EVERY_S,
    ) -> None:
        self.uri, self.experiment_id, self.parent_run_id = uri, experiment_id, parent_run_id
        self.study, self.bases, self.kind, self.scheduler = study, bases, kind, scheduler
        self.write_every_s = write_every_s
        self._client: Any = None
        self._runs: dict[str, tracking.RunLog] = {}
        self._writer: tracking.Writer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_runs": {}, "_writer": None}

    def _submit(self, call: Any, trial: Any, *args: Any) -> None:
        """Run ``call`` on the writer's thread with a copy of what it reads of the trial (Tune goes on changing it)."""
        if self._writer is None:
            self._writer = tracking.Writer(drained=self._send, every_s=self.write_every_s)
        seen = SimpleNamespace(
            trial_id=trial.trial_id,
            config=dict(trial.config),
            last_result=dict(getattr(trial, "last_result", None) or {}),
            error_file=getattr(trial, "error_file", None),
        )
        self._writer.submit(call, seen, *args)

    def _send(self) -> None:
        for log in self._runs.values():
            log.send()

    def flush(self) -> None:
        """Wait until everything submitted so far is in MLflow (the study ends with this)."""
        if self._writer is not None:
            self._writer.flush()

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = tracking.client(self.uri)
        return self._client

    def run_id(self, trial: Any) -> str:
        self.flush()
        return self._log(trial).run_id

    def _log(self, trial: Any) -> tracking.RunLog:
        """The trial's child run: found by its tag (a resumed trial) or created with params and config."""
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        settings: dict[str, Any] = {"step": STEP, "unchanging": UNCHANGING}
        run_id = tracking.find_run(
            self.client, self.experiment_id, **{tracking.TRIAL_TAG: trial.trial_id, tracking.STUDY_TAG: self.study}
        )
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

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._log, trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._submit(self._result, trial, dict(result))

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self._submit(self._checkpoint, trial, checkpoint.path)  # a trial training in its actor saves to Tune

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._complete, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._error, trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.flush()

    def _result(self, trial: Any, result: dict[str, Any]) -> None:
        log = self._log(trial)
        if not track_report(log, {k: v for k, v in result.items() if k not in _TUNE_KEYS}):
            return
        if result.get("checkpoint_path"):  # a Ray Train run's checkpoint, relayed with its report
            self._checkpoint(trial, result["checkpoint_path"])

    def _checkpoint(self, trial: Any, path: str) -> None:
        self._log(trial).tag("checkpoint", path)

    def _complete(self, trial: Any) -> None:
        log = self._log(trial)
        log.tag("outcome", report_outcome(trial.last_result or {}) or "trained")
        steps = trial_config(self.bases, trial.config, trial.trial_id).train.steps
        stopped = stopped_at_step(trial.last_result, steps)
        if stopped is not None:
            log.tag(tracking.STOPPED_BY_TAG, self.scheduler or "scheduler")
            log.tag(tracking.STOPPED_AT_TAG, str(stopped))
        log.end("FINISHED")

    def _error(self, trial: Any) -> None:
        log = self._log(trial)
        if trial.error_file:
            log.tag("error_file", trial.error_file)
        log.end("FAILED")


class SchedulerState(Callback):
    """Tune saves its searcher's and its callbacks' state with the experiment, not its scheduler's: without this
    callback a resumed study's ASHA would have forgotten its rungs and judge trials only against results reported
    since the resume. Pass it the scheduler given to the same Tuner: the Tuner pickles the two together, so the
    restored callback restores the restored scheduler."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def get_state(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as tmp:
            self.scheduler.save(f"{tmp}/scheduler.pkl")
            return {"scheduler": Path(f"{tmp}/scheduler.pkl").read_bytes()}

    def set_state(self, state: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            Path(f"{tmp}/scheduler.pkl").write_bytes(state["scheduler"])
            self.scheduler.restore(f"{tmp}/scheduler.pkl")


class TrialTable(Callback):
    """A live terminal table of the experiment's trials: their study (when it runs several), status, step,
    the target metric, sampled values. When the output is no terminal (a log file, CI, ``ray job logs``) it is
    one plain line per event instead, so that a running study and a hung one look different."""

    def __init__(
        self, title: str, metric: str, mode: str, keys: list[str], bases: dict[str, dict], studies: bool = False
    ) -> None:
        self.title, self.metric, self.mode, self.keys, self.studies = title, metric, mode, keys, studies
        self.bases = bases  # each study's base config: a trial ending before its train.steps was stopped early
        self._rows: dict[str, dict[str, Any]] = {}
        self._live: Any = None
        self._console: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None, "_rows": {}, "_console": None}

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console

    def _line(self, trial_id: str, row: dict[str, Any]) -> str:
        study = f" ({row['study']})" if self.studies else ""
        values = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(row['config'].get(k))}" for k in self.keys)
        metric = self.metric.rsplit("/", 1)[-1]
        scores = f", {metric} {_fmt(row['last'])} (best {_fmt(row['best'])})" if row.get("last") is not None else ""
        step = f", step {row['step']}" if row.get("step") not in (None, "") else ""
        return f"trial {trial_id}{study}: {row['status'].lower()}{step}{scores}" + (f"; {values}" if values else "")

    def _render(self) -> Any:
        from rich.table import Table

        table = Table(title=f"{self.title}: {self.metric} ({self.mode})")
        short = [key.rsplit(".", 1)[-1] for key in self.keys]
        columns = ("study",) * self.studies + ("trial", "status", "step", self.metric.rsplit("/", 1)[-1], "best")
        for column in (*columns, *short):
            table.add_column(
                column, justify="left" if column in ("study", "trial", "status") else "right", no_wrap=True
            )
        for trial_id, row in self._rows.items():
            table.add_row(
                *(row["study"],) * self.studies,
                trial_id,
                row["status"].lower(),
                str(row.get("step", "")),
                _fmt(row.get("last")),
                _fmt(row.get("best")),
                *(_fmt(row["config"].get(k)) for k in self.keys),
            )
        return table

    def _update(self, trial: Any, **fields: Any) -> None:
        row = self._rows.setdefault(
            trial.trial_id, {"config": trial_values(trial.config), "study": trial.config.get(STUDY_KEY, "")}
        )
        row["status"] = fields.pop("status", trial.status)
        row.update(fields)
        if not self.console.is_terminal:
            self.console.print(self._line(trial.trial_id, row), markup=False, highlight=False, soft_wrap=True)
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(self._render(), console=self.console, refresh_per_second=2)
            self._live.start()
        self._live.update(self._render())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        fields: dict[str, Any] = {"step": result.get("step", "")}
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            best = self._rows.get(trial.trial_id, {}).get("best")
            better = best is None or (value < best if self.mode == "min" else value > best)
            fields.update(last=value, best=value if better else best)
        self._update(trial, **fields)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        outcome = report_outcome(trial.last_result or {})
        if outcome in (None, "trained"):
            steps = trial_config(self.bases, trial.config, trial.trial_id).train.steps
            outcome = "stopped" if stopped_at_step(trial.last_result, steps) else "TERMINATED"
        self._update(trial, status=outcome)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._update(trial, status="ERROR")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
