"""``fisher-scale scale``: a scaling study — one Ray Train run per point of ``scale.grid``, run one at a
time (so that points do not share the machine and their timings compare), each an MLflow child run
of the study's parent run; then per-point measures, power-law fits and plots (``analysis``)."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fisher_scale import tracking
from fisher_scale.config import ConfigError, ExperimentConfig, searchable_keys, with_values
from fisher_scale.plan.check import check_memory
from fisher_scale.scale.analysis import Fit, PointResult, describe, fit_exponents, plot_scaling, summarize
from fisher_scale.study.experiment import StudyState, finish_study, fit_tuner, make_tuner, open_study, start_cluster
from fisher_scale.train.launcher import check_resources, local_resources
from fisher_scale.train.metrics import TOKENS_PER_S

#: a grid key that is not a config key: the global batch, split as batch_size × workers × accumulation
GLOBAL_BATCH = "global_batch"


@dataclass(frozen=True)
class Point:
    """One grid point: its grid values (as written) and the dotted config values a trial applies."""

    grid: dict[str, Any]
    values: dict[str, Any]

    def label(self) -> str:
        return describe(self.grid, list(self.grid))


def grid_points(cfg: ExperimentConfig) -> list[Point]:
    """Every combination of ``scale.grid``, in the order written (the last key varies fastest)."""
    grid = cfg.scale.grid
    if not grid or not all(grid.values()):
        empty = [k for k, v in grid.items() if not v]
        raise ConfigError(f"scale.grid is empty{': no values for ' + ', '.join(empty) if empty else ''}")
    known = set(searchable_keys()) | {GLOBAL_BATCH}
    unknown = [k for k in grid if k not in known]
    if unknown:
        raise ConfigError(f"scale.grid: unknown keys {unknown}; use dotted config keys or {GLOBAL_BATCH}")
    points = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination, strict=True))
        points.append(Point(values, {k: v for k, v in values.items() if k != GLOBAL_BATCH}))
    return points


def point_config(cfg: ExperimentConfig, point: Point) -> ExperimentConfig:
    """The point's config; a global batch becomes the per-worker batch (it must divide evenly)."""
    point_cfg = with_values(cfg, point.values, origin=f"scale point ({point.label()})")
    if GLOBAL_BATCH not in point.grid:
        return point_cfg
    split = point_cfg.distributed.num_workers * point_cfg.data.gradient_accumulation_steps
    batch = int(point.grid[GLOBAL_BATCH])
    if batch % split:
        raise ConfigError(
            f"global_batch={batch} is not a multiple of num_workers × gradient_accumulation_steps={split}"
        )
    return with_values(point_cfg, {"data.batch_size": batch // split}, origin=f"scale point ({point.label()})")


def check_grid(cfg: ExperimentConfig) -> list[tuple[Point, ExperimentConfig]]:
    """Every point built and validated; all offending points are listed in one error."""
    from fisher_scale.train.evaluation import eval_metric_names

    checked, problems = [], []
    for point in grid_points(cfg):
        try:
            point_cfg = point_config(cfg, point)
        except ConfigError as error:
            problems.append(f"  {point.label()}: {' '.join(str(error).split())}")
            continue
        point_cfg = with_values(point_cfg, {"train.profile": True, "train.resume_from": None})
        checked.append((point, point_cfg))
        if cfg.scale.target_loss is not None and not (
            point_cfg.eval.every and any(m.endswith("/loss") for m in eval_metric_names(point_cfg))
        ):
            problems.append(f"  {point.label()}: scale.target_loss needs eval.enabled and eval.every > 0")
    if problems:
        raise ConfigError("scale.grid has points that cannot run:\n" + "\n".join(problems))
    return checked


def check_fit(points: list[tuple[Point, ExperimentConfig]], resources: dict[str, float]) -> None:
    """Points that cannot fit the cluster's resources, all listed before anything runs."""
    problems = []
    for point, point_cfg in points:
        try:
            check_resources(point_cfg, resources)
        except ConfigError as error:
            problems.append(f"  {point.label()}: {error}")
    if problems:
        raise ConfigError("scale.grid has points that do not fit the cluster:\n" + "\n".join(problems))


@dataclass
class ScaleReport:
    state: StudyState
    points: list[PointResult]
    fits: list[Fit]
    plots: list[Path]


def run_scale(
    cfg: ExperimentConfig, *, resume: bool = False, on_start: Callable[[StudyState, str], None] | None = None
) -> ScaleReport:
    """Check the grid, run every point (or the rest of an interrupted study), measure, fit and plot."""
    from ray import tune

    points: list[tuple[Point, ExperimentConfig]] = []

    def check(cfg: ExperimentConfig) -> list[ExperimentConfig]:
        points.extend(check_grid(cfg))
        local = local_resources(cfg)
        if local is not None:
            check_fit(points, local)
        check_memory((point.label(), point_cfg) for point, point_cfg in points)
        return []  # resources are checked per point, so that every offending point is listed

    cfg, state, root = open_study(cfg, kind="scale", resume=resume, check=check, on_start=on_start)
    check_fit(points, start_cluster(cfg, []))
    keys = sorted({k for point, _ in points for k in point.values})
    tuner = make_tuner(
        "grid",
        {"grid": cfg.model_copy(update={"train": cfg.train.model_copy(update={"profile": True})})},
        state,
        root,
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=1),
        param_space={"point": tune.grid_search([point_cfg_values(p, c) for p, c in points])},
        keys=keys,
        metric=TOKENS_PER_S,
        mode="max",
    )
    results = fit_tuner(tuner, state, len(points))
    histories = {
        _point_key(result.config["point"]): (result.metrics.get("trial_id"), _rows(result)) for result in results
    }
    measured = []
    for point, point_cfg in points:
        trial_id, rows = histories.get(_point_key(point_cfg_values(point, point_cfg)), (None, []))
        measured.append(summarize(point.grid, trial_id, rows, target_loss=cfg.scale.target_loss))
    fits = fit_exponents(measured, list(cfg.scale.grid))
    client = tracking.client(state.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if "://" in root else Path(root) / state.study / "plots"
        plots = plot_scaling(measured, out)
        for path in plots:
            client.log_artifact(state.parent_run_id, str(path), "plots")
    client.log_dict(state.parent_run_id, [p.as_dict() for p in measured], "points.json")
    client.log_dict(state.parent_run_id, [f.as_dict() for f in fits], "fits.json")
    tracking.log_metrics(client, state.parent_run_id, {f.metric_name(): f.exponent for f in fits}, step=0)
    finish_study(root, state)
    return ScaleReport(state, measured, fits, plots)


def point_cfg_values(point: Point, point_cfg: ExperimentConfig) -> dict[str, Any]:
    """The dotted values a trial applies: the grid's config keys, plus the derived per-worker batch."""
    values = dict(point.values)
    if GLOBAL_BATCH in point.grid:
        values["data.batch_size"] = point_cfg.data.batch_size
    return values


def _point_key(values: dict[str, Any]) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in values.items()))


def _rows(result: Any) -> list[dict[str, Any]]:
    frame = result.metrics_dataframe
    return [] if frame is None else frame.to_dict("records")
