"""What every study (an Optuna search, a scaling grid) shares: its folder and ``study.json`` in Ray
storage, the MLflow parent run, the trainable that runs one training job per trial, the Tuner with
the MLflow and live-table callbacks, and detection of an interrupted run for ``--resume``.

Layout of a study in Ray storage (``distributed.storage_path``, default ``~/ray_results``)::

    <name>-<YYYYmmdd-HHMMSS>/   study.json (resolved config, MLflow ids, finished flag)
        studies/ or grid/       the Tune experiment: every Optuna study's trials, or the scaling grid's
        train/<trial id>/       each trial's Ray Train run; a restarted trial resumes from its checkpoints
        outputs/<trial id>/     each trial's final adapter and result.json (local storage)
        plots/                  the study's plots (also in MLflow)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fisher_scale import tracking
from fisher_scale.config import ConfigError, ExperimentConfig, flatten, with_values
from fisher_scale.errors import Interrupted, RunFailed
from fisher_scale.study.trials import trial_config
from fisher_scale.train.launcher import (
    check_inputs,
    check_local_resources,
    check_model,
    check_resources,
    fit,
    last_line,
    resolve_paths,
    start_ray,
    trainer,
    write_result,
)

#: A trial that runs Ray Train is a light driver of its workers. Holding a CPU would starve its own workers on
#: a small machine (2 CPUs: a 2-worker trial would wait forever), and an empty request is refused,
#: so such trials hold a sliver of the head node's marker resource: no CPU, run on the head, any cluster.
TRIAL_RESOURCES = {"node:__internal_head__": 0.001}


class StudyInterrupted(Interrupted):
    """The study stopped before all trials finished (Ctrl+C); ``--resume`` continues it."""


@dataclass
class StudyState:
    """What ``study.json`` keeps so that ``--resume`` finds the same MLflow runs and config."""

    study: str
    config: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    kind: str = "tune"
    finished: bool = False
    best: dict[str, Any] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)


def storage_root(cfg: ExperimentConfig) -> str:
    return cfg.distributed.storage_path or str(Path("~/ray_results").expanduser())


def storage_filesystem(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), path


def write_state(root: str, state: StudyState) -> None:
    filesystem, base = storage_filesystem(root)
    filesystem.create_dir(f"{base}/{state.study}", recursive=True)
    with filesystem.open_output_stream(f"{base}/{state.study}/study.json") as out:
        out.write(json.dumps(asdict(state), indent=2).encode())


def claim_study_folder(root: str, name: str) -> str:
    """A new study name, ``<name>-<YYYYmmdd-HHMMSS>``, whose folder under ``root`` this process created: a second
    study of the same name started in the same second takes the next second. (An object store has no atomic
    folder creation: there two studies of one name started within a second may still collide.)"""
    filesystem, base = storage_filesystem(root)
    while True:
        study = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if "://" in root:
            filesystem.create_dir(f"{base}/{study}", recursive=True)
            return study
        Path(base).mkdir(parents=True, exist_ok=True)
        try:
            (Path(base) / study).mkdir()
            return study
        except FileExistsError:
            time.sleep(0.1)


def studies(root: str, name: str) -> Iterator[StudyState]:
    """The studies of this name under ``root`` (folders ``<name>-<timestamp>`` with a ``study.json``), newest first."""
    from pyarrow import fs

    filesystem, base = storage_filesystem(root)
    if filesystem.get_file_info(base).type != fs.FileType.Directory:
        return
    folders = sorted(
        (info.base_name for info in filesystem.get_file_info(fs.FileSelector(base))),
        reverse=True,
    )
    for folder in folders:
        if not re.fullmatch(rf"{re.escape(name)}-\d{{8}}-\d{{6}}", folder):
            continue
        path = f"{base}/{folder}/study.json"
        if filesystem.get_file_info(path).type != fs.FileType.File:
            continue
        with filesystem.open_input_stream(path) as stream:
            yield StudyState(**json.loads(stream.read()))


def find_resumable(root: str, name: str, kind: str) -> StudyState | None:
    """The newest unfinished study of this name and command (``tune``/``scale``) under ``root``."""
    return next((s for s in studies(root, name) if not s.finished and s.kind == kind), None)


#: where ``compare`` and ``report`` look for an experiment's studies unless told (``--storage``): the shipped
#: configs' local ``distributed.storage_path`` (relative to the working directory), then Ray's default
STUDY_ROOTS = ("outputs/ray", "~/ray_results")


def _absolute(root: str) -> str:
    """A storage root as one place: a local folder expanded and made absolute, a URI unchanged."""
    return root if "://" in root else str(Path(root).expanduser().resolve())


def newest_study(name: str, roots: Sequence[str] = STUDY_ROOTS) -> StudyState | None:
    """The newest study of this name under any of ``roots`` (finished or not, any command)."""
    found = [state for root in roots if (state := next(studies(_absolute(root), name), None))]
    return max(found, key=lambda state: state.study, default=None)


def compare_command(cfg: ExperimentConfig) -> str:
    """The ``fisher-scale compare`` command that finds this config's studies: ``--storage`` only when their root is
    not one of :data:`STUDY_ROOTS` (seen from the working directory)."""
    root = storage_root(cfg)
    default = _absolute(root) in {_absolute(r) for r in STUDY_ROOTS}
    return f"fisher-scale compare {cfg.name}" + ("" if default else f" --storage {root}")


def run_trial(values: dict[str, Any], bases: dict[str, dict[str, Any]] | None = None, root: str = "") -> None:
    """The Tune trainable: one training run of its study's base config with the sampled values.
    Its Ray Train run is named by the trial id, so a restarted trial resumes from its checkpoints."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(bases or {}, values, trial_id)
    output = Path(tune.get_context().get_trial_dir()) / "output" if "://" in root else Path(root) / "outputs" / trial_id
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(output)})})
    if cfg.tune.train_in_trial:
        from fisher_scale.train.worker import train_in_trial

        last = train_in_trial(cfg)
        checkpoint = tune.get_checkpoint()  # what Tune persisted of the last report's checkpoint
        write_result(cfg, last, checkpoint.path if checkpoint else None)
        return
    fit(trainer(cfg, run_name=trial_id, storage_path=f"{root}/train", callbacks=[TuneReportCallback()]), cfg)


