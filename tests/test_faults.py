"""Fault injection: bad input, damaged checkpoints and failed runs, each as the user meets it on the command line
(exit code, one line naming what to change) and what is recovered."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from fisher_scale.cli import main
from fisher_scale.config import build_config
from fisher_scale.errors import DamagedCheckpoint, InputError, NonFiniteError, RunFailed
from fisher_scale.train.checkpoint import check_checkpoint
from fisher_scale.train.launcher import training_failure
from fisher_scale.train.local import run_jobs

from .test_distributed import DATA, experiment

pytestmark = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"needs the offline GLUE copy in {DATA}")

TRAIN_DEMO = Path(__file__).resolve().parents[1] / "tune_configs" / "train_demo.yaml"


@pytest.mark.parametrize(
    ("error", "code", "tracebacks"),
    [
        (InputError("data.source: /x:3: not JSON"), 2, 0),
        (RunFailed("training failed on rank 1: NonFiniteError: non-finite loss at optimizer step 4"), 1, 0),
        (ZeroDivisionError("a bug"), 1, 1),
        (KeyboardInterrupt(), 130, 0),
    ],
)
def test_each_error_has_its_exit_code_and_is_printed_once(
    error: BaseException, code: int, tracebacks: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import fisher_scale.train.launcher as launcher

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(launcher, "run_training", fail)
    assert main(["train", str(TRAIN_DEMO)]) == code
    out = capsys.readouterr().out
    assert out.count("Traceback") == tracebacks
    if str(error) and tracebacks == 0:
        assert out.splitlines()[-1] == f"error: {error}"


def test_a_worker_error_is_one_line_and_bad_input_seen_by_a_worker_stays_bad_input() -> None:
    """What Ray Train's ``fit()`` raises for a failed worker (Train V2: a ``WorkerGroupError`` holding the worker's
    exception beside its traceback text) becomes one line; the traceback is the one the worker printed."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    def group_error(cause: Exception) -> WorkerGroupError:
        wrapped = UserExceptionWithTraceback(cause, f"Traceback (most recent call last):\n  ...\n{cause!r}\n")
        return WorkerGroupError("[Rank 1 Error Snippet]: ...", {1: wrapped})

    failure = training_failure(group_error(NonFiniteError("non-finite loss at optimizer step 4")))
    assert isinstance(failure, RunFailed)
    assert str(failure) == "training failed on rank 1: NonFiniteError: non-finite loss at optimizer step 4"
    bad = InputError("data.source: train.jsonl:7: not JSON")
    assert training_failure(group_error(bad)) is bad
    assert str(training_failure(RuntimeError("Traceback\n  ...\nOSError: disk full"))) == (
        "training failed: RuntimeError: OSError: disk full"
    )


