"""``fisher-scale tune``: a hyperparameter study as Ray Tune ``Tuner`` runs searched by Optuna.

Layout of a study in Ray storage (``distributed.storage_path``, default ``~/ray_results``)::

    <name>-<YYYYmmdd-HHMMSS>/   study.json (resolved config, MLflow ids, finished flag)
        <label>/                one Tune experiment per Optuna study (per optimizer with tune.optimizers)
        train/<trial id>/       each trial's Ray Train run; a restarted trial resumes from its checkpoints
        outputs/<trial id>/     each trial's final adapter and result.json (local storage)

MLflow: experiment ``name``; one parent run per study, one child run per trial (see callbacks).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from fisher_scale import tracking
from fisher_scale.config import ConfigError, ExperimentConfig, flatten
from fisher_scale.train.launcher import (
    check_local_resources,
    check_resources,
    fit,
    resolve_paths,
    start_ray,
    trainer,
)
from fisher_scale.tune.space import check_study, optuna_distributions

#: A trial is a light driver of its Ray Train workers. Holding a CPU would starve its own workers on
#: a small machine (2 CPUs: a 2-worker trial would wait forever), and an empty request is refused,
#: so trials hold a sliver of the head node's marker resource: no CPU, run on the head, any cluster.
TRIAL_RESOURCES = {"node:__internal_head__": 0.001}


class EvalStepOptunaSearch(OptunaSearch):
    """Optuna search fed only the results that carry the metric: training reports eval metrics on
    eval steps only, and ``OptunaSearch`` would fail on the other reports."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class StudyInterrupted(RuntimeError):
    """The study stopped before all trials finished (Ctrl+C); ``--resume`` continues it."""


@dataclass
class StudyState:
    """What ``study.json`` keeps so that ``--resume`` finds the same MLflow runs and config."""

    study: str
    config: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    finished: bool = False
    best: dict[str, Any] = field(default_factory=dict)


def storage_root(cfg: ExperimentConfig) -> str:
    return cfg.distributed.storage_path or str(Path("~/ray_results").expanduser())


def _filesystem(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), path


def _write_state(root: str, state: StudyState) -> None:
    filesystem, base = _filesystem(root)
    filesystem.create_dir(f"{base}/{state.study}", recursive=True)
    with filesystem.open_output_stream(f"{base}/{state.study}/study.json") as out:
        out.write(json.dumps(asdict(state), indent=2).encode())


def find_resumable(root: str, name: str) -> StudyState | None:
    """The newest unfinished study of this name under ``root``."""
    from pyarrow import fs

    filesystem, base = _filesystem(root)
    if filesystem.get_file_info(base).type != fs.FileType.Directory:
        return None
    folders = sorted(
        (info.base_name for info in filesystem.get_file_info(fs.FileSelector(base))),
        reverse=True,
    )
    for folder in folders:
        if not folder.startswith(f"{name}-"):
            continue
        path = f"{base}/{folder}/study.json"
        if filesystem.get_file_info(path).type != fs.FileType.File:
            continue
        with filesystem.open_input_stream(path) as stream:
            state = StudyState(**json.loads(stream.read()))
        if not state.finished:
            return state
    return None


def optuna_storage(url: str) -> Any:
    """An Optuna RDB storage (relative SQLite paths made absolute), checked by connecting to it."""
    import optuna

    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        url = prefix + str(Path(url.removeprefix(prefix)).resolve())
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as error:  # sqlalchemy raises many kinds; the user needs the URL and the reason
        raise ConfigError(f"tune.storage: cannot open Optuna storage {url}: {error}") from None


