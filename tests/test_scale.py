"""Scaling studies: grid checks, per-point measures and fits against hand computations, and a real
grid of Ray Train runs tracked in MLflow."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fisher_scale.config import ConfigError, build_config
from fisher_scale.data import default_data_dir
from fisher_scale.scale.analysis import PointResult, fit_exponents, power_law, summarize
from fisher_scale.scale.grid import check_fit, check_grid, grid_points

needs_data = pytest.mark.skipif(
    not (default_data_dir() / "gsm8k" / "test.jsonl").is_file(), reason="needs ../shared/data/gsm8k"
)


def scale_tree(tmp_path: Path, grid: dict[str, list], **scale: Any) -> dict[str, Any]:
    return {
        "name": "scale-test",
        "model": {"name": "tiny"},
        "optimizer": {"name": "adafisher"},
        "data": {"max_length": 512, "max_train_examples": 32, "batch_size": 2},
        "train": {"steps": 8, "log_every": 2},
        "eval": {"every": 4, "max_examples": 4, "batch_size": 4, "max_new_tokens": 2},
        "distributed": {"zero_stage": 2, "storage_path": str(tmp_path / "ray")},
        "scale": {"grid": grid, **scale},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }


# --- the grid, checked before anything runs ---


def test_grid_is_every_combination_in_order(tmp_path: Path) -> None:
    cfg = build_config(
        scale_tree(
            tmp_path, {"model.name": ["tiny", "tiny-x2"], "distributed.num_workers": [1, 2], "global_batch": [8]}
        )
    )
    points = check_grid(cfg)
    assert [p.grid for p, _ in points] == [
        {"model.name": m, "distributed.num_workers": w, "global_batch": 8} for m in ("tiny", "tiny-x2") for w in (1, 2)
    ]
    assert [c.data.batch_size for _, c in points] == [8, 4, 8, 4]  # the global batch split over workers
    assert all(c.train.profile for _, c in points) and points[3][1].model.name == "tiny-x2"


@pytest.mark.parametrize(
    ("grid", "scale", "message"),
    [
        ({}, {}, "scale.grid is empty"),
        ({"model.name": []}, {}, "no values for model.name"),
        ({"model.nme": ["tiny"]}, {}, "unknown keys"),
        ({"distributed.num_workers": [1, 3], "global_batch": [8]}, {}, r"num_workers=3.*not a multiple"),
        ({"distributed.zero_stage": [2, 4]}, {}, r"zero_stage=4: .*less than or equal to 3"),
        ({"model.name": ["tiny"]}, {"target_loss": 1.0}, r"target_loss needs eval\.enabled and eval\.every"),
    ],
)
def test_bad_grids_list_the_offending_points(tmp_path: Path, grid: dict, scale: dict, message: str) -> None:
    tree = scale_tree(tmp_path, grid, **scale)
    if scale:
        tree["eval"]["every"] = 0
    with pytest.raises(ConfigError, match=message):
        check_grid(build_config(tree))


def test_points_that_do_not_fit_the_cluster_are_all_listed(tmp_path: Path) -> None:
    points = check_grid(build_config(scale_tree(tmp_path, {"distributed.num_workers": [1, 3, 4]})))
    check_fit(points[:1], {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"(?s)num_workers=3: .*needs 3 CPUs.*num_workers=4: .*needs 4 CPUs"):
        check_fit(points, {"CPU": 2.0})


def test_grid_points_keep_the_global_batch_out_of_config_values(tmp_path: Path) -> None:
    (point,) = grid_points(build_config(scale_tree(tmp_path, {"global_batch": [16]})))
    assert point.grid == {"global_batch": 16} and point.values == {}


# --- measures and fits ---


def test_summarize_means_skip_the_first_report_and_find_the_target() -> None:
    rows = [
        {"step": 2, "train/step_time_s": 9.0, "train/tokens_per_s": 1.0, "time/forward_s": 5.0, "model/parameters": 100,
         "memory/peak_bytes": 10, "memory/optimizer_state_bytes_per_rank": 7, "time/train_s": 9.0},
        {"step": 4, "train/step_time_s": 1.0, "train/tokens_per_s": 10.0, "time/forward_s": 0.4,
         "memory/peak_bytes": 30, "memory/optimizer_state_bytes_per_rank": 7, "time/train_s": 10.0,
         "gsm8k/loss": 3.0, "gsm8k/accuracy": 0.0,
         "model/parameters": 100},
        {"step": 6, "train/step_time_s": 3.0, "train/tokens_per_s": 20.0, "time/forward_s": 0.6,
         "memory/peak_bytes": 20, "memory/optimizer_state_bytes_per_rank": 8, "time/train_s": 13.0,
         "gsm8k/loss": 2.0, "gsm8k/accuracy": 0.5,
         "model/parameters": 100},
    ]  # fmt: skip
    result = summarize({"model.name": "tiny"}, "t1", rows, target_loss=2.5)
    assert result.step_time_s == 2.0 and result.tokens_per_s == 15.0 and result.forward_s == pytest.approx(0.5)
    assert result.backward_s is None  # not reported
    assert result.peak_bytes == 30 and result.state_bytes == 8 and result.parameters == 100
    assert (result.steps_to_target, result.time_to_target_s) == (6, 13.0)
    assert result.final == {"gsm8k/loss": 2.0, "gsm8k/accuracy": 0.5}
    assert summarize({}, "t1", rows, target_loss=1.0).steps_to_target is None


def test_a_resumed_point_reads_as_one_run_without_warm_up_reports() -> None:
    first = [{"step": s, "train/step_time_s": t} for s, t in ((2, 9.0), (4, 1.0), (6, 1.0))]
    second = [
        {"step": s, "train/step_time_s": t} for s, t in ((6, 8.0), (8, 3.0))
    ]  # resumed from the step-4 checkpoint
    result = summarize({}, "t", first + second, target_loss=None)
    assert result.step_time_s == 2.0  # steps 4 and 8; both sessions' first reports are warm-up, step 6 replaced


def test_power_law_and_fits_recover_known_exponents() -> None:
    xs = [1e5, 7e5, 5e6]
    exponent, r2 = power_law(xs, [3 * x**1.5 for x in xs])
    assert exponent == pytest.approx(1.5) and r2 == pytest.approx(1.0)
    points = [
        PointResult({"model.name": m, "distributed.num_workers": w}, None, parameters=n, step_time_s=1e-6 * n**0.8 * w,
                    optimizer_s=1e-3, state_bytes=int(4000 * n / w**0.9))
        for m, n in (("a", 1e5), ("b", 1e6)) for w in (1, 2, 4)
    ]  # fmt: skip
    fits = {
        (f.quantity, tuple(f.fixed.items())): f
        for f in fit_exponents(points, ["model.name", "distributed.num_workers"])
    }
    assert fits[("step_time_s", (("distributed.num_workers", 2),))].exponent == pytest.approx(0.8)
    assert fits[("optimizer_s", (("distributed.num_workers", 1),))].exponent == pytest.approx(0.0, abs=1e-9)
    state = fits[("state_bytes", (("model.name", "b"),))]
    assert state.exponent == pytest.approx(-0.9, abs=1e-4) and state.n == 3
    assert math.isclose(state.r2, 1.0, rel_tol=1e-6)
    assert "/" in state.metric_name() and "=" not in state.metric_name()


# --- a real study ---


@needs_data
def test_scaling_grid_runs_every_point_and_tracks_it(ray_session: None, tmp_path: Path) -> None:
    """Two sizes × 1 and 2 workers of AdaFisher under ZeRO-2: every point is a finished MLflow child run,
    the step time grows with size, and the per-rank state shrinks with workers (sharded, factors replicated)."""
    from mlflow import MlflowClient

    from fisher_scale.scale.grid import run_scale

    grid = {"model.name": ["tiny", "tiny-x2"], "distributed.num_workers": [1, 2], "global_batch": [4]}
    report = run_scale(build_config(scale_tree(tmp_path, grid, target_loss=100.0)))
    assert len(report.points) == 4
    for point in report.points:
        assert point.trial_id and point.parameters and point.tokens_per_s and point.peak_bytes and point.state_bytes
        assert point.comm_s is not None and point.optimizer_s is not None
        assert point.steps_to_target == 4  # the first evaluation meets a loss target of 100
        assert set(point.final) == {"gsm8k/loss", "gsm8k/accuracy"}
    by_grid = {(p.grid["model.name"], p.grid["distributed.num_workers"]): p for p in report.points}
    assert by_grid[("tiny-x2", 1)].parameters > 4 * by_grid[("tiny", 1)].parameters
    fits = {(f.quantity, tuple(sorted(f.fixed.items()))): f for f in report.fits}
    for size in ("tiny", "tiny-x2"):
        state = fits[("state_bytes", (("global_batch", 4), ("model.name", size)))]
        assert -1.0 < state.exponent < -0.5, state
    assert fits[("step_time_s", (("distributed.num_workers", 1), ("global_batch", 4)))].exponent > 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("scale-test")
    parent = client.get_run(report.state.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["fisher_scale.kind"] == "scale"
    children = client.search_runs([experiment.experiment_id], filter_string="tags.`fisher_scale.kind` = 'point'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {report.state.parent_run_id}
    assert {c.data.params["model.name"] for c in children} == {"tiny", "tiny-x2"}
    assert all(client.get_metric_history(c.info.run_id, "time/comm_s") for c in children)
    artifacts = {a.path for a in client.list_artifacts(report.state.parent_run_id, "plots")}
    assert {"plots/throughput_vs_size.png", "plots/memory_vs_workers.png", "plots/step_time_split.png"} <= artifacts
    assert any(k.startswith("fit/state_bytes_vs_workers/") for k in parent.data.metrics)