def test_a_nonfinite_run_exits_1_with_one_line(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "nan.yaml"
    tree = experiment("nan", tmp_path, lr=float("inf"), optimizer__name="adamw", train__steps=3, train__log_every=3)
    tree["distributed"]["storage_path"] = str(tmp_path / "ray")
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 1
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert out.splitlines()[-1].startswith("error: training failed on rank 0: NonFiniteError: non-finite")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two checkpoints (steps 2 and 4) of a 2-rank run, as Ray Train merges the ranks' folders."""
    out = tmp_path_factory.mktemp("checkpoints")
    config = experiment("run", out, lr=1e-3, data__batch_size=2, train__steps=4, train__checkpoint_every=2)
    run_jobs(2, [("run", config, None)], out)
    (out / "run.yaml").write_text(yaml.safe_dump(config))
    return out


def _damaged_copy(checkpoints: Path, tmp_path: Path, step: int, name: str) -> Path:
    """A copy of step ``step``'s checkpoint with file ``name`` cut to half its size."""
    copy = tmp_path / f"checkpoint_{step:06d}"
    shutil.copytree(checkpoints / f"run-checkpoint-{step}", copy)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    return copy


def test_a_checkpoint_lists_every_ranks_files_and_a_damaged_one_is_named(checkpoints: Path, tmp_path: Path) -> None:
    intact = checkpoints / "run-checkpoint-4"
    assert check_checkpoint(intact)["step"] == 4
    assert {p.name for p in intact.glob("manifest.rank*.json")} == {"manifest.rank0.json", "manifest.rank1.json"}
    truncated = _damaged_copy(checkpoints, tmp_path, 4, "optimizer.rank1.pt")
    with pytest.raises(DamagedCheckpoint, match=r"optimizer\.rank1\.pt: \d+ bytes, manifest\.rank1\.json says"):
        check_checkpoint(truncated)
    partial = tmp_path / "partial"
    shutil.copytree(intact, partial)
    for path in [partial / "optimizer.rank1.pt", partial / "manifest.rank1.json"]:
        path.unlink()  # rank 1's files never arrived
    with pytest.raises(DamagedCheckpoint, match=r"written by 2 rank\(s\) but holds 1 manifest"):
        check_checkpoint(partial)
    altered = tmp_path / "altered"
    shutil.copytree(intact, altered)
    weights = altered / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit changed
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=r"adapter_model\.safetensors: its content differs from the SHA-256"):
        check_checkpoint(altered)


def test_resume_after_a_failure_skips_a_damaged_checkpoint_for_the_older_intact_one(
    checkpoints: Path, tmp_path: Path
) -> None:
    """What a restarted Ray Train worker resumes from: Ray's latest checkpoint, else the newest intact one Ray
    kept; with none intact the error names every damaged file."""
    import contextlib

    from ray.train import Checkpoint

    from fisher_scale.train.worker import newest_intact

    run = tmp_path / "run"
    shutil.copytree(checkpoints / "run-checkpoint-2", run / "checkpoint_000002")
    latest = _damaged_copy(checkpoints, run, 4, "optimizer.rank0.pt")
    (run / "checkpoint_000009").mkdir()  # newer than Ray's latest (being written): not a candidate
    with contextlib.ExitStack() as stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        directory = newest_intact(Checkpoint(str(latest)), stack)
    assert directory == run / "checkpoint_000002" and check_checkpoint(directory)["step"] == 2
    assert any("optimizer.rank0.pt" in str(w.message) for w in caught)
    (run / "checkpoint_000002" / "trainer_state.json").write_text("{")
    with contextlib.ExitStack() as stack, pytest.raises(DamagedCheckpoint) as raised:
        warnings.simplefilter("ignore")
        newest_intact(Checkpoint(str(latest)), stack)
    assert "optimizer.rank0.pt" in str(raised.value) and "checkpoint_000002/trainer_state.json" in str(raised.value)