def run_trial(values: dict[str, Any], base: dict[str, Any] | None = None, root: str = "") -> None:
    """The Tune trainable: one training run of the study's base config with the sampled values.
    Its Ray Train run is named by the trial id, so a restarted trial resumes from its checkpoints."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from fisher_scale.tune.callbacks import trial_config

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base or {}, values, trial_id)
    output = Path(tune.get_context().get_trial_dir()) / "output" if "://" in root else Path(root) / "outputs" / trial_id
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(output)})})
    fit(trainer(cfg, run_name=trial_id, storage_path=f"{root}/train", callbacks=[TuneReportCallback()]), cfg)


def _start_tracking(cfg: ExperimentConfig, study: str) -> StudyState:
    uri = tracking.tracking_uri(cfg)
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, cfg.name, uri)
    run = client.create_run(
        experiment,
        run_name=study,
        tags={tracking.STUDY_TAG: study, tracking.KIND_TAG: "study", "searched": ",".join(sorted(_searched(cfg)))},
    )
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.")}
    tracking.log_params(client, run.info.run_id, params)
    client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config.json")
    return StudyState(study, cfg.model_dump(mode="json"), uri, experiment, run.info.run_id)


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


def _tuner(label: str, base: ExperimentConfig, space: dict, state: StudyState, root: str, concurrent: int) -> Any:
    """A new Tune experiment for one Optuna study, or the interrupted one restored from storage."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from fisher_scale.tune.callbacks import MlflowTrials, TrialTable

    study_root = f"{root}/{state.study}"
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base.model_dump(mode="json"), root=study_root), TRIAL_RESOURCES
    )
    path = f"{study_root}/{label}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    cfg = base.tune
    import optuna

    sampler = (
        optuna.samplers.TPESampler(seed=base.seed)
        if cfg.sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=base.seed)
    )
    search = EvalStepOptunaSearch(
        optuna_distributions(space),
        metric=cfg.metric,
        mode=cfg.mode,
        sampler=sampler,
        storage=optuna_storage(cfg.storage),
        study_name=f"{state.study}/{label}",
    )
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            metric=cfg.metric,
            mode=cfg.mode,
            max_t=base.train.steps,
            grace_period=cfg.grace_period,
            reduction_factor=cfg.reduction_factor,
        )
        if cfg.scheduler == "asha"
        else None
    )
    callbacks = [
        MlflowTrials(
            state.tracking_uri,
            state.experiment_id,
            state.parent_run_id,
            state.study,
            label,
            base.model_dump(mode="json"),
        ),
        TrialTable(label, cfg.metric, cfg.mode, sorted(space)),
    ]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler,
            num_samples=cfg.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(name=label, storage_path=study_root, callbacks=callbacks, verbose=0),
    )


