"""``fisher-scale train`` through Ray Train: outputs, metrics, and recovery from a killed worker."""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fisher_scale.cli import main
from fisher_scale.config import build_config
from fisher_scale.train.launcher import run_training
from fisher_scale.train.metrics import reported_metrics

from .test_distributed import DATA, adapter, experiment, max_relative_difference

pytestmark = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"needs the offline GLUE copy in {DATA}")


def _config(tmp_path: Path, name: str, **changes: object):
    tree = experiment(name, tmp_path, **changes)
    tree["name"] = name
    tree["distributed"]["storage_path"] = str(tmp_path / "ray")
    return build_config(tree)


def test_two_worker_run_writes_adapter_result_and_metrics(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = _config(
        tmp_path,
        "fit",
        lr=1e-3,
        data__batch_size=2,
        train__steps=6,
        train__log_every=3,
        distributed__num_workers=2,
        distributed__zero_stage=2,
        mask={"enabled": True, "ratio": 0.5, "samples": 8, "warmup_steps": 2},
    )
    summary = run_training(cfg)
    result = json.loads((tmp_path / "fit" / "result.json").read_text())
    assert result["config"]["distributed"]["zero_stage"] == 2 and result["metrics"]["step"] == 6
    for key in (
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
        "train/step_time_s",
        "memory/optimizer_state_bytes_per_rank",
        "curvature_contrast/median",
        "mask/kept/all",
        "mask/kept/lora_A",
        "train/skipped_steps",
    ):
        assert key in summary["metrics"], key
    assert summary["metrics"]["mask/kept/all"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "fit" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "fit" / "mask.safetensors").is_file()
    history = [json.loads(line) for line in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [3, 6] and history[-1]["train/loss"] == summary["metrics"]["train/loss"]
    # the catalogue names exactly what the loop reports, per-block mask fractions aside (they depend on the model)
    written = {key for report in history for key in report if not key.startswith(("mask/kept/block/", "system/"))}
    assert written == reported_metrics(cfg)
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= set(history[0])
    # tracked in MLflow like a trial: the params it used, metrics at their steps (step itself is the axis), the
    # constants once, the system metrics, the adapter with its card naming the run
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(summary["mlflow_run"])
    assert run.info.status == "FINISHED" and run.data.tags["fisher_scale.kind"] == "train"
    assert run.data.params["optimizer.name"] == cfg.optimizer.name and "tune.metric" not in run.data.params
    assert "step" not in run.data.metrics and "system/node0/cpu_utilization_percentage" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [3, 6]
    assert len(client.get_metric_history(run.info.run_id, "model/parameters")) == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/README.md"} <= artifacts
    assert run.info.run_id in (tmp_path / "fit" / "adapter" / "README.md").read_text()
    # continued through the CLI from the last checkpoint (train.resume_from) onto one worker, to step 9
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    overrides = {
        "train.resume_from": result["checkpoint"],
        "train.steps": 9,
        "distributed.num_workers": 1,
        "train.output_dir": tmp_path / "more",
    }
    capsys.readouterr()
    assert main(["train", str(config), *(arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}"))]) == 0
    out = capsys.readouterr().out
    assert "step 9/9: loss " in out and " tokens/s" in out  # a plain line per report: the output is no terminal
    tail = out[out.rindex("MLflow:  run ") :]  # the summary last: its final lines are the run and how to open it
    assert "mlflow ui --backend-store-uri" in tail and len(tail.rstrip().splitlines()) <= 3, tail
    for noise in ("Reporting training result", "is deprecated", "Token authentication", "untested optimizer"):
        assert noise not in out, noise
    continued = [json.loads(line) for line in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()]
    # the checkpoint's report again (step 6, as first reported), then steps 7-9 only: a fresh run reports 3, 6, 9
    assert [r["step"] for r in continued] == [6, 9] and continued[0]["train/loss"] == history[-1]["train/loss"]
    assert continued[0]["mask/kept/all"] == pytest.approx(0.5, abs=0.01)  # the mask came back with it


def kill_after_first_checkpoint(checkpoints: str, process: str, done: threading.Event) -> list[int]:
    """SIGKILL the newest process whose command line names ``process`` once a file matches the glob
    ``checkpoints`` (a checkpoint's manifest); returns the killed pid, or nothing when ``done`` came first."""
    while not done.is_set():
        if glob.glob(checkpoints, recursive=True):
            found = [p for p in psutil.process_iter(["cmdline"]) if process in " ".join(p.info["cmdline"] or [])]
            if found:
                os.kill(found[-1].pid, signal.SIGKILL)
                return [found[-1].pid]
        time.sleep(0.1)
    return []


def test_killed_worker_is_replaced_and_training_resumes_exactly(ray_session: None, tmp_path: Path) -> None:
    changes = {
        "lr": 1e-3,
        "data__batch_size": 2,
        "train__steps": 12,
        "train__checkpoint_every": 4,
        "distributed__num_workers": 2,
        "distributed__zero_stage": 1,
        "distributed__max_failures": 1,
    }
    uninterrupted = run_training(_config(tmp_path, "steady", **changes))
    done = threading.Event()
    killed: list[int] = []
    checkpoints = f"{tmp_path}/ray/crash-*/**/checkpoint_*/trainer_state.json"  # the run is named <name>-<time>
    watcher = threading.Thread(
        target=lambda: killed.extend(kill_after_first_checkpoint(checkpoints, "RayTrainWorker", done))
    )
    watcher.start()
    try:
        crashed = run_training(_config(tmp_path, "crash", **changes))
    finally:
        done.set()
        watcher.join()
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert crashed["metrics"]["step"] == uninterrupted["metrics"]["step"] == 12
    assert max_relative_difference(adapter(tmp_path, "crash"), adapter(tmp_path, "steady")) < 1e-6