def test_commands_refuse_a_damaged_checkpoint_naming_the_file(
    checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = str(checkpoints / "run.yaml")
    damaged = _damaged_copy(checkpoints, tmp_path, 4, "optimizer.rank0.pt")
    assert main(["train", config, "--set", f"train.resume_from={damaged}"]) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("error: train.resume_from:") and "optimizer.rank0.pt" in line
    adapter = _damaged_copy(checkpoints, tmp_path / "eval", 4, "adapter/adapter_model.safetensors")
    assert main(["eval", config, "--checkpoint", str(adapter)]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().out
    output = tmp_path / "output"  # a run's output folder has no manifest: the load itself names the file
    shutil.copytree(checkpoints / "run" / "adapter", output / "adapter")
    weights = output / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", config, "--checkpoint", str(output)]) == 2
    assert "adapter_model.safetensors: not a readable safetensors file" in capsys.readouterr().out


def _start_a_study(root: str, uri: str, optuna_url: str, barrier: Any, results: Any) -> None:
    """What :func:`open_study` does first, in a process started at the same moment as its twins."""
    from fisher_scale import tracking
    from fisher_scale.study.experiment import claim_study_folder
    from fisher_scale.tune.study import optuna_storage

    barrier.wait()
    try:
        study = claim_study_folder(root, "same")
        experiment = tracking.experiment_id(tracking.client(uri), "same", uri)
        optuna_storage(optuna_url)
        results.put((study, experiment))
    except Exception as error:
        results.put((type(error).__name__, str(error)[:300]))


def test_identical_studies_started_at_once_get_their_own_folders_in_one_database(tmp_path: Path) -> None:
    """Without the lock the twins' first contact with a new SQLite store fails in one or both ("table ... already
    exists", an alembic migration error), and both name their study after the same second."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    args = (str(tmp_path / "ray"), f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db")
    processes = [context.Process(target=_start_a_study, args=(*args, barrier, results)) for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    studies, experiments = zip(*outcomes, strict=True)
    assert all(s.startswith("same-") for s in studies), outcomes
    assert len(set(studies)) == 3 and len(set(experiments)) == 1, outcomes
    assert {p.name for p in (tmp_path / "ray").iterdir()} == set(studies)


def test_credentials_in_store_urls_are_never_printed_or_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A password in ``tracking.uri`` goes to MLflow's credential variables (a resumed study takes them from
    there), one in any other URL is shown as ``***``: in errors, in the printed links and in MLflow params."""
    from fisher_scale import tracking
    from fisher_scale.tune.study import optuna_storage

    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD"):
        monkeypatch.setenv(variable, "restored after the test")
    config = tmp_path / "tune.yaml"
    uri = "http://alice:Zq9-secret@127.0.0.1:9/"  # port 9 (discard): nothing answers
    tree = experiment("creds", tmp_path, tracking={"uri": uri}, tune={"metric": "train/loss"})
    config.write_text(yaml.safe_dump(tree))
    assert main(["tune", str(config)]) == 2
    out = capsys.readouterr().out
    assert "Zq9-secret" not in out and "cannot reach the MLflow tracking server at http://127.0.0.1:9/" in out
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "Zq9-secret"
    tree["tune"]["storage"] = "mysql+pymysql://bob:Xy7-secret@127.0.0.1:9/optuna"  # no driver variable to move it to
    config.write_text(yaml.safe_dump(tree))
    assert main(["tune", str(config)]) == 2
    out = capsys.readouterr().out
    assert "Xy7-secret" not in out and "the password would be stored with the study" in out
    stored = tracking.move_database_password("postgresql://bob:Xy7-secret@db:5432/optuna")
    assert stored == "postgresql://bob@db:5432/optuna" and os.environ["PGPASSWORD"] == "Xy7-secret"
    with pytest.raises(InputError) as raised:
        optuna_storage("postgresql://bob:Xy7-secret@127.0.0.1:9/optuna")
    assert "Xy7-secret" not in str(raised.value) and "bob:***@127.0.0.1:9" in str(raised.value)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = tracking.client(uri)
    run = client.create_run(tracking.experiment_id(client, "creds", uri))
    tracking.log_params(client, run.info.run_id, {"tune.storage": "postgresql://bob:Xy7-secret@db:5432/optuna"})
    assert client.get_run(run.info.run_id).data.params["tune.storage"] == "postgresql://bob:***@db:5432/optuna"


def test_a_killed_driver_takes_its_local_ray_with_it() -> None:
    """SIGKILL of a driver that started a local Ray: every process of that instance (GCS, raylet, workers, the
    dashboard and runtime-env agents, which used to linger for minutes) is gone within seconds."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    probe = (
        "import os, time, psutil, ray\n"
        "from fisher_scale.config import build_config\n"
        "from fisher_scale.train.launcher import start_ray\n"
        "start_ray(build_config({}), log_to_driver=False)\n"
        "assert ray.get(ray.remote(lambda: 1).remote()) == 1\n"
        "time.sleep(2)\n"
        "print(' '.join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, env=env)
    try:
        ray_processes = [psutil.Process(int(pid)) for pid in driver.stdout.readline().split()]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert len(ray_processes) >= 4
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(p.is_running() and p.status() != "zombie" for p in ray_processes):
        time.sleep(0.5)
    left = [" ".join(p.cmdline())[:80] for p in ray_processes if p.is_running() and p.status() != "zombie"]
    assert not left, left


def test_a_resumed_run_reports_its_checkpoints_step_again_and_mlflow_keeps_one_point_per_step(
    checkpoints: Path, tmp_path: Path
) -> None:
    """The report written with a checkpoint may never reach MLflow (the driver stopped as it was written): a run
    resumed from it reports it again first; the MLflow callback logs it only where the run has no such step."""
    from types import SimpleNamespace

    import torch

    from fisher_scale import tracking
    from fisher_scale.study.callbacks import MlflowTrials

    config = yaml.safe_load((checkpoints / "run.yaml").read_text())
    config["train"]["output_dir"] = str(tmp_path / "again")
    run_jobs(2, [("again", config, str(checkpoints / "run-checkpoint-2"))], tmp_path)
    first = torch.load(checkpoints / "run-reports.pt", weights_only=False)
    again = torch.load(tmp_path / "again-reports.pt", weights_only=False)
    assert [r["step"] for r in first] == [2, 4] and [r["step"] for r in again] == [2, 4]
    assert again[0] == {k: v for k, v in first[0].items() if isinstance(v, int | float)}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "replay", uri)
    parent = client.create_run(experiment).info.run_id
    bases = {"adamw": build_config({"optimizer": {"name": "adamw"}}).model_dump(mode="json")}
    trial = SimpleNamespace(trial_id="t0", config={"lr": 1e-3})
    driver = MlflowTrials(uri, experiment, parent, "study-1", bases)
    for step, loss in [(2, 3.0), (2, 3.0), (4, 2.5)]:  # a worker restart within the run replays step 2
        driver.on_trial_result(0, [], trial, {"step": step, "train/loss": loss})
    driver.flush()  # what the stopped driver had written (in its writer process)
    restarted = MlflowTrials(uri, experiment, parent, "study-1", bases)  # the driver resumed the study
    for step, loss in [(4, 2.5), (6, 2.0)]:
        restarted.on_trial_result(0, [], trial, {"step": step, "train/loss": loss})
    history = client.get_metric_history(restarted.run_id(trial), "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(2, 3.0), (4, 2.5), (6, 2.0)]


@pytest.mark.parametrize("name", ["adamw", "adafisher", "adafish"])
def test_the_checkpoint_format_restores_what_torchs_state_dict_holds(name: str, tmp_path: Path) -> None:
    """The per-piece checkpoint (by parameter name and element range, any number of ranks) and torch's
    ``state_dict()`` (by parameter order, one process) describe the same state: one process saved and loaded
    through the checkpoint gives the state_dict of the optimizer that saved it, tensor for tensor."""
    import torch

    from fisher_scale.optim import build_optimizer
    from fisher_scale.optim.pieces import whole_parameters
    from fisher_scale.train.checkpoint import load_optimizer, save_optimizer

    from .conftest import lm_batch, tiny_lora_qwen2

    def trained(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = tiny_lora_qwen2(seed=0)
        optimizer = build_optimizer(name, model, lr=1e-3)
        for step in range(steps):
            optimizer.zero_grad()
            model(**lm_batch(step)).loss.backward()
            optimizer.step()
        return model, optimizer

    model, optimizer = trained(3)
    save_optimizer(tmp_path, 0, optimizer, whole_parameters(model))
    fresh_model, fresh = trained(0)
    load_optimizer(tmp_path, 0, 1, fresh, whole_parameters(fresh_model))
    saved, loaded = optimizer.state_dict(), fresh.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and len(saved["state"]) > 0
    torch.testing.assert_close(loaded["state"], saved["state"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.get("fisher"), saved.get("fisher"), rtol=0, atol=0)
