"""``fisher-scale train``: one training job as a Ray Train ``TorchTrainer`` run, tracked in MLflow.

Everything that can be checked is checked before Ray starts; the result also lands in
``train.output_dir`` (the adapter, ``metrics.jsonl`` and ``result.json``) so that scripts need no MLflow.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fisher_scale import tracking
from fisher_scale.config import ConfigError, ExperimentConfig
from fisher_scale.errors import FisherScaleError, InputError, RunFailed
from fisher_scale.plan.check import check_memory
from fisher_scale.train import metrics as metric


def check_resources(cfg: ExperimentConfig, available: dict[str, float]) -> None:
    """Workers must fit the cluster: otherwise Ray would wait forever for a placement group."""
    dist = cfg.distributed
    need_cpu = dist.num_workers * dist.cpus_per_worker
    if need_cpu > available.get("CPU", 0):
        raise ConfigError(
            f"distributed.num_workers={dist.num_workers} × cpus_per_worker={dist.cpus_per_worker} needs {need_cpu:g} "
            f"CPUs; the Ray cluster has {available.get('CPU', 0):g}"
        )
    if dist.use_gpu and dist.num_workers > available.get("GPU", 0):
        raise ConfigError(
            f"distributed.num_workers={dist.num_workers} with use_gpu needs {dist.num_workers} GPUs; "
            f"the Ray cluster has {available.get('GPU', 0):g}"
        )


def resolve_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Relative paths made absolute against the driver's working directory (Ray workers run elsewhere), and
    the dataset checked here, before any cluster work: a missing file is a config error, not a worker crash."""
    from fisher_scale.data import is_hub_id
    from fisher_scale.tasks import task_of

    try:
        task = task_of(cfg.data.dataset)
        task.check(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    source = task.source(cfg)
    if not is_hub_id(source) and not Path(source).exists():
        raise ConfigError(f"data.source: {source} does not exist (a local GSM8K/GLUE copy, or a hub id)")
    owner = Path(source.split("/", 1)[0])
    if is_hub_id(source) and owner.is_dir():
        raise ConfigError(
            f"data.source: {source} does not exist, though the folder {owner.resolve()} does: a missing local copy "
            "is not taken for a hub id (write the path as it is on disk)"
        )
    data = cfg.data.model_copy(update={"source": source if is_hub_id(source) else str(Path(source).resolve())})
    model_path = Path(cfg.model.name)
    model = cfg.model.model_copy(update={"name": str(model_path.resolve())}) if model_path.exists() else cfg.model
    train = cfg.train.model_copy(
        update={
            "output_dir": str(Path(cfg.train.output_dir).resolve()),
            "resume_from": str(Path(cfg.train.resume_from).resolve()) if cfg.train.resume_from else None,
        }
    )
    storage = cfg.distributed.storage_path
    if storage and "://" not in storage:
        storage = str(Path(storage).resolve())
    distributed = cfg.distributed.model_copy(update={"storage_path": storage})
    return cfg.model_copy(update={"data": data, "model": model, "train": train, "distributed": distributed})


def check_inputs(cfg: ExperimentConfig) -> None:
    """What the run will read or write, checked on the driver before Ray starts and before anything is written
    (call after :func:`resolve_paths`): the data parsed whole, the storage folder writable, the cluster address
    reachable. Each failure is a ``ConfigError`` naming the key."""
    from fisher_scale.data import is_hub_id
    from fisher_scale.tasks import task_of

    task = task_of(cfg.data.dataset)
    try:
        task.check_data(cfg)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"data: {error}") from None
    if cfg.model.task == "causal_lm" and not is_hub_id(task.source(cfg)):
        check_targets(cfg)
    storage = cfg.distributed.storage_path
    if storage and "://" not in storage:
        check_writable("distributed.storage_path", Path(storage))
    if cfg.distributed.address not in (None, "auto", "local"):
        check_reachable_address(cfg.distributed.address)