def run_study(cfg: ExperimentConfig, *, resume: bool = False, on_start: Any = None) -> StudyState:
    """Check everything, then run (or resume) every Optuna study of ``cfg``; returns the final state.

    ``on_start(state, root)`` is called once the study's folder and MLflow parent run exist."""
    import ray

    cfg = resolve_paths(cfg)
    root = storage_root(cfg)
    state = find_resumable(root, cfg.name) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no unfinished study named {cfg.name!r} under {root}")
    if state is not None:
        cfg = ExperimentConfig.model_validate(state.config)
    studies = check_study(cfg)
    tracking.check_reachable(tracking.tracking_uri(cfg))
    optuna_storage(cfg.tune.storage)
    for base, _ in studies.values():
        check_local_resources(base)
    if state is None:
        state = _start_tracking(cfg, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        _write_state(root, state)
    else:
        tracking.client(state.tracking_uri).update_run(state.parent_run_id, status="RUNNING")
    if on_start is not None:
        on_start(state, root)
    # training reports eval metrics only on eval steps; check_study has already made sure the metric is
    # reported, so Tune's check that every result carries it would only reject the training reports
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    start_ray(cfg, log_to_driver=False)
    resources = ray.cluster_resources()
    for base, _ in studies.values():
        check_resources(base, resources)
    concurrent = _max_concurrent(cfg, resources)
    client = tracking.client(state.tracking_uri)
    for label, (base, space) in studies.items():
        results = _tuner(label, base, space, state, root, concurrent).fit()
        if _ended_trials(client, state, label) < cfg.tune.num_samples:
            _close_unfinished(client, state, "KILLED")
            raise StudyInterrupted(
                f"study {state.study} interrupted in {label}; continue it with: fisher-scale tune CONFIG --resume"
            )
        if results.num_errors == cfg.tune.num_samples:
            _close_unfinished(client, state, "FAILED")
            raise RuntimeError(f"every trial of study {label} failed; the first error:\n{results.errors[0]}")
        state.best[label] = _best(results, cfg, client, state)
    _finish(client, state, cfg, root)
    return state


def _best(results: Any, cfg: ExperimentConfig, client: Any, state: StudyState) -> dict[str, Any]:
    """The study's best trial (last reported metric), with its adapter logged to its run."""
    try:
        best = results.get_best_result(cfg.tune.metric, cfg.tune.mode, scope="last", filter_nan_and_inf=True)
    except RuntimeError:
        return {"error": "no trial reported a finite metric"}
    trial_id = best.metrics["trial_id"]
    run_id = tracking.find_run(client, state.experiment_id, **{tracking.TRIAL_TAG: trial_id})
    checkpoint = best.metrics.get("checkpoint_path")
    if checkpoint and run_id:
        from ray.train import Checkpoint

        with Checkpoint(checkpoint).as_directory() as directory:
            if (Path(directory) / "adapter").is_dir():
                client.log_artifacts(run_id, str(Path(directory) / "adapter"), "adapter")
    return {
        "trial_id": trial_id,
        "run_id": run_id,
        "metric": best.metrics.get(cfg.tune.metric),
        "config": best.config,
        "checkpoint": checkpoint,
        "errors": results.num_errors,
    }


def _ended_trials(client: Any, state: StudyState, label: str) -> int:
    """Trials that completed, were stopped early or failed. Tune marks the trials it stops on Ctrl+C as
    terminated too (its saved state still says running), so count the child runs closed by our callback."""
    runs = client.search_runs(
        [state.experiment_id],
        filter_string=f"tags.`{tracking.STUDY_TAG}` = '{state.study}' and tags.study_label = '{label}' "
        "and attributes.status != 'RUNNING'",
        max_results=10000,
    )
    return len(runs)


def _close_unfinished(client: Any, state: StudyState, status: str) -> None:
    """Runs of trials Tune killed stay RUNNING in MLflow unless closed; the parent too."""
    runs = client.search_runs(
        [state.experiment_id],
        filter_string=f"tags.`{tracking.STUDY_TAG}` = '{state.study}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status=status)


def _finish(client: Any, state: StudyState, cfg: ExperimentConfig, root: str) -> None:
    """Best metrics and adapters on the parent run, comparison plots, the study marked finished."""
    from fisher_scale.tune.compare import study_report

    best_metrics = {f"best/{label}/{cfg.tune.metric}": b.get("metric") for label, b in state.best.items()}
    tracking.log_metrics(client, state.parent_run_id, best_metrics, step=0)
    found = [(label, b) for label, b in state.best.items() if isinstance(b.get("metric"), float)]
    if found:
        label, best = (min if cfg.tune.mode == "min" else max)(found, key=lambda item: item[1]["metric"])
        client.set_tag(state.parent_run_id, "best_trial", best["trial_id"])
        client.set_tag(state.parent_run_id, "best_study", label)
        if best.get("run_id"):
            for artifact in client.list_artifacts(best["run_id"], "adapter"):
                local = client.download_artifacts(best["run_id"], artifact.path)
                client.log_artifact(state.parent_run_id, local, "best_adapter")
    with tempfile.TemporaryDirectory() as tmp:  # the plots live in MLflow (local storage keeps a copy)
        plots = Path(tmp) if "://" in root else Path(root) / state.study / "plots"
        study_report(client, state, cfg, plots_dir=plots)
    _close_unfinished(client, state, "FINISHED")
    state.finished = True
    _write_state(root, state)
