"""Measures of a scaling point from its reported metrics, power-law fits across points, and plots.

Fits are least squares on log-log data (scipy ``linregress``): cost (step time, optimizer time)
∝ parameters^α across model sizes with every other grid value fixed, and optimizer/Fisher state
bytes per rank ∝ workers^β across worker counts (β = -1: the state is fully sharded; 0: replicated).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fisher_scale.config import ScaleConfig
from fisher_scale.tasks import is_eval_metric
from fisher_scale.train import metrics as metric
from fisher_scale.train.profile import PHASES

SIZE, WORKERS = "model.name", "distributed.num_workers"
#: per-step quantities averaged over the reports (the first report, with warm-up, is left out)
STEP_MEANS = {
    "tokens_per_s": metric.TOKENS_PER_S,
    "step_time_s": metric.STEP_TIME,
    **{f"{phase}_s": metric.phase_time(phase) for phase in (*PHASES, "comm")},
}


@dataclass
class PointResult:
    """What one grid point measured (None where the run did not report it)."""

    grid: dict[str, Any]
    trial_id: str | None
    parameters: int | None = None
    tokens_per_s: float | None = None
    step_time_s: float | None = None
    forward_s: float | None = None
    backward_s: float | None = None
    optimizer_s: float | None = None
    comm_s: float | None = None
    peak_bytes: int | None = None
    state_bytes: int | None = None
    steps_to_target: int | None = None
    time_to_target_s: float | None = None
    final: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def sessions(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The reports of one run as if it had never been interrupted, and those measured in steady state.

    A resumed run reports again from its last checkpoint: a step that goes back starts a new session, whose
    reports replace the earlier ones from that step on; each session's first report carries warm-up."""
    kept: list[tuple[dict[str, Any], bool]] = []  # (report, first of its session)
    for row in rows:
        step, last = row.get("step"), kept[-1][0].get("step") if kept else None
        restart = step is not None and last is not None and step <= last
        if restart:
            kept = [(r, first) for r, first in kept if r.get("step") is None or r["step"] < step]
        kept.append((row, restart or len(kept) == 0))
    training = [(r, first) for r, first in kept if _number(r.get(metric.STEP_TIME)) is not None]
    steady = [r for r, first in training if not first]
    return [r for r, _ in kept], steady or [r for r, _ in training]


def summarize(grid: dict[str, Any], trial_id: str | None, rows: list[dict[str, Any]], *, target_loss: float | None):
    """A point's measures from its reports in order (Tune's ``metrics_dataframe`` rows, every session)."""
    result = PointResult(grid, trial_id)
    rows, steady = sessions(rows)
    training = [r for r in rows if _number(r.get(metric.STEP_TIME)) is not None]
    if not training:
        return result
    for name, key in STEP_MEANS.items():
        values = [v for r in steady if (v := _number(r.get(key))) is not None]
        setattr(result, name, statistics.fmean(values) if values else None)
    parameters = training[-1].get(metric.PARAMETERS)
    result.parameters = int(parameters) if parameters is not None else None
    peaks = [v for r in training if (v := _number(r.get(metric.PEAK_MEMORY))) is not None]
    result.peak_bytes = int(max(peaks)) if peaks else None
    state = _number(training[-1].get(metric.STATE_BYTES))
    result.state_bytes = int(state) if state is not None else None
    evaluated = [r for r in rows if any(_number(r.get(k)) is not None for k in r if is_eval_metric(k))]
    if evaluated:
        last = evaluated[-1]
        result.final = {k: float(v) for k, v in last.items() if is_eval_metric(k) and _number(v) is not None}
    if target_loss is not None:
        for row in evaluated:
            loss = next((_number(row[k]) for k in row if is_eval_metric(k) and k.endswith("/loss")), None)
            if loss is not None and loss <= target_loss:
                result.steps_to_target = int(row[metric.STEP])
                result.time_to_target_s = _number(row.get(metric.TRAIN_TIME))
                break
    return result


