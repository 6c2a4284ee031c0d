"""``fisher-scale tune``: a hyperparameter study as one Ray Tune experiment searched by Optuna, one Optuna
study per optimizer (``tune.optimizers``) and arm (``tune.arms``), their trials run side by side (see
``concurrent``; ``experiment`` for the storage layout).

MLflow: experiment ``name``; one parent run per study, one child run per trial (see callbacks).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from fisher_scale import tracking
from fisher_scale.config import ConfigError, ExperimentConfig, TuneConfig
from fisher_scale.plan.check import check_memory
from fisher_scale.study.experiment import (
    StudyState,
    finish_study,
    fit_tuner,
    make_tuner,
    open_study,
    start_cluster,
    storage_filesystem,
)
from fisher_scale.study.trials import (
    OPTUNA_TRIAL_KEY,
    STUDY_KEY,
    optuna_study_name,
    split_study_key,
    stopped_at_step,
    trial_values,
)
from fisher_scale.train.metrics import STEP
from fisher_scale.tune.concurrent import StudiesScheduler, StudiesSearch
from fisher_scale.tune.space import MEMORY_KEYS, check_study, edge_configs, optuna_distributions, resource_configs


class EvalStepOptunaSearch(OptunaSearch):
    """Optuna search as its users read it: the objective named after the metric; intermediate values from the
    reports that carry the metric (eval steps only), keyed by the training step, not Tune's report count; a
    trial the scheduler stopped before ``max_steps`` PRUNED (Optuna keeps its last intermediate value), not
    COMPLETE; each trial's Ray trial id as a user attribute, and its Optuna number in the trial config (its MLflow
    run is tagged with both and with the Optuna study's name)."""

    def __init__(self, *args: Any, max_steps: int, **kwargs: Any) -> None:
        self.max_steps = max_steps
        self._reported_steps: dict[str, set[int]] = {}
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names([self._metric])

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if isinstance(config, dict) and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(tracking.TRIAL_TAG, trial_id)
            config = {**config, OPTUNA_TRIAL_KEY: self._ot_trials[trial_id].number}
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric not in result or trial_id in self._completed_trials:
            return
        step = int(result[STEP])
        reported = self._reported_steps.setdefault(trial_id, set())
        if step not in reported:  # the final report comes again through on_trial_complete
            self._ot_trials[trial_id].report(result[self.metric], step)
            reported.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error or trial_id in self._completed_trials or not result:
            return super().on_trial_complete(trial_id, result=result, error=error)
        self.on_trial_result(trial_id, result)  # Tune passes the report a trial ends on only to this method
        if stopped_at_step(result, self.max_steps):
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def optuna_storage(url: str) -> Any:
    """An Optuna RDB storage (relative SQLite paths made absolute), checked by connecting to it."""
    import optuna

    url = tracking.sqlite_url(url)
    try:
        with tracking.sqlite_lock(url):  # creating the tables is not safe against a second study doing it
            return optuna.storages.RDBStorage(url)
    except Exception as error:  # sqlalchemy raises many kinds; the user needs the URL and the reason
        reason = str(error).replace(url, tracking.redacted(url))
        raise ConfigError(f"tune.storage: cannot open Optuna storage {tracking.redacted(url)}: {reason}") from None


def _searched(cfg: ExperimentConfig) -> set[str]:
    keys = set(cfg.tune.space)
    for overrides in (cfg.tune.optimizers or {}).values():
        keys |= {k for k, v in overrides.items() if v is not None}
    return keys