def check_targets(cfg: ExperimentConfig) -> None:
    """Training examples that keep a target token at ``data.max_length``, counted here as the workers will (they
    train on those only): none is an error, some left out a warning."""
    from fisher_scale.train.dataset import TrainingSet

    data = TrainingSet(cfg)
    what = (
        f"data.max_length={cfg.data.max_length} leaves {data.dropped} of {data.dropped + len(data)} training "
        f"examples of {cfg.data.dataset} with no target token (the prompt fills it)"
    )
    if not len(data):
        raise ConfigError(f"{what}: nothing to train on; raise data.max_length")
    if data.dropped:
        warnings.warn(f"{what}: they are left out; raise data.max_length to keep them", stacklevel=2)


def check_writable(key: str, folder: Path) -> None:
    """``folder`` exists as a writable folder, or its nearest existing parent is one (nothing is created)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {folder} cannot be written: {existing} is not writable")


def check_reachable_address(address: str) -> None:
    """A Ray address (``host:port`` or ``ray://host:port``) accepts connections within 5 s."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"distributed.address: {address!r} is not host:port, ray://host:port, auto or local")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise ConfigError(f"distributed.address: nothing answers at {host}:{port} ({error})") from None


def check_model(cfg: ExperimentConfig) -> None:
    """``model.name`` can be read and every ``peft.target_modules`` entry names some of its modules (PEFT's rule:
    the module's name or a dotted suffix of it), checked on the model's meta-device skeleton (only its config is
    read) before any cluster work; PEFT then wraps the skeleton, so a target it cannot adapt is caught too."""
    from torch import nn

    from fisher_scale.models import Lora, apply_lora, model_skeleton

    try:
        model = model_skeleton(cfg.model.name, cfg.model.task)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"model.name: {cfg.model.name!r} cannot be loaded: {error}") from None
    if not cfg.peft.enabled:
        return
    names = [name for name, _ in model.named_modules()]
    targets = cfg.peft.target_modules
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"peft.target_modules: {', '.join(unmatched)} name no module of {cfg.model.name!r}; "
            f"its linear layers are named {', '.join(linear)}"
        )
    try:
        apply_lora(model, Lora(cfg.peft.rank, target_modules=targets), task=cfg.model.task)
    except ValueError as error:
        raise ConfigError(f"peft.target_modules: {error}") from None


