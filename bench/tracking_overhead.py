"""What tracking costs the driver: the MLflow callback's time per result, and a study's end-to-end overhead.

Part 1 drives ``study.callbacks.MlflowTrials`` directly with synthetic trials (no training, no Tune): every trial
reports a full training report (the metric catalogue of a masked AdaFisher run) ``--reports`` times, trials
interleaved as Tune delivers them, into a SQLite store. It times each callback call as Tune's event loop waits for
it, for the background writer (what studies use) and for the same writes made synchronously (a flush after every
call), and the time until every write is in MLflow. Part 2 runs a Ray Tune experiment of a synthetic function
trainable (it only reports, back to back or every ``--report-every-s`` seconds) with and without the callback and
compares the wall times. Goals (issue 16): ≤ 20 ms per result at the driver, ≤ 5 % end-to-end overhead.

    python bench/tracking_overhead.py [--trials 64] [--reports 200] [--tune-trials 16] [--report-every-s 0]
        [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.table import Table

from fisher_scale import tracking
from fisher_scale.config import build_config
from fisher_scale.study.callbacks import WRITE_EVERY_S, MlflowTrials
from fisher_scale.train import metrics as metric
from fisher_scale.train.quiet import quiet_driver

GOALS = {"per_result_ms": 20.0, "overhead": 0.05}


def report(step: int) -> dict[str, Any]:
    """A training report as a masked AdaFisher run on GSM8K makes it (every name of the catalogue)."""
    cfg = build_config({"optimizer": {"name": "adafisher"}, "mask": {"enabled": True}, "train": {"profile": True}})
    values = {name: 1.0 / (1 + step) for name in metric.reported_metrics(cfg)}
    return {**values, metric.STEP: step, "trial_id": "t", "training_iteration": step, "done": False}


def callback_times(folder: Path, trials: int, reports: int, synchronous: bool) -> dict[str, float]:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = tracking.client(uri)
    experiment = tracking.experiment_id(client, "bench", uri)
    parent = client.create_run(experiment).info.run_id
    bases = {"adamw": build_config({}).model_dump(mode="json")}
    every_s = 0.0 if synchronous else WRITE_EVERY_S  # a synchronous write waits for no batch
    callback = MlflowTrials(uri, experiment, parent, "bench", bases, write_every_s=every_s)
    pending = [SimpleNamespace(trial_id=f"t{n:03d}", config={}, last_result={}, error_file=None) for n in range(trials)]
    waits, started = [], time.perf_counter()
    for trial in pending:
        callback.on_trial_start(0, [], trial)
    for step in range(1, reports + 1):
        result = report(step)
        for trial in pending:
            began = time.perf_counter()
            callback.on_trial_result(0, [], trial, result)
            if synchronous:
                callback.flush()
            waits.append(time.perf_counter() - began)
    for trial in pending:
        callback.on_trial_complete(0, [], trial)
    callback.flush()
    return {
        "per_result_ms": 1000 * statistics.fmean(waits),
        "p99_ms": 1000 * sorted(waits)[int(0.99 * len(waits))],
        "all_written_s": time.perf_counter() - started,
    }


def tune_wall_time(folder: Path, trials: int, reports: int, every_s: float, tracked: bool) -> float:
    from ray import tune

    def synthetic(config: dict[str, Any]) -> None:
        for step in range(1, reports + 1):
            time.sleep(every_s)
            tune.report({k: v for k, v in report(step).items() if k not in ("trial_id", "training_iteration", "done")})

    callbacks = []
    if tracked:
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = tracking.client(uri)
        experiment = tracking.experiment_id(client, "bench-tune", uri)
        parent = client.create_run(experiment).info.run_id
        bases = {"adamw": build_config({}).model_dump(mode="json")}
        callbacks = [MlflowTrials(uri, experiment, parent, f"bench-{folder.name}", bases)]
    started = time.perf_counter()
    tune.Tuner(
        tune.with_resources(synthetic, {"cpu": 1.0 / trials}),
        param_space={"seed": tune.grid_search(list(range(trials)))},  # a config key: the callback resolves it
        tune_config=tune.TuneConfig(max_concurrent_trials=trials),
        run_config=tune.RunConfig(storage_path=str(folder / "ray"), callbacks=callbacks, verbose=0),
    ).fit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=64, help="concurrent synthetic trials of part 1")
    parser.add_argument("--reports", type=int, default=200, help="reports per trial")
    parser.add_argument("--tune-trials", type=int, default=16, help="concurrent trials of part 2 (0: skip it)")
    parser.add_argument("--report-every-s", type=float, default=0.0, help="part 2: seconds between a trial's reports")
    parser.add_argument("--repeats", type=int, default=2, help="part 2: runs with and without tracking, alternated")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet_driver()
    console = Console()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("background", "synchronous"):
            console.print(f"part 1, {mode} writes: {args.trials} trials × {args.reports} reports")
            (Path(tmp) / mode).mkdir()
            rows[mode] = callback_times(Path(tmp) / mode, args.trials, args.reports, mode == "synchronous")
        if args.tune_trials:
            import ray

            ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
            for tracked in (False, True) * args.repeats:  # alternated: drift on the machine is shared out
                name = "tracked" if tracked else "untracked"
                console.print(f"part 2, Tune, {name}: {args.tune_trials} trials × {args.reports} reports")
                folder = Path(tmp) / f"{name}-{len(rows.get('tune', {}).get(name, []))}"
                folder.mkdir()
                rows.setdefault("tune", {}).setdefault(name, []).append(
                    tune_wall_time(folder, args.tune_trials, args.reports, args.report_every_s, tracked)
                )
    table = Table(title=f"MLflow callback on the driver ({platform.processor() or platform.machine()})")
    for column in ("writes", "mean ms per result", "p99 ms", "all written (s)", f"goal ≤ {GOALS['per_result_ms']} ms"):
        table.add_column(column, justify="left" if column == "writes" else "right")
    for mode in ("background", "synchronous"):
        row = rows[mode]
        met = "met" if row["per_result_ms"] <= GOALS["per_result_ms"] else "missed"
        table.add_row(mode, f"{row['per_result_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['all_written_s']:.1f}", met)
    console.print(table)
    if "tune" in rows:
        untracked, tracked = (statistics.median(rows["tune"][k]) for k in ("untracked", "tracked"))
        rows["tune_overhead"] = tracked / untracked - 1
        met = "met" if rows["tune_overhead"] <= GOALS["overhead"] else "missed"
        console.print(
            f"Tune experiment, {args.tune_trials} trials × {args.reports} reports (every {args.report_every_s} s): "
            f"{untracked:.1f} s untracked, "
            f"{tracked:.1f} s tracked (medians of {args.repeats}): overhead {100 * rows['tune_overhead']:+.1f} % "
            f"(goal ≤ {100 * GOALS['overhead']:.0f} %: {met})"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **rows}, indent=2))


if __name__ == "__main__":
    main()