def _max_concurrent(cfg: ExperimentConfig, resources: dict[str, float]) -> int:
    if cfg.tune.max_concurrent:
        return cfg.tune.max_concurrent
    dist = cfg.distributed
    if dist.use_gpu:
        return max(1, int(resources.get("GPU", 0) // dist.num_workers))
    return max(1, int(resources.get("CPU", 0) // (dist.num_workers * dist.cpus_per_worker)))


def optuna_sampler(name: str, seed: int) -> Any:
    """``tune.sampler``, seeded: TPE, random, or QMC (scrambled Sobol points, which cover a space evenly with few
    trials, where TPE is still random search during its start-up trials)."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _search(label: str, base: ExperimentConfig, space: dict, state: StudyState) -> Any:
    """Optuna (``tune.sampler``) over the space, stored where optuna-dashboard can read it, and ASHA."""
    from ray.tune.schedulers import ASHAScheduler

    cfg = base.tune
    sampler = optuna_sampler(cfg.sampler, base.seed)
    search = EvalStepOptunaSearch(
        optuna_distributions(space),
        metric=cfg.metric,
        mode=cfg.mode,
        sampler=sampler,
        storage=optuna_storage(cfg.storage),
        study_name=optuna_study_name(state.study, label),
        max_steps=base.train.steps,
    )
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            metric=cfg.metric,
            mode=cfg.mode,
            max_t=base.train.steps,
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
            stop_last_trials=False,  # a trial at the last step finishes (saves its adapter, result.json)
        )
        if cfg.scheduler == "asha"
        else None
    )
    return search, scheduler


def run_study(
    cfg: ExperimentConfig, *, resume: bool = False, on_start: Callable[[StudyState, str], None] | None = None
) -> StudyState:
    """Check everything, then run (or resume) every Optuna study of ``cfg`` in one Tune experiment, their
    trials side by side (:mod:`fisher_scale.tune.concurrent`); returns the final state.

    ``on_start(state, root)`` is called once the study's folder and MLflow parent run exist."""
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study created: the study prints its own header
    studies: dict[str, tuple[ExperimentConfig, dict]] = {}

    def check(cfg: ExperimentConfig) -> list[ExperimentConfig]:
        studies.update(check_study(cfg))
        check_memory(("", c) for c in edge_configs(studies, MEMORY_KEYS))
        optuna_storage(cfg.tune.storage)
        return resource_configs(studies)

    tags = {tracking.SEARCHED_TAG: ",".join(sorted(_searched(cfg)))}
    cfg, state, root = open_study(
        cfg, kind="tune", resume=resume, check=check, tags=tags, searched=_searched(cfg), on_start=on_start
    )
    resources = start_cluster(cfg, resource_configs(studies))
    client = tracking.client(state.tracking_uri)
    client.set_tag(state.parent_run_id, tracking.REFERENCE_TAG, split_study_key(next(iter(studies)))[0])
    searches = {label: _search(label, base, space, state) for label, (base, space) in studies.items()}
    budgets = dict.fromkeys(studies, cfg.tune.num_samples)
    schedulers = {label: scheduler for label, (_, scheduler) in searches.items() if scheduler is not None}
    tune_config = tune.TuneConfig(
        search_alg=StudiesSearch(
            {label: search for label, (search, _) in searches.items()}, budgets, cfg.tune.metric, cfg.tune.mode
        ),
        scheduler=StudiesScheduler(schedulers) if schedulers else None,
        num_samples=sum(budgets.values()),
        max_concurrent_trials=_max_concurrent(cfg, resources),
    )
    tuner = make_tuner(
        "studies",
        {label: base for label, (base, _) in studies.items()},
        state,
        root,
        tune_config=tune_config,
        keys=sorted(_searched(cfg)),
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
    )
    results = fit_tuner(tuner, state, sum(budgets.values()))
    for label in studies:
        state.best[label] = {
            **_best(results, label, cfg, client, state, root),
            "importances": importances(cfg, state, label),
        }
    _finish(client, state, cfg, root)
    return state


#: finished trials below which hyperparameter importances say nothing
MIN_TRIALS_FOR_IMPORTANCE = 3


def importances(cfg: ExperimentConfig, state: StudyState, label: str) -> dict[str, float]:
    """Optuna's hyperparameter importances (fANOVA) in one study, by dotted key; none with fewer than
    ``MIN_TRIALS_FOR_IMPORTANCE`` finished trials or with nothing searched. Trials ASHA stopped (PRUNED) do not
    count: their values come from earlier steps than the finished trials' (Optuna leaves them out too)."""
    import optuna

    study = optuna.load_study(
        study_name=optuna_study_name(state.study, label), storage=optuna_storage(cfg.tune.storage)
    )
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE or not any(t.params for t in finished):
        return {}
    return {key: float(value) for key, value in optuna.importance.get_param_importances(study).items()}


def _last_value(result: Any, metric: str) -> float | None:
    """A trial's last reported finite value of ``metric`` (training reports carry eval metrics on eval steps only)."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame:
        return None
    values = frame[metric].dropna()
    value = float(values.iloc[-1]) if len(values) else None
    return value if value is not None and math.isfinite(value) else None


def _best(results: Any, label: str, cfg: ExperimentConfig, client: Any, state: StudyState, root: str) -> dict[str, Any]:
    """The best trial of study ``label`` (by its last reported metric), with its adapter logged to its run."""
    mine = [result for result in results if result.config.get(STUDY_KEY, label) == label]
    scored = [(value, result) for result in mine if (value := _last_value(result, cfg.tune.metric)) is not None]
    if not scored:
        return {"error": "no trial reported a finite metric"}
    value, best = (min if cfg.tune.mode == "min" else max)(scored, key=lambda item: item[0])
    trial_id = best.metrics["trial_id"]
    run_id = tracking.find_run(
        client, state.experiment_id, **{tracking.TRIAL_TAG: trial_id, tracking.STUDY_TAG: state.study}
    )
    # a Ray Train run's checkpoint comes with its report; a trial that trains in its actor saves to Tune
    checkpoint = best.metrics.get("checkpoint_path") or (best.checkpoint.path if best.checkpoint else None)
    if checkpoint and run_id:
        from ray.train import Checkpoint

        # Ray reports the path inside the storage filesystem (no s3:// scheme): open it with that filesystem
        with Checkpoint(checkpoint, filesystem=storage_filesystem(root)[0]).as_directory() as directory:
            if (Path(directory) / "adapter").is_dir():
                client.log_artifacts(run_id, str(Path(directory) / "adapter"), "adapter")
    return {
        "trial_id": trial_id,
        "run_id": run_id,
        "metric": value,
        "config": trial_values(best.config),
        "checkpoint": checkpoint,
        "errors": sum(result.error is not None for result in mine),
    }


def _finish(client: Any, state: StudyState, cfg: ExperimentConfig, root: str) -> None:
    """Best metrics and adapters on the parent run, the comparison of its arms (table and plots), the study
    marked finished."""
    from fisher_scale.train.card import add_provenance
    from fisher_scale.tune.compare import study_report

    best_metrics = {f"best/{label}/{cfg.tune.metric}": b.get("metric") for label, b in state.best.items()}
    best_metrics |= {
        f"importance/{label}/{key}": value
        for label, b in state.best.items()
        for key, value in b.get("importances", {}).items()
    }
    tracking.log_metrics(client, state.parent_run_id, best_metrics, step=0)
    found = [(label, b) for label, b in state.best.items() if isinstance(b.get("metric"), float)]
    if found:
        label, best = (min if cfg.tune.mode == "min" else max)(found, key=lambda item: item[1]["metric"])
        client.set_tag(state.parent_run_id, "best_trial", best["trial_id"])
        client.set_tag(state.parent_run_id, "best_study", label)
        if best.get("run_id") and client.list_artifacts(best["run_id"], "adapter"):
            with tempfile.TemporaryDirectory() as tmp:  # a copy: a local store would hand out the trial's own files
                local = Path(client.download_artifacts(best["run_id"], "adapter", dst_path=tmp))
                made_by = {"study": f"{state.study} ({label})", "trial": best["trial_id"], "MLflow run": best["run_id"]}
                add_provenance(local, made_by)
                client.log_artifacts(state.parent_run_id, str(local), "best_adapter")
    with tempfile.TemporaryDirectory() as tmp:  # the plots live in MLflow (local storage keeps a copy)
        plots = Path(tmp) if "://" in root else Path(root) / state.study / "plots"
        state.comparison = study_report(client, state, cfg, plots_dir=plots)
    finish_study(root, state)


def best_table(state: StudyState, tune: TuneConfig) -> Any:
    """The terminal table of each study's best trial: its values and, where there are any, the importances."""
    from rich.table import Table

    table = Table(title=f"{state.study}: best trial per study ({tune.metric}, {tune.mode})")
    ranked = any(best.get("importances") for best in state.best.values())  # a column only where there are some
    for column in ("study", "trial", tune.metric, "values", *(("importance",) if ranked else ())):
        table.add_column(column)
    for label, best in state.best.items():
        values = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.get("config", {}).items()
        )
        importance = ", ".join(f"{k} {v:.2f}" for k, v in best.get("importances", {}).items()) or "-"
        metric = best.get("metric")
        cells = [label, best.get("trial_id", "-"), "-" if metric is None else f"{metric:.4g}", values]
        table.add_row(*cells, *((importance,) if ranked else ()))
    return table
