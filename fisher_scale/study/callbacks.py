"""Ray Tune callbacks that run on the driver: MLflow child runs per trial, the live trial table, and the
scheduler's state saved with the experiment.

Tune pickles its callbacks with the experiment state (``Tuner.restore`` brings them back), so the MLflow
and table callbacks keep only plain settings and rebuild their MLflow writer / console on first use.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from fisher_scale import tracking
from fisher_scale.study.trials import STUDY_KEY, TrialRuns, stopped_at_step, trial_config, trial_values
from fisher_scale.train.metrics import report_outcome

#: keys Tune adds to every result, not training metrics
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "trial_id", "done", "config", "checkpoint_dir_name", "should_checkpoint"}


#: the driver writes MLflow at most this often (seconds): each trial's reports since then go in one request, whose
#: fixed cost in MLflow's SQL store is shared by more reports the longer the wait (on SQLite, CPU per report:
#: 5.4-6.6 ms alone, 2.2-2.9 ms four to a request, 1.3-2.0 ms twenty to a request); the MLflow UI lags by as much
WRITE_EVERY_S = 5.0


class MlflowTrials(Callback):
    """The trials' MLflow child runs (``study.trials.TrialRuns``), written in the MLflow writer process
    (``tracking.Writer``): Tune's event loop waits for every callback, and with tens of trials reporting, MLflow's
    store work on the driver (even on a thread of it) slows the loop down. Each callback copies what its write reads of
    the trial (Tune goes on changing it: its id and config, and the last result only when it completes) and
    returns; the experiment's end waits for the writes."""

    def __init__(self, *runs: Any, write_every_s: float = WRITE_EVERY_S, **settings: Any) -> None:
        """``runs`` and ``settings``: the arguments of :class:`study.trials.TrialRuns`."""
        self.runs = TrialRuns(*runs, **settings)
        self.write_every_s = write_every_s
        self._writer: tracking.Writer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_writer": None}

    def _submit(self, method: str, trial: Any, *args: Any) -> None:
        if self._writer is None:
            self._writer = tracking.Writer(self.runs, every_s=self.write_every_s)
        self._writer.submit(method, SimpleNamespace(trial_id=trial.trial_id, config=dict(trial.config)), *args)

    def flush(self) -> None:
        """Wait until everything submitted so far is in MLflow (the study ends with this)."""
        if self._writer is not None:
            self._writer.flush()

    def run_id(self, trial: Any) -> str:
        """The id of a started trial's run, once everything submitted so far is written."""
        self.flush()
        run_id = self.runs.find(trial.trial_id)
        if run_id is None:
            raise KeyError(f"trial {trial.trial_id} has no MLflow run in study {self.runs.study}")
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit("start", trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._submit("result", trial, {k: v for k, v in result.items() if k not in _TUNE_KEYS})

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self._submit("checkpoint", trial, checkpoint.path)  # a trial training in its actor saves to Tune

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit("complete", trial, dict(trial.last_result or {}))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit("error", trial, getattr(trial, "error_file", None))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Everything written, then the writer process ends (a driver running study after study keeps none)."""
        if self._writer is not None:
            self._writer.close()


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
