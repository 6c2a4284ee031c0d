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


def test_bad_input_is_reported_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer:\n  name: sgd\ndistributed:\n  zero_stage: 4\n")
    assert main(["train", str(path)]) == 2
    out = capsys.readouterr().out
    assert "optimizer.name" in out and "distributed.zero_stage" in out
    assert main(["eval", str(path), "--checkpoint", str(tmp_path)]) == 2
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().out


def test_study_commands_print_what_the_study_ran(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """``tune`` and ``scale`` print their tables from the config the study ran (a resumed study's own) and the
    result; the studies themselves are replaced here (tests/test_tune.py and test_scale.py run real ones)."""
    import fisher_scale.scale.grid as grid
    import fisher_scale.tune.study as study
    from fisher_scale.scale.analysis import Fit, PointResult
    from fisher_scale.study.experiment import StudyState

    started = {"name": "ran", "scale": {"grid": {"model.name": ["tiny", "tiny-x2"]}}, "tune": {"metric": "train/loss"}}
    state = StudyState("ran-20260101-000000", started, "sqlite:///m.db", "1", "p", best={"adamw": {
        "trial_id": "t1", "metric": 1.25, "config": {"lr": 0.003}}}, comparison=[
        {"arm": "adamw", "mean best loss": 1.25, "verdict": "reference"},
        {"arm": "adafish", "mean best loss": 1.5, "verdict": "not distinguishable"}])  # fmt: skip
    points = [PointResult({"model.name": m}, m, parameters=n, tokens_per_s=10.0, step_time_s=0.5) for m, n in
              (("tiny", 123), ("tiny-x2", 690))]  # fmt: skip
    report = grid.ScaleReport(state, points, [Fit("step_time_s", "parameters", {}, 0.71, 0.99, 2)], [])
    monkeypatch.setattr(study, "run_study", lambda cfg, **kwargs: state)
    monkeypatch.setattr(grid, "run_scale", lambda cfg, **kwargs: report)
    monkeypatch.setattr(study, "optuna_storage", lambda url: type("S", (), {"url": url})())
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump({"name": "edited", "tune": {"metric": "gsm8k/loss"}}))
    assert main(["tune", str(path), "--resume", "--set", "lr=0.1"]) == 0
    out = capsys.readouterr().out
    assert "--set and --seeds are ignored with --resume" in out and "t1" in out and "1.25" in out and "lr=0.003" in out
    assert "arms compared" in out and "not distinguishable" in out  # the comparison, after the best trials
    with pytest.raises(SystemExit):
        main(["tune", str(path), "--seeds", "0,one"])
    assert "comma-separated integers" in capsys.readouterr().err
    assert "loss, min" in out and "gsm8k/loss" not in out and "fisher-scale compare ran" in out
    assert main(["scale", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-x2" in out and "690" in out and "0.710" in out and "500.0" in out