def trial_resources(bases: dict[str, dict[str, Any]]) -> Callable[[dict[str, Any]], Any]:
    """What a trial's actor requests: a token share of the head node when its run is a Ray Train run (whose
    workers request the CPUs and GPUs), one worker's CPUs and GPU when it trains in the actor itself."""

    def resources(values: dict[str, Any]) -> Any:
        from ray import tune

        cfg = trial_config(bases, values, "resources")
        if not cfg.tune.train_in_trial:
            return tune.PlacementGroupFactory([TRIAL_RESOURCES])
        dist = cfg.distributed
        return tune.PlacementGroupFactory([{"CPU": dist.cpus_per_worker, "GPU": float(dist.use_gpu)}])

    return resources


def open_study(
    cfg: ExperimentConfig,
    *,
    kind: str,
    resume: bool,
    check: Callable[[ExperimentConfig], list[ExperimentConfig]],
    tags: dict[str, str] | None = None,
    searched: Iterable[str] = (),
    on_start: Callable[[StudyState, str], None] | None = None,
) -> tuple[ExperimentConfig, StudyState, str]:
    """Everything before the cluster: paths resolved, the newest unfinished study found (``resume``) or a
    new one named, ``check`` run (it returns every trial config to fit on the machine), the tracking store
    reached, the MLflow parent run (params: :func:`study_params`) and ``study.json`` written. Returns the config,
    state and storage root."""
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    root = storage_root(cfg)
    state = find_resumable(root, cfg.name, kind) if resume else None
    if resume and state is None:
        raise ConfigError(f"--resume: no unfinished study named {cfg.name!r} under {root}")
    if state is not None:
        cfg = ExperimentConfig.model_validate(state.config)
    else:  # what the study will store holds no password; refused before Optuna's storage is opened
        cfg = with_values(cfg, {"tune.storage": tracking.move_database_password(cfg.tune.storage)})
    trial_cfgs = check(cfg)
    for trial_cfg in trial_cfgs:
        check_local_resources(trial_cfg)
    for model_cfg in {(c.model.model_dump_json(), c.peft.model_dump_json()): c for c in trial_cfgs}.values():
        check_model(model_cfg)
    uri = state.tracking_uri if state is not None else tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    client = tracking.client(uri)
    if state is None:
        # the resolved stores are kept with the study, so a resume from anywhere finds the same ones
        cfg = with_values(cfg, {"tracking.uri": uri, "tune.storage": tracking.sqlite_url(cfg.tune.storage)})
        study = claim_study_folder(root, cfg.name)
        experiment = tracking.experiment_id(client, cfg.name, uri)
        run = client.create_run(
            experiment,
            run_name=study,
            tags={tracking.STUDY_TAG: study, tracking.KIND_TAG: tracking.RUN_KINDS[kind].parent, **(tags or {})},
        )
        tracking.log_params(client, run.info.run_id, study_params(cfg, trial_cfgs, searched))
        client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config.json")
        state = StudyState(study, cfg.model_dump(mode="json"), uri, experiment, run.info.run_id, kind=kind)
        write_state(root, state)
    else:
        client.update_run(state.parent_run_id, status="RUNNING")
    if on_start is not None:
        on_start(state, root)
    return cfg, state, root


