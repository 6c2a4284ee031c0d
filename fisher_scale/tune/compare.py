"""``fisher-scale compare``: the arms of a study (optimizers, or optimizers × ``tune.arms``) side by side
from MLflow — a table and plots.

Fair comparison after AlgoPerf: the same trial budget per arm (``equal_budget`` keeps each
study's first N trials per arm, N = the smallest count), medians over repeated studies (seeds),
and time to a target measured in training time only (``time/train_s`` excludes evaluation).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fisher_scale import tracking
from fisher_scale.errors import InputError
from fisher_scale.train.metrics import LOSS, TRAIN_TIME


@dataclass
class TrialRecord:
    """One trial's run: its study (``<study>/seed<n>`` for a replicate of ``tune.seeds``: each is one repeated
    study for the statistics), arm (the Optuna study's label: an optimizer, or ``<optimizer>-<arm>``),
    searched values, metric histories (step → value) and Ray trial id."""

    run_id: str
    study: str
    arm: str
    start_time: int
    params: dict[str, str]
    history: dict[str, dict[int, float]] = field(default_factory=dict)
    trial_id: str = ""
    #: the step its scheduler (ASHA) stopped it at; None for a trial that ran to the end
    stopped_at: int | None = None

    def final(self, key: str) -> float | None:
        values = self.history.get(key, {})
        return values[max(values)] if values else None

    def finite_final(self, key: str) -> float | None:
        """The last value when it is a finite number (a diverged trial's NaN compares with nothing)."""
        value = self.final(key)
        return value if value is not None and math.isfinite(value) else None

    def first_reaching(self, key: str, target: float, mode: str) -> int | None:
        """The first step whose value reaches the target (≤ for min, ≥ for max)."""
        for step in sorted(self.history.get(key, {})):
            value = self.history[key][step]
            if (value <= target) if mode == "min" else (value >= target):
                return step
        return None


def load_trials(client: Any, experiment_id: str, metric: str, study: str | None = None) -> list[TrialRecord]:
    """Every trial run of the experiment (or of one study) with the histories the comparison needs."""
    query = f"tags.`{tracking.KIND_TAG}` = '{tracking.RUN_KINDS['tune'].child}'"
    if study:
        query += f" and tags.`{tracking.STUDY_TAG}` = '{study}'"
    records = []
    for run in tracking.all_runs(client, experiment_id, query):
        replicate = run.data.tags.get(tracking.REPLICATE_TAG)
        record = TrialRecord(
            run.info.run_id,
            run.data.tags.get(tracking.STUDY_TAG, "") + (f"/{replicate}" if replicate else ""),
            run.data.tags.get("study_label") or run.data.tags.get("optimizer", "?"),
            run.info.start_time,
            dict(run.data.params),
            trial_id=run.data.tags.get(tracking.TRIAL_TAG, ""),
            stopped_at=int(stopped) if (stopped := run.data.tags.get(tracking.STOPPED_AT_TAG)) else None,
        )
        for key in {metric, LOSS, TRAIN_TIME}:
            record.history[key] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        records.append(record)
    return records


def equal_budget(records: list[TrialRecord]) -> list[TrialRecord]:
    """Per study, the first N trials of each arm, N = the smallest number any arm has."""
    kept = []
    for study in {r.study for r in records}:
        by_arm: dict[str, list[TrialRecord]] = {}
        for record in sorted((r for r in records if r.study == study), key=lambda r: r.start_time):
            by_arm.setdefault(record.arm, []).append(record)
        budget = min(len(v) for v in by_arm.values())
        kept += [r for rows in by_arm.values() for r in rows[:budget]]
    return kept


def _better(mode: str) -> Any:
    return min if mode == "min" else max


def best_trials(records: list[TrialRecord], metric: str, mode: str) -> dict[str, TrialRecord]:
    """Each arm's trial with the best finite final metric (arms with none are left out)."""
    by_arm: dict[str, list[TrialRecord]] = {}
    for record in records:
        if record.finite_final(metric) is not None:
            by_arm.setdefault(record.arm, []).append(record)
    return {arm: _better(mode)(mine, key=lambda r: r.finite_final(metric)) for arm, mine in by_arm.items()}


#: the two-sided confidence of the comparison's intervals, and the bootstrap resamples that estimate them
CONFIDENCE, RESAMPLES = 0.95, 10_000


def bootstrap_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The percentile-bootstrap interval of the mean of ``values`` (scipy's, seeded, so a table is
    reproducible); None for fewer than two values, whose spread says nothing."""
    if len(values) < 2:
        return None
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap(
        (np.asarray(values, dtype=float),),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _interval_text(interval: tuple[float, float] | None) -> str | None:
    return None if interval is None else f"{interval[0]:.4g} to {interval[1]:.4g}"


def paired_verdict(differences: Sequence[float], mode: str) -> tuple[str, tuple[float, float] | None]:
    """Whether an arm beats the reference over the studies both ran (this minus the reference, per
    study): ``better``/``worse`` when the bootstrap interval of the mean difference excludes 0, else ``not
    distinguishable``; ``too few studies`` below two."""
    interval = bootstrap_interval(differences)
    if interval is None:
        return "too few studies", None
    low, high = interval
    if low <= 0 <= high:
        return "not distinguishable", interval
    return ("better" if (low > 0) == (mode == "max") else "worse"), interval


def comparison_table(
    records: list[TrialRecord],
    metric: str,
    mode: str,
    target: float | None = None,
    reference: str | None = None,
    searched: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Per arm, ranked by the median of the study bests (rank 1: the winner): trials, best final metric, the
    best trial and its ``searched`` values, median over studies (seeds) of each study's best, its mean with a
    95 % bootstrap interval, the paired difference to the ``reference`` arm's study bests (default: adamw, else
    the first by name) with its interval and verdict (:func:`paired_verdict`), and the median over studies of
    the fewest steps / least training time to reach ``target``."""
    rows = []
    bests: dict[str, dict[str, float]] = {}
    best_of = best_trials(records, metric, mode)
    for arm in sorted({r.arm for r in records}):
        mine = [r for r in records if r.arm == arm]
        best = best_of.get(arm)
        per_study = []
        bests[arm] = {}
        steps_to_target, time_to_target = [], []
        for study in sorted({r.study for r in mine}):
            trials = [r for r in mine if r.study == study]
            values = [v for r in trials if (v := r.finite_final(metric)) is not None]
            if values:
                per_study.append(_better(mode)(values))
                bests[arm][study] = per_study[-1]
            if target is None:
                continue
            reached = [(step, r) for r in trials if (step := r.first_reaching(metric, target, mode)) is not None]
            if reached:
                steps_to_target.append(min(step for step, _ in reached))
                times = [r.history.get(TRAIN_TIME, {}).get(step) for step, r in reached]
                if any(t is not None for t in times):
                    time_to_target.append(min(t for t in times if t is not None))
        row: dict[str, Any] = {
            "arm": arm,
            "trials": len(mine),
            "studies": len({r.study for r in mine}),
            f"best {metric}": None if best is None else best.final(metric),
            "best trial": None if best is None else best.trial_id or best.run_id,
            "best values": None if best is None else _values_text(best.params, searched),
            f"median best {metric}": statistics.median(per_study) if per_study else None,
            f"mean best {metric}": statistics.fmean(per_study) if per_study else None,
            "95% interval": _interval_text(bootstrap_interval(per_study)),
        }
        if target is not None:
            row["median steps to target"] = statistics.median(steps_to_target) if steps_to_target else None
            row["median train s to target"] = statistics.median(time_to_target) if time_to_target else None
            row["studies reaching target"] = len(steps_to_target)
        rows.append(row)
    if reference not in bests:
        reference = "adamw" if "adamw" in bests else min(bests, default=None)
    for row in rows:
        mine, theirs = bests[row["arm"]], bests[reference]
        shared = sorted(set(mine) & set(theirs))
        differences = [mine[study] - theirs[study] for study in shared]
        verdict, interval = paired_verdict(differences, mode) if row["arm"] != reference else ("reference", None)
        row[f"vs {reference}"] = statistics.fmean(differences) if differences and interval is not None else None
        row[f"vs {reference} 95%"] = _interval_text(interval)
        row["verdict"] = verdict
    return _ranked(rows, f"median best {metric}", mode)


def _values_text(params: dict[str, str], keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={params[key]}" for key in keys if key in params) or "-"


def _ranked(rows: list[dict[str, Any]], key: str, mode: str) -> list[dict[str, Any]]:
    """Rows best first by ``key`` (arms without a value last, unranked), each with its ``rank`` first."""
    valued = sorted((r for r in rows if r[key] is not None), key=lambda r: r[key], reverse=mode == "max")
    ranked = [{"rank": rank, **row} for rank, row in enumerate(valued, 1)]
    return ranked + [{"rank": None, **row} for row in rows if row[key] is None]


#: searched keys drawn on a log axis whatever their range (their spaces are log-uniform: a linear axis squeezes the
#: points to the left)
LOG_AXIS_KEYS = ("lr", "optimizer.damping", "optimizer.eps", "optimizer.weight_decay")
#: a numeric key with at most this many distinct values (a choice such as peft.rank {4, 8}) gets a categorical axis
MAX_CATEGORIES = 6


def hyperparameter_axis(key: str, texts: list[str]) -> tuple[str, list[str]]:
    """How to draw a searched key's values: ``log``, ``linear`` or ``categorical`` (with the categories in order)."""
    numeric = all(_is_number(t) for t in texts)
    distinct = sorted(set(texts), key=lambda t: (float(t), t) if numeric else (0.0, t))
    if not numeric or (len(distinct) <= MAX_CATEGORIES and all(float(t).is_integer() for t in distinct)):
        return "categorical", distinct
    values = [float(t) for t in texts]
    wide = min(values) > 0 and (key in LOG_AXIS_KEYS or max(values) / min(values) > 50)
    return ("log" if wide else "linear"), []


def plot_comparison(records: list[TrialRecord], metric: str, mode: str, searched: list[str], out: Path) -> list[Path]:
    """Training curves and evaluation curves per arm, the metric against each searched hyperparameter (log axes
    for lr-like keys, categorical ones for choices; only runs that used the key; trials ASHA stopped hollow, each
    arm's best a star), and the metric against training wall time; PNG files in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    colors = {name: f"C{i}" for i, name in enumerate(sorted({r.arm for r in records}))}
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in records:
        curve = record.history.get(LOSS, {})
        if curve:
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], color=colors[record.arm], alpha=0.6)
    _legend(ax, colors, plt)
    ax.set(xlabel="step", ylabel="training loss", title="training curves")
    save(fig, "training_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in records:
        curve = record.history.get(metric, {})
        if curve:
            steps = sorted(curve)
            ax.plot(steps, [curve[s] for s in steps], "o-", color=colors[record.arm], alpha=0.6, markersize=3)
    _legend(ax, colors, plt)
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} during training")
    save(fig, f"{metric.replace('/', '_')}_curves.png")

    best = best_trials(records, metric, mode)
    for key in searched:
        used = [(r, value) for r in records if key in r.params and (value := r.final(metric)) is not None]
        if not used:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        scale, categories = hyperparameter_axis(key, [r.params[key] for r, _ in used])
        for record, value in used:
            text = record.params[key]
            x = categories.index(text) if categories else float(text)
            style = {"marker": "*", "s": 160} if best.get(record.arm) is record else {"marker": "o", "s": 36}
            face = "none" if record.stopped_at is not None else colors[record.arm]
            ax.scatter(x, value, facecolors=face, edgecolors=colors[record.arm], **style)
        if categories:
            ax.set_xticks(range(len(categories)), categories)
        elif scale == "log":
            ax.set_xscale("log")
        _legend(ax, colors, plt)
        ax.set(xlabel=key, ylabel=metric, title=f"{metric} against {key} (hollow: stopped early, star: best)")
        save(fig, f"{metric.replace('/', '_')}_vs_{key.replace('.', '_')}.png")

    if searched and best:
        save(_parallel_coordinates(records, metric, searched, colors, plt), "parallel_coordinates.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in records:
        values, times = record.history.get(metric, {}), record.history.get(TRAIN_TIME, {})
        steps = sorted(s for s in values if s in times)
        if steps:
            ax.plot([times[s] for s in steps], [values[s] for s in steps], "o-", color=colors[record.arm])
    _legend(ax, colors, plt)
    ax.set(xlabel="training wall time, s (evaluation excluded)", ylabel=metric, title=f"{metric} against time")
    save(fig, f"{metric.replace('/', '_')}_vs_time.png")
    return paths


def _parallel_coordinates(
    records: list[TrialRecord], metric: str, searched: list[str], colors: dict[str, str], plt: Any
) -> Any:
    """One line per trial across the searched keys and the metric, each axis scaled to its own range (log10 for
    log-axis keys, the category's index for choices); a key the trial did not use leaves a gap in its line."""
    used = [r for r in records if r.finite_final(metric) is not None]
    columns: list[list[float]] = []
    for key in searched:
        texts = [r.params[key] for r in used if key in r.params]
        scale, categories = hyperparameter_axis(key, texts) if texts else ("linear", [])
        columns.append([_coordinate(r.params.get(key), scale, categories) for r in used])
    columns.append([r.final(metric) for r in used])
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 2, 4.5))
    scaled = []
    for column in columns:
        finite = [v for v in column if math.isfinite(v)]
        low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
        scaled.append([(v - low) / (high - low) if high > low else 0.5 for v in column])
    for index, record in enumerate(used):
        ax.plot(range(len(columns)), [column[index] for column in scaled], color=colors[record.arm], alpha=0.7)
    ax.set_xticks(range(len(columns)), [*searched, metric], rotation=20)
    ax.set(yticks=[], title="trials across the searched keys (each axis its own range; gaps: key not used)")
    _legend(ax, colors, plt)
    return fig


def _coordinate(text: str | None, scale: str, categories: list[str]) -> float:
    """A value's place on a parallel-coordinates axis: its category's index, log10 on a log axis; NaN if unused."""
    if text is None:
        return math.nan
    if categories:
        return categories.index(text)
    return math.log10(float(text)) if scale == "log" else float(text)


def _legend(ax: Any, colors: dict[str, str], plt: Any) -> None:
    handles = [plt.Line2D([], [], color=color, label=name) for name, color in colors.items()]
    ax.legend(handles=handles, fontsize="small")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def study_report(client: Any, state: Any, cfg: Any, *, plots_dir: Path) -> list[dict[str, Any]]:
    """At the end of a study: its comparison table and plots, logged to the study's parent run."""
    records = load_trials(client, state.experiment_id, cfg.tune.metric, study=state.study)
    reference = client.get_run(state.parent_run_id).data.tags.get(tracking.REFERENCE_TAG)
    searched = sorted(
        filter(None, client.get_run(state.parent_run_id).data.tags.get(tracking.SEARCHED_TAG, "").split(","))
    )
    rows = comparison_table(records, cfg.tune.metric, cfg.tune.mode, reference=reference, searched=searched)
    for path in plot_comparison(records, cfg.tune.metric, cfg.tune.mode, searched, plots_dir):
        client.log_artifact(state.parent_run_id, str(path), "plots")
    client.log_dict(state.parent_run_id, rows, "comparison.json")
    return rows


#: the study parameters a report states as its setup
SETUP_KEYS = (
    "model.name", "model.task", "data.dataset", "peft.rank", "peft.target_modules", "data.batch_size",
    "data.gradient_accumulation_steps", "data.max_length", "train.steps", "tune.num_samples", "tune.sampler",
    "tune.scheduler", "tune.metric",
)  # fmt: skip


@dataclass
class Comparison:
    """What ``compare`` found: the table's rows, the setup of the newest study, the seeds of all studies, and the
    ``compare`` run that holds the plots."""

    metric: str
    mode: str
    trials: int
    rows: list[dict[str, Any]]
    run_id: str
    tracking_uri: str = ""
    setup: dict[str, str] = field(default_factory=dict)
    seeds: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def experiment_tracking_uri(experiment: str, tracking_uri: str | None, storage: str | None) -> str:
    """Where an experiment's runs are: ``tracking_uri`` when given, else the one its newest study recorded
    (``study.json`` under ``storage``, else under :data:`STUDY_ROOTS`), else ``$MLFLOW_TRACKING_URI`` or
    ``./mlflow.db``. A SQLite database that does not exist is an error, not created: these commands read."""
    from fisher_scale.config import ExperimentConfig, TrackingConfig
    from fisher_scale.study.experiment import STUDY_ROOTS, newest_study

    roots = (storage,) if storage else STUDY_ROOTS
    study = None if tracking_uri else newest_study(experiment, roots)
    if study is not None:
        uri, source = study.tracking_uri, f"recorded by study {study.study}"
    else:
        uri = tracking.tracking_uri(ExperimentConfig(tracking=TrackingConfig(uri=tracking_uri)), create=False)
        fallback = "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default"
        source = (
            "--tracking-uri"
            if tracking_uri
            else f"no study {experiment}-<timestamp> under {', '.join(roots)}: {fallback}"
        )
    database = Path(uri.removeprefix("sqlite:///"))
    if uri.startswith("sqlite:///") and not database.is_file():
        raise InputError(
            f"no MLflow database at {database} ({source}); name the study folders with --storage or the store "
            "with --tracking-uri"
        )
    return uri


def compare_experiment(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
    target: float | None = None,
    equal: bool = True,
    out: Path = Path("outputs/compare"),
) -> Comparison:
    """The comparison over every study of an MLflow experiment (found by :func:`experiment_tracking_uri`), logged
    as the experiment's one ``compare`` run: an earlier one is deleted."""
    uri = experiment_tracking_uri(experiment, tracking_uri, storage)
    tracking.check_reachable(uri)
    client = tracking.client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise InputError(
            f"no MLflow experiment {experiment!r} at {tracking.redacted(uri)}; experiments there: {', '.join(names)}"
        )
    studies = tracking.all_runs(
        client,
        found.experiment_id,
        f"tags.`{tracking.KIND_TAG}` = '{tracking.RUN_KINDS['tune'].parent}'",
        order_by=["start_time DESC"],
    )
    if not studies:
        raise InputError(f"experiment {experiment!r} has no fisher-scale study runs")
    newest = studies[0].data
    metric = metric or newest.params.get("tune.metric", LOSS)
    mode = mode or newest.params.get("tune.mode", "min")
    records = load_trials(client, found.experiment_id, metric)
    if equal:
        records = equal_budget(records)
    searched = sorted(
        {key for run in studies for key in run.data.tags.get(tracking.SEARCHED_TAG, "").split(",") if key}
    )
    reference = newest.tags.get(tracking.REFERENCE_TAG)
    rows = comparison_table(records, metric, mode, target, reference=reference, searched=searched)
    for earlier in tracking.all_runs(
        client, found.experiment_id, f"tags.`{tracking.KIND_TAG}` = '{tracking.COMPARE_KIND}'"
    ):
        client.delete_run(earlier.info.run_id)
    run = client.create_run(
        found.experiment_id, run_name=tracking.COMPARE_KIND, tags={tracking.KIND_TAG: tracking.COMPARE_KIND}
    )
    tracking.log_params(
        client, run.info.run_id, {"metric": metric, "mode": mode, "target": target, "equal_budget": equal}
    )
    plots = plot_comparison(records, metric, mode, searched, out)
    for path in plots:
        client.log_artifact(run.info.run_id, str(path), "plots")
    client.log_dict(run.info.run_id, rows, "comparison.json")
    client.set_terminated(run.info.run_id)
    setup = {key: newest.params[key] for key in SETUP_KEYS if key in newest.params}
    seeds = sorted({record.params.get("seed", "?") for record in records}, key=lambda seed: (len(seed), seed))
    return Comparison(metric, mode, len(records), rows, run.info.run_id, uri, setup, seeds, plots)


def cell_text(value: Any) -> str:
    """A comparison cell as text, in the terminal table and the report alike."""
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def rows_table(title: str, rows: list[dict[str, Any]], metric: str) -> Any:
    """The comparison's rows (:func:`comparison_table`) as a terminal table; the title names the metric, so the
    headers do not repeat it."""
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0] if rows else ():
        header = column.replace(f" {metric}", "")
        table.add_column(header, justify="left" if column == "arm" else "right", no_wrap=column in ("arm", "verdict"))
    for row in rows:
        table.add_row(*(cell_text(value) for value in row.values()), style="bold" if row.get("rank") == 1 else None)
    return table