@dataclass
class Fit:
    """``quantity ∝ x^exponent`` over ``n`` points sharing the ``fixed`` grid values."""

    quantity: str
    against: str
    fixed: dict[str, Any]
    exponent: float
    r2: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metric_name(self) -> str:
        """An MLflow metric name (letters, digits, ``_-./`` only)."""
        fixed = "_".join(f"{k}-{v}" for k, v in self.fixed.items())
        name = f"fit/{self.quantity}_vs_{self.against}/{fixed or 'all'}"
        return "".join(c if c.isalnum() or c in "_-./" else "-" for c in name)


def power_law(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Exponent and R² of ``y = c·x^a`` by least squares on logs."""
    from scipy.stats import linregress

    fit = linregress([math.log(x) for x in xs], [math.log(y) for y in ys])
    return float(fit.slope), float(fit.rvalue**2)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last part, unless two keys share it (model.name, optimizer.name)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (part if last.count(part) == 1 else k) for k, part in zip(keys, last, strict=True)}


def describe(values: dict[str, Any] | tuple, varying: list[str]) -> str:
    """``key=value`` for the grid keys that vary across the study (constant ones say nothing)."""
    items = dict(values)
    names = short_names(varying)
    return ", ".join(f"{names[k]}={items[k]}" for k in varying if k in items) or "all"


def _groups(points: list[PointResult], vary: str, keys: list[str]) -> dict[tuple, list[PointResult]]:
    groups: dict[tuple, list[PointResult]] = {}
    for point in points:
        fixed = tuple((k, point.grid[k]) for k in keys if k != vary and k in point.grid)
        groups.setdefault(fixed, []).append(point)
    return groups


def fit_exponents(points: list[PointResult], keys: list[str]) -> list[Fit]:
    """α of step and optimizer time against parameters (across sizes), β of state bytes per rank against
    workers (across worker counts), for every combination of the other grid values with ≥ 2 points."""
    fits = []
    plans = [
        (SIZE, "parameters", "step_time_s"),
        (SIZE, "parameters", "optimizer_s"),
        (WORKERS, "workers", "state_bytes"),
    ]
    for vary, against, quantity in plans:
        if vary not in keys:
            continue
        for fixed, members in _groups(points, vary, keys).items():
            pairs = [
                (x, y)
                for p in members
                if (x := (p.parameters if against == "parameters" else p.grid[vary])) and (y := getattr(p, quantity))
            ]
            if len({x for x, _ in pairs}) < 2:
                continue
            exponent, r2 = power_law([float(x) for x, _ in pairs], [float(y) for _, y in pairs])
            fits.append(Fit(quantity, against, dict(fixed), exponent, r2, len(pairs)))
    return fits


def plot_scaling(points: list[PointResult], out: Path) -> list[Path]:
    """Throughput and memory against size and workers, time to target against size, and the step-time
    split per point; PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for p in points for k in p.grid})
    varying = [k for k in keys if len({str(p.grid.get(k)) for p in points}) > 1]
    paths = []

    def series_plot(name: str, vary: str, x_of: Any, ys: list[tuple[str, str]], xlabel: str) -> None:
        if vary not in keys:
            return
        fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.2), squeeze=False)
        for ax, (quantity, ylabel) in zip(axes[0], ys, strict=True):
            for fixed, members in sorted(_groups(points, vary, keys).items(), key=str):
                data = sorted((x_of(p), getattr(p, quantity)) for p in members if x_of(p) and getattr(p, quantity))
                if data:
                    label = describe(fixed, varying)
                    ax.plot([d[0] for d in data], [d[1] for d in data], "o-", label=label)
            ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log", yscale="log")
            if vary == WORKERS:
                ticks = sorted({p.grid[WORKERS] for p in points})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
            ax.legend(fontsize="x-small")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    memory = [
        ("peak_bytes", "peak memory per rank, bytes"),
        ("state_bytes", "optimizer + Fisher state per rank, bytes"),
    ]
    series_plot("throughput_vs_size.png", SIZE, lambda p: p.parameters, [("tokens_per_s", "tokens/s")], "parameters")
    series_plot("memory_vs_size.png", SIZE, lambda p: p.parameters, memory, "parameters")
    series_plot(
        "throughput_vs_workers.png", WORKERS, lambda p: p.grid[WORKERS], [("tokens_per_s", "tokens/s")], "workers"
    )
    series_plot("memory_vs_workers.png", WORKERS, lambda p: p.grid[WORKERS], memory, "workers")
    if any(p.time_to_target_s for p in points):
        series_plot(
            "time_to_target_vs_size.png",
            SIZE,
            lambda p: p.parameters,
            [("time_to_target_s", "training s to target eval loss")],
            "parameters",
        )

    measured = [p for p in points if p.step_time_s]
    if measured:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(measured)), 4.5))
        bottom = [0.0] * len(measured)
        for part in ("forward_s", "backward_s", "optimizer_s", "comm_s"):
            heights = [1000 * (getattr(p, part) or 0.0) for p in measured]
            ax.bar(range(len(measured)), heights, bottom=bottom, label=part.removesuffix("_s"))
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        labels = [" ".join(str(p.grid[k]) for k in varying) for p in measured]
        ax.set_xticks(range(len(measured)), labels, fontsize="x-small", rotation=60, ha="right")
        ax.set_xlabel(" ".join(short_names(varying).values()))
        ax.set(ylabel="ms per step", title="step time split")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / "step_time_split.png", dpi=110)
        plt.close(fig)
        paths.append(out / "step_time_split.png")
    return paths


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def points_table(study: str, points: list[PointResult], scale: ScaleConfig) -> Any:
    """The terminal table of a scaling study's points."""
    from rich.table import Table

    table = Table(title=f"{study}: per point (means over steady-state reports)")
    columns = [*scale.grid, "params", "tokens/s", "step ms", "fwd/bwd/opt/comm ms", "peak MiB", "state KiB"]
    if scale.target_loss is not None:
        columns += ["steps→target", "train s→target"]
    names = short_names(list(scale.grid))
    for column in (*columns, "final eval"):
        table.add_column(names.get(column, column), justify="right")
    for point in points:
        split = "/".join(
            _fmt(1000 * v if v is not None else None, ".0f")
            for v in (point.forward_s, point.backward_s, point.optimizer_s, point.comm_s)
        )
        row = [str(point.grid[k]) for k in scale.grid]
        row += [
            _fmt(point.parameters, ",d"),
            _fmt(point.tokens_per_s, ".0f"),
            _fmt(1000 * point.step_time_s if point.step_time_s else None, ".1f"),
            split,
            _fmt(point.peak_bytes / 2**20 if point.peak_bytes else None, ".0f"),
            _fmt(point.state_bytes / 1024 if point.state_bytes else None, ".1f"),
        ]
        if scale.target_loss is not None:
            row += [_fmt(point.steps_to_target, "d"), _fmt(point.time_to_target_s, ".2f")]
        row.append(", ".join(f"{k}={v:.4g}" for k, v in point.final.items()))
        table.add_row(*row)
    return table


def fits_table(fits: list[Fit], scale: ScaleConfig) -> Any:
    """The terminal table of the fitted exponents."""
    from rich.table import Table

    table = Table(title="fitted exponents (log-log least squares)")
    for column in ("quantity", "against", "fixed", "exponent", "R²", "points"):
        table.add_column(column)
    varying = [k for k in scale.grid if len(scale.grid[k]) > 1]
    for fit in fits:
        table.add_row(
            fit.quantity, fit.against, describe(fit.fixed, varying), f"{fit.exponent:.3f}", f"{fit.r2:.3f}", str(fit.n)
        )
    return table