def study_params(cfg: ExperimentConfig, trial_cfgs: list[ExperimentConfig], searched: Iterable[str]) -> dict[str, Any]:
    """A study's own params: its config without the keys that differ between its trials (the ``searched`` ones,
    and those its studies or grid points set apart, such as each study's optimizer), which only the trial runs
    log, and without the tracking section."""
    flat = [flatten(c) for c in trial_cfgs]
    differing = {k for k in (flat[0] if flat else {}) if len({repr(f.get(k)) for f in flat}) > 1}
    varying = set(searched) | differing
    return {k: v for k, v in flatten(cfg).items() if k not in varying and not k.startswith("tracking.")}


def start_cluster(cfg: ExperimentConfig, trial_configs: list[ExperimentConfig]) -> dict[str, float]:
    """Start or join Ray and check that every trial fits it; returns the cluster's resources."""
    import ray

    # training reports eval metrics only on eval steps; the studies check beforehand that their metric is
    # reported, so Tune's check that every result carries it would only reject the training reports
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    start_ray(cfg, log_to_driver=False)
    resources = ray.cluster_resources()
    for trial_cfg in trial_configs:
        check_resources(trial_cfg, resources)
    return resources


def make_tuner(
    name: str,
    bases: dict[str, ExperimentConfig],
    state: StudyState,
    root: str,
    *,
    tune_config: Any,
    keys: list[str],
    metric: str,
    mode: str,
    param_space: dict[str, Any] | None = None,
) -> Any:
    """A new Tune experiment ``name`` running :func:`run_trial` on the base config of each trial's study
    (``bases`` by label) with the MLflow, live-table and scheduler-state callbacks, or the interrupted one
    restored from storage (callbacks, search and scheduler state included)."""
    from ray import tune

    from fisher_scale.study.callbacks import MlflowTrials, SchedulerState, TrialTable

    study_root = f"{root}/{state.study}"
    bases_json = {label: base.model_dump(mode="json") for label, base in bases.items()}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, bases=bases_json, root=study_root), trial_resources(bases_json)
    )
    path = f"{study_root}/{name}"
    if tune.Tuner.can_restore(path):
        # trials interrupted while running continue; failed ones stay failed (a resume re-runs no failure)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    callbacks = [
        MlflowTrials(
            state.tracking_uri,
            state.experiment_id,
            state.parent_run_id,
            state.study,
            bases_json,
            kind=tracking.RUN_KINDS[state.kind].child,
            scheduler=next(iter(bases.values())).tune.scheduler,
        ),
        TrialTable(state.study, metric, mode, keys, bases_json, studies=len(bases) > 1),
    ]
    if tune_config.scheduler is not None:
        callbacks.append(SchedulerState(tune_config.scheduler))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        # trials that train in their actor pass it on to the next trial of the same resources, imports loaded
        tune_config=dataclasses.replace(
            tune_config, reuse_actors=any(base.tune.train_in_trial for base in bases.values())
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=study_root,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=next(iter(bases.values())).tune.max_failures),
            verbose=0,
        ),
    )


def fit_tuner(tuner: Any, state: StudyState, expected: int) -> Any:
    """Run a Tuner to the end; an interrupted run (Ctrl+C) or one whose trials all failed is an error."""
    client = tracking.client(state.tracking_uri)
    results = tuner.fit()
    if ended_trials(client, state) < expected:
        close_unfinished(client, state, "KILLED")
        raise StudyInterrupted(
            f"{state.study} interrupted; continue it with: fisher-scale {state.kind} CONFIG --resume"
        )
    if results.num_errors == expected:
        close_unfinished(client, state, "FAILED")
        raise RunFailed(f"every trial of {state.study} failed; the first: {last_line(results.errors[0])}")
    return results


def ended_trials(client: Any, state: StudyState) -> int:
    """Trials that completed, were stopped early or failed. Tune marks the trials it stops on Ctrl+C as
    terminated too (its saved state still says running), so count the child runs closed by our callback."""
    query = (
        f"tags.`{tracking.STUDY_TAG}` = '{state.study}' "
        f"and tags.`{tracking.KIND_TAG}` = '{tracking.RUN_KINDS[state.kind].child}' and attributes.status != 'RUNNING'"
    )
    return len(tracking.all_runs(client, state.experiment_id, query))


def close_unfinished(client: Any, state: StudyState, status: str) -> None:
    """Runs of trials Tune killed stay RUNNING in MLflow unless closed; the parent too."""
    query = f"tags.`{tracking.STUDY_TAG}` = '{state.study}' and attributes.status = 'RUNNING'"
    for run in tracking.all_runs(client, state.experiment_id, query):
        client.set_terminated(run.info.run_id, status=status)


def finish_study(root: str, state: StudyState) -> None:
    """Close the runs still open and mark the study finished (``--resume`` no longer picks it)."""
    close_unfinished(tracking.client(state.tracking_uri), state, "FINISHED")
    state.finished = True
    write_state(root, state)
