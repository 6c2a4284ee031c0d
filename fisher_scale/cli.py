"""``fisher-scale``: argument parsing and output only; the work happens in the library modules."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rich
from rich.console import Console
from rich.table import Table

from fisher_scale.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, FisherScaleError, exit_code
from fisher_scale.train.quiet import quiet_driver

#: columns of the output when it is not a terminal (the tables of a study are wider than 80)
LOG_WIDTH = 160


def _seed_list(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers, e.g. 0,1,2; got {text!r}") from None


class TrainProgress:
    """A ``train`` run as it goes: in a terminal a bar (step/total, loss, tokens/s, ETA, the latest evaluation),
    else (a log file, CI) one plain line per report."""

    def __init__(self, console: Console, title: str, steps: int) -> None:
        self.console, self.title, self.steps = console, title, steps
        self.bar: Any = None

    def __enter__(self) -> TrainProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[figures]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task(f"{self.title}: starting Ray Train", total=self.steps, figures="")
        else:
            self.console.print(f"{self.title}: starting Ray Train", highlight=False)
        return self

    def __call__(self, report: dict[str, Any]) -> None:
        from fisher_scale.tasks import is_eval_metric
        from fisher_scale.train import metrics as metric

        step = int(report[metric.STEP])
        evaluation = [f"{k} {v:.4g}" for k, v in sorted(report.items()) if is_eval_metric(k) and isinstance(v, float)]
        figures = ", ".join(
            [f"loss {report[metric.LOSS]:.4g}", f"{report[metric.TOKENS_PER_S]:,.0f} tokens/s", *evaluation]
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=self.title, figures=figures)
            return
        eta = round((self.steps - step) * report[metric.STEP_TIME])
        self.console.print(
            f"step {step}/{self.steps}: {figures}, eta {eta // 60}:{eta % 60:02d}", highlight=False, soft_wrap=True
        )

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _train(args: argparse.Namespace, console: Console) -> int:
    from fisher_scale.config import load_config
    from fisher_scale.tracking import runs_view
    from fisher_scale.train.launcher import run_training

    cfg = load_config(args.config, args.set)
    console.print(
        f"training {cfg.name}: {cfg.model.name}, {cfg.optimizer.name}, "
        f"{cfg.distributed.num_workers} worker(s), ZeRO {cfg.distributed.zero_stage}"
    )
    with TrainProgress(console, cfg.name, cfg.train.steps) as progress:
        summary = run_training(cfg, on_report=progress)
    metrics = summary["metrics"]
    table = Table(title=f"{cfg.name}: final metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        if isinstance(value, int | float):
            table.add_row(key, f"{value:.6g}")
    console.print(table)
    console.print(
        f"adapter: {summary['adapter']}\nresult:  {Path(cfg.train.output_dir) / 'result.json'}\n"
        f"MLflow:  run {summary['mlflow_run']} in experiment [bold]{cfg.name}[/bold]\n"
        f"  {runs_view(summary['tracking_uri'], summary['experiment_id'])}"
    )
    return 0


def _study(args: argparse.Namespace, console: Console, run: Callable[..., Any]) -> tuple[Any, Any]:
    """Load the config and run a study command; returns the config the study ran (a resumed study's own)
    and the result, which is None when Ctrl+C interrupted it."""
    from fisher_scale.config import ExperimentConfig, load_config
    from fisher_scale.study.experiment import StudyInterrupted

    seeds = getattr(args, "seeds", None)
    overrides = [*args.set, *((f"tune.seeds={seeds}",) if seeds else ())]
    cfg = load_config(args.config, overrides)
    if args.resume and overrides:
        console.print("[yellow]--set and --seeds are ignored with --resume: a study continues with its own config")

    def started(state: Any, root: str) -> None:
        console.print(
            f"{args.command}: [bold]{state.study}[/bold] in {root}/{state.study}; MLflow {state.tracking_uri}"
        )

    try:
        result = run(cfg, resume=args.resume, on_start=started)
    except StudyInterrupted as stopped:
        console.print(f"[yellow]{stopped}[/yellow]")
        return cfg, None
    return ExperimentConfig.model_validate(getattr(result, "state", result).config), result


def _tune(args: argparse.Namespace, console: Console) -> int:
    from fisher_scale.tune.compare import rows_table
    from fisher_scale.tune.study import best_table, run_study

    cfg, state = _study(args, console, run_study)
    if state is None:
        return EXIT_INTERRUPTED
    console.print(best_table(state, cfg.tune))
    if len(state.comparison) > 1:  # the arms side by side, with verdicts where there are replicates (seeds)
        console.print(
            rows_table(
                f"{state.study}: arms compared ({cfg.tune.metric}, {cfg.tune.mode})", state.comparison, cfg.tune.metric
            )
        )
    from fisher_scale.study.experiment import compare_command
    from fisher_scale.tracking import redacted, runs_view

    storage = redacted(cfg.tune.storage)  # made absolute when the study started
    console.print(
        f"results: MLflow experiment [bold]{cfg.name}[/bold], parent run {state.parent_run_id}\n"
        f"  {runs_view(state.tracking_uri, state.experiment_id)}\n"
        f"  optuna-dashboard {storage}   (pip install optuna-dashboard)\n"
        f"  {compare_command(cfg)}"
    )
    return 0


def _scale(args: argparse.Namespace, console: Console) -> int:
    from fisher_scale.scale.analysis import fits_table, points_table
    from fisher_scale.scale.grid import run_scale
    from fisher_scale.tracking import runs_view

    cfg, report = _study(args, console, run_scale)
    if report is None:
        return EXIT_INTERRUPTED
    console.print(points_table(report.state.study, report.points, cfg.scale))
    console.print(fits_table(report.fits, cfg.scale))
    console.print(
        f"plots: {', '.join(str(p) for p in report.plots)}\n"
        f"  {runs_view(report.state.tracking_uri, report.state.experiment_id)}"
    )
    return 0


def _comparison(args: argparse.Namespace) -> Any:
    from fisher_scale.tune.compare import compare_experiment

    return compare_experiment(
        args.experiment,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
        metric=args.metric,
        mode=args.mode,
        target=args.target,
        equal=not args.all_trials,
        out=args.out,
    )


def _print_comparison(args: argparse.Namespace, report: Any, console: Console) -> None:
    from fisher_scale.tune.compare import rows_table

    console.print(
        rows_table(
            f"{args.experiment}: {report.metric} ({report.mode}), {report.trials} trials", report.rows, report.metric
        )
    )


def _compare(args: argparse.Namespace, console: Console) -> int:
    report = _comparison(args)
    _print_comparison(args, report, console)
    console.print(f"plots: {args.out}  (also logged to MLflow run {report.run_id})")
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from fisher_scale.tune.report import write_report

    report = _comparison(args)
    _print_comparison(args, report, console)
    path = write_report(args.experiment, report, args.out)
    console.print(f"report: {path}, with its plots  (also logged to MLflow run {report.run_id})")
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    from fisher_scale.config import load_config
    from fisher_scale.train.evaluation import adapter_directory, evaluate_checkpoint

    cfg = load_config(args.config, args.set)
    checkpoint = adapter_directory(args.checkpoint)
    metrics = evaluate_checkpoint(cfg, checkpoint)
    table = Table(title=f"{cfg.data.dataset}: {checkpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.6g}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(metrics, indent=2))
    return 0


def _plan(args: argparse.Namespace, console: Console) -> int:
    from fisher_scale.config import ConfigError, load_config, with_values
    from fisher_scale.plan.check import check_memory, setting
    from fisher_scale.plan.table import points_table, terms_table
    from fisher_scale.scale.grid import grid_points, point_config

    cfg = load_config(args.config, args.set)
    table, fits = terms_table(f"{cfg.name}: memory plan per rank\n{setting(cfg)}", cfg)
    console.print(table)
    checked = [("", cfg)]
    if cfg.scale.grid:
        points = [(point, point_config(cfg, point)) for point in grid_points(cfg)]
        grid, grid_fits = points_table(f"{cfg.name}: scale.grid, per rank", [(p.grid, c) for p, c in points])
        console.print(grid)
        fits &= grid_fits
        checked = [(p.label(), c) for p, c in points]
    if fits:
        return 0
    try:
        check_memory((label, with_values(c, {"distributed.memory_check": True})) for label, c in checked)
    except ConfigError as refused:  # what to change, as train, tune and scale would say it
        console.print(f"[red]does not fit:[/red] {refused}", soft_wrap=True)
    return EXIT_BAD_INPUT


def _memory_check_flag(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--no-memory-check",
        dest="set",
        action="append_const",
        const="distributed.memory_check=false",
        help="run even when the memory plan says a worker will not fit (fisher-scale plan)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisher-scale", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="one training run: Ray Train + DeepSpeed ZeRO, Fisher optimizers, masks")
    train.add_argument("config", type=Path, help="experiment YAML (tune_configs/*.yaml)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optimizer.damping=1e-3 (repeatable)",
    )
    _memory_check_flag(train)
    train.set_defaults(run=_train)

    plan = commands.add_parser("plan", help="per-rank memory plan of a config (and of each scale.grid point)")
    plan.add_argument("config", type=Path, help="experiment YAML")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.set_defaults(run=_plan)

    study = commands.add_parser("tune", help="a hyperparameter study: Ray Tune + Optuna, tracked in MLflow")
    study.add_argument("config", type=Path, help="experiment YAML with a tune section (tune_configs/demo.yaml)")
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    study.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="0,1,2",
        help="repeat every study once per seed, side by side (sets tune.seeds); the final table gives verdicts",
    )
    study.add_argument(
        "--resume", action="store_true", help="continue the newest unfinished study of this config's name"
    )
    _memory_check_flag(study)
    study.set_defaults(run=_tune)

    scale = commands.add_parser("scale", help="a scaling study: one training run per grid point, fits and plots")
    scale.add_argument("config", type=Path, help="experiment YAML with a scale section (tune_configs/scale_demo.yaml)")
    scale.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    scale.add_argument("--resume", action="store_true", help="continue the newest unfinished study of this name")
    _memory_check_flag(scale)
    scale.set_defaults(run=_scale)

    for name, run, purpose in (
        ("compare", _compare, "table and plots of a study's arms (optimizers, × tune.arms) from an MLflow experiment"),
        ("report", _report, "the comparison as a Markdown report (setup, table, verdicts, plots)"),
    ):
        command = commands.add_parser(name, help=purpose)
        command.add_argument("experiment", help="MLflow experiment name (the config's name)")
        command.add_argument(
            "--tracking-uri",
            help="MLflow store; default: the one the newest study of this name recorded, else $MLFLOW_TRACKING_URI, "
            "else sqlite:///mlflow.db (never created)",
        )
        command.add_argument(
            "--storage",
            help="where the studies are (distributed.storage_path); default: outputs/ray, then ~/ray_results",
        )
        command.add_argument("--metric", help="default: the tune.metric of the newest study")
        command.add_argument("--mode", choices=["min", "max"], help="default: the tune.mode of the newest study")
        command.add_argument("--target", type=float, help="metric value for the steps/time-to-target columns")
        command.add_argument(
            "--all-trials", action="store_true", help="use every trial (default: equal trial budget per arm)"
        )
        command.add_argument(
            "--out", type=Path, default=Path(f"outputs/{name}"), help="folder for the PNG plots (and report.md)"
        )
        command.set_defaults(run=run)

    evaluate = commands.add_parser("eval", help="evaluate a saved adapter on the config's dataset (GSM8K / GLUE)")
    evaluate.add_argument("config", type=Path, help="the experiment YAML the adapter was trained with")
    evaluate.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="an adapter directory, a run's output_dir or a checkpoint directory",
    )
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    evaluate.add_argument("--json", type=Path, help="also write the metrics as JSON here")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stdout.isatty():  # a log file, CI or `ray job logs`: rich would cut every table at 80 columns
        rich.reconfigure(width=LOG_WIDTH)
    console = rich.get_console()
    quiet_driver()
    try:
        return args.run(args, console)
    except (FisherScaleError, KeyboardInterrupt) as error:  # one line; a failed worker printed its traceback
        console.print(f"[red]error:[/red] {error}" if str(error) else "[yellow]interrupted", soft_wrap=True)
        return exit_code(error)
    except Exception as error:  # a bug: the traceback, once
        console.print_exception()
        return exit_code(error)


def run() -> None:
    """The console script: :func:`main`, then exit without collecting the process's objects one by one (MLflow's,
    matplotlib's, torch's: about a second of a read-only command such as ``compare``, and nothing left to do)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