def start_ray(cfg: ExperimentConfig, *, log_to_driver: bool = True) -> None:
    """Join ``distributed.address`` (or ``$RAY_ADDRESS``) or start a local Ray instance (once per process), and
    export its address as ``$RAY_ADDRESS``: Ray's own helpers that this process starts (Ray Train's placement-group
    cleaner) then join this instance, not fail on "multiple active Ray instances" when the machine has another.
    A local instance listens on loopback only, and ends with this process (``train.reaper``)."""
    import ray
    from ray._private import ray_constants

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    local = cfg.distributed.address is None and "RAY_ADDRESS" not in os.environ
    if local:
        # Ray's single-machine mode (its default on macOS and Windows): the node's address is 127.0.0.1, and the
        # GCS, raylet, workers and agents bind it instead of every interface. The variable reaches Ray's
        # processes; the constant is this process's copy, read when ray.init picks the node's address.
        os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        # no node of a one-machine cluster is drained or preempted: Ray Train's watcher for that only logs a
        # core-worker error line as the controller creates it
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    try:
        ray.init(address=cfg.distributed.address, log_to_driver=log_to_driver, configure_logging=False)
    except (ConnectionError, RuntimeError) as error:
        if local:
            raise
        raise ConfigError(join_failure(cfg.distributed.address, error)) from None
    if local:  # this process started the instance: it goes with this process, even when killed
        from fisher_scale.train.reaper import reap_with_this_process

        reap_with_this_process()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def join_failure(address: str | None, error: BaseException) -> str:
    """Why this driver could not join the cluster at ``distributed.address`` (else ``$RAY_ADDRESS``), and what to
    change: a refused token (Ray's token authentication) names the variables Ray reads it from."""
    key, where = ("distributed.address", address) if address else ("$RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    cause: BaseException | None = error
    while cause is not None:  # Ray wraps the refusal in the error it raises
        if "InvalidAuthToken" in str(cause) or type(cause).__name__ == "AuthenticationError":
            return (
                f"{key}: the Ray cluster at {where} refused this driver's authentication token: set RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token (`ray get-auth-token` on its "
                "head) and RAY_AUTH_MODE=token"
            )
        cause = cause.__cause__ or cause.__context__
    return f"{key}: cannot join the Ray cluster at {where}: {last_line(error)}"


def local_resources(cfg: ExperimentConfig) -> dict[str, float] | None:
    """Without a cluster address the machine is the cluster: its CPUs and GPUs (else None)."""
    if cfg.distributed.address is not None or "RAY_ADDRESS" in os.environ:
        return None
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def check_local_resources(cfg: ExperimentConfig) -> None:
    """Check a local machine's resources before starting Ray on it."""
    resources = local_resources(cfg)
    if resources is not None:
        check_resources(cfg, resources)


def trainer(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` of one experiment (also what a Tune trial runs, with Tune's report callback).
    A second trainer with the same run name and storage resumes from that run's latest checkpoint;
    ``train.resume_from`` is read by the workers themselves (Train V2 has no ``resume_from_checkpoint``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fisher_scale.train.worker import train_worker

    dist = cfg.distributed
    return TorchTrainer(
        train_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers, use_gpu=dist.use_gpu, resources_per_worker={"CPU": dist.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name or cfg.name,
            storage_path=storage_path or dist.storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # warnings and errors only: at INFO the controller logs a failed worker's traceback a second time
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


@contextmanager
def relayed(handle: Callable[[dict[str, Any]], None]) -> Iterator[Any]:
    """A Ray Train callback for the trainer, passing every report (rank 0's metrics, with its checkpoint's path) to
    ``handle`` on a thread of this process: Ray Train runs callbacks in its controller actor, the driver draws
    the progress and writes MLflow. The reports still queued are handled before the block ends, and an error
    ``handle`` raised is raised there."""
    from queue import Empty

    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0})
    done, errors = threading.Event(), []

    class ReportRelay(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            queue.put({**metrics[0], **({CHECKPOINT_KEY: checkpoint.path} if checkpoint else {})})

    def drain() -> None:
        while True:
            try:
                report = queue.get(timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            try:
                handle(report)
            except Exception as error:  # raised on the driver's thread at the end of the block
                errors.append(error)
                return

    thread = threading.Thread(target=drain, name="fisher-scale-reports", daemon=True)
    thread.start()
    try:
        yield ReportRelay()
    finally:
        done.set()
        thread.join()
        queue.shutdown()
    if errors:
        raise errors[0]


#: the key of a relayed report that holds its checkpoint's path (what Tune's results call it)
CHECKPOINT_KEY = "checkpoint_path"


def track_report(log: tracking.RunLog, report: dict[str, Any]) -> bool:
    """Keep a report in its run's log with the ``outcome`` it says (``train.metrics.report_outcome``) until the log
    is sent; False when its step was logged already (a restarted worker reports its checkpoint's step again)."""
    if not log.log(report):
        return False
    outcome = metric.report_outcome(report)
    if outcome is not None:
        log.tag("outcome", outcome)
    return True


def training_run(cfg: ExperimentConfig, name: str, uri: str) -> tracking.RunLog:
    """The MLflow run of one ``fisher-scale train`` job, in the experiment named by the config, logged like a trial
    (params it used, its config, metrics at their steps), kind ``train``."""
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, cfg.name, uri)
    tags = {tracking.KIND_TAG: tracking.TRAIN_KIND, "optimizer": cfg.optimizer.name, "ray_train_run": name}
    run_id = tracking.create_run(client, experiment, name, tags, cfg)
    return tracking.RunLog(client, run_id, step=metric.STEP, unchanging=metric.UNCHANGING)


def run_training(
    cfg: ExperimentConfig, *, run_name: str | None = None, on_report: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Check, start Ray, run one training job tracked in MLflow, write ``result.json``; returns its content, with
    the MLflow run (``mlflow_run``, ``tracking_uri``). ``on_report`` sees every report as it arrives (a progress
    display)."""
    import ray

    cfg = resolve_paths(cfg)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    check_inputs(cfg)
    check_writable("train.output_dir", Path(cfg.train.output_dir))
    if cfg.train.resume_from:
        from fisher_scale.train.checkpoint import check_checkpoint

        try:
            check_checkpoint(Path(cfg.train.resume_from))
        except InputError as error:
            raise ConfigError(f"train.resume_from: {error}") from None
    check_local_resources(cfg)
    check_model(cfg)
    check_memory([("", cfg)])
    start_ray(cfg)
    check_resources(cfg, ray.cluster_resources())
    history = Path(cfg.train.output_dir) / "metrics.jsonl"
    history.unlink(missing_ok=True)
    # Ray Train resumes a run whose name already exists in storage: each invocation gets its own name, and
    # continuing a run is explicit (train.resume_from)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log = training_run(cfg, run_name, uri)

    def handle(report: dict[str, Any]) -> None:
        metrics = {k: v for k, v in report.items() if k != CHECKPOINT_KEY}
        logged = track_report(log, metrics)
        log.send()
        if logged:  # the whole history, readable without MLflow: one line per step
            history.parent.mkdir(parents=True, exist_ok=True)
            with history.open("a") as out:
                out.write(json.dumps(metrics, default=str) + "\n")
        if on_report is not None:
            on_report(report)

    try:
        with relayed(handle) as relay:
            summary = fit(trainer(cfg, run_name=run_name, callbacks=[relay]), cfg)
    except BaseException as error:
        log.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    adapter = Path(summary["adapter"])
    if adapter.is_dir():
        from fisher_scale.train.card import add_provenance  # imports torch: not at the top (compare reads this module)

        add_provenance(adapter, {"MLflow run": log.run_id})
        log.client.log_artifacts(log.run_id, str(adapter), "adapter")
    log.client.log_artifact(log.run_id, str(Path(cfg.train.output_dir) / "result.json"))
    log.end("FINISHED")
    run = log.client.get_run(log.run_id).info
    return {**summary, "mlflow_run": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": uri}


def training_failure(error: BaseException) -> FisherScaleError:
    """What a failed Ray Train run means to the user, in one line: the exception a worker raised (bad input
    that only a worker could see stays bad input). The worker printed its traceback already."""
    failures = list(getattr(error, "worker_failures", {}).items())  # Train V2's WorkerGroupError
    rank, cause = failures[0] if failures else (None, error)
    cause = getattr(cause, "_base_exc", cause)  # Ray wraps the worker's exception with its traceback text
    if isinstance(cause, InputError):
        return cause
    where = "" if rank is None else f" on rank {rank}"
    return RunFailed(f"training failed{where}: {type(cause).__name__}: {last_line(cause)}")


def last_line(error: BaseException) -> str:
    """The last non-empty line of an error's text: the exception itself when the text holds a traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def fit(torch_trainer: Any, cfg: ExperimentConfig) -> dict[str, Any]:
    """Run a trainer of ``cfg`` to the end and write ``result.json`` into ``train.output_dir``."""
    try:
        result = torch_trainer.fit()
    except Exception as error:  # Ray Train raises its worker errors from fit()
        raise training_failure(error) from None
    if result.error is not None:
        raise training_failure(result.error) from None
    return write_result(cfg, result.metrics, result.checkpoint.path if result.checkpoint else None)


def write_result(cfg: ExperimentConfig, metrics: dict[str, Any], checkpoint: str | None) -> dict[str, Any]:
    """Write a finished run's ``result.json`` into ``train.output_dir``: its last metrics, its last checkpoint,
    its adapter and config; returns that content."""
    output = Path(cfg.train.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "metrics": metrics,
        "checkpoint": checkpoint,
        "adapter": str(output / "adapter"),
        "config": cfg.model_dump(mode="json"),
    }
    (output / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
