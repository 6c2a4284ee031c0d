"""The ``fisher-scale`` command: evaluation of a saved adapter, and bad input before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fisher_scale.cli import main
from fisher_scale.train.local import run_jobs

from .test_distributed import DATA, experiment

pytestmark = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"needs the offline GLUE copy in {DATA}")


def test_eval_command_reproduces_the_sharded_evaluation_of_training(tmp_path: Path) -> None:
    config = experiment(
        "run",
        tmp_path,
        lr=1e-3,
        data__batch_size=2,
        train__steps=4,
        train__log_every=4,
        eval={"enabled": True, "max_examples": 24, "batch_size": 8},
    )
    run_jobs(2, [("run", config, None)], tmp_path)  # evaluation at the end, sharded over 2 ranks
    trained = torch.load(tmp_path / "run-reports.pt", weights_only=False)[-1]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "run"), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["glue/sst2/accuracy"] == pytest.approx(trained["glue/sst2/accuracy"])
    assert 0 <= metrics["glue/sst2/accuracy"] <= 1


def test_bad_input_is_reported_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  name: sgd\ndistributed:\n  zero_stage: 4\n")
    assert main(["train", str(path)]) == 2
    out = capsys.readouterr().out
    assert "optimizer.name" in out and "distributed.zero_stage" in out
    assert main(["eval", str(path), "--checkpoint", str(tmp_path)]) == 2
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().out
