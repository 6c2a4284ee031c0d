"""What Ray Train + DeepSpeed cost per step against a plain PyTorch loop, and what a second worker buys.

The same tiny LoRA model, data, batch and optimizer are trained (a) in a plain single-process loop
(``model(**batch).loss.backward(); optimizer.step()``, one thread, as a 1-CPU worker gets) and (b)
through ``fisher-scale train``'s path: a Ray Train ``TorchTrainer`` whose worker runs DeepSpeed ZeRO-2
with the optimizer as client optimizer, at 1 and at 2 workers (global batch fixed, split over
workers). Per-step times are medians of steady-state steps (the distributed run
reports means of 5-step windows) measured inside the loop; startup (Ray,
worker imports, DeepSpeed init, the ``ray.train.report`` calls, teardown: the run's wall time minus its
steps) is reported apart. Goal (issue 7): Ray + DeepSpeed ≤ 1.3× the plain
step at 1 worker.

    python bench/scaling_overhead.py [--steps 30] [--optimizers adamw,adafisher] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.config import ExperimentConfig, build_config
from fisher_scale.optim import build_optimizer
from fisher_scale.train.batches import StepBatches
from fisher_scale.train.dataset import TrainingSet
from fisher_scale.train.worker import build_model

LR = {"adamw": 1e-3, "adafisher": 1e-3, "adafish": 0.3}
REPORT_EVERY = 5


def experiment(optimizer: str, workers: int, steps: int, batch: int, out: Path) -> ExperimentConfig:
    return build_config(
        {
            "lr": LR[optimizer],
            "model": {"name": "tiny"},
            "optimizer": {"name": optimizer},
            "data": {"max_length": 256, "max_train_examples": 512, "batch_size": batch // workers},
            # step_time_s is reported as the mean of each window of REPORT_EVERY steps
            "train": {"steps": steps, "log_every": REPORT_EVERY, "output_dir": str(out / f"{optimizer}-{workers}")},
            "eval": {"enabled": False},
            "distributed": {"num_workers": workers, "zero_stage": 2, "storage_path": str(out / "ray")},
        }
    )


def plain_loop(cfg: ExperimentConfig) -> list[float]:
    """Step times of the plain loop on the same batches the distributed run draws (rank 0 of 1)."""
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    data = TrainingSet(cfg)
    model = build_model(cfg, data.num_labels)
    optimizer = build_optimizer(cfg.optimizer.name, model, **cfg.optimizer.hyperparameters(cfg.lr))
    batches = StepBatches(len(data), cfg.data.batch_size, 1, 1, cfg.seed)
    times = []
    for step in range(cfg.train.steps):
        started = time.perf_counter()
        batch = data.collate(batches.indices(step, 0, 0))
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def ray_run(cfg: ExperimentConfig) -> tuple[list[float], list[float], float]:
    """Step times and tokens/s of a ``fisher-scale train`` run (from its ``metrics.jsonl``), and its wall time."""
    from fisher_scale.train.launcher import run_training

    started = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - started
    lines = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()
    reports = [json.loads(line) for line in lines]
    return [r["train/step_time_s"] for r in reports], [r["train/tokens_per_s"] for r in reports], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch (examples per step)")
    parser.add_argument("--optimizers", default="adamw,adafisher")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    skip = max(2, args.steps // 5)  # warm-up steps left out of the medians
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.optimizers.split(","):
            one = experiment(name, 1, args.steps, args.batch, Path(tmp))
            plain = statistics.median(plain_loop(one)[skip:])
            step1, tokens1, wall1 = ray_run(one)
            step2, tokens2, wall2 = ray_run(experiment(name, 2, args.steps, args.batch, Path(tmp)))
            window = skip // REPORT_EVERY + 1  # report windows left out (warm-up)
            rows.append(
                {
                    "optimizer": name,
                    "plain_step_s": plain,
                    "ray_1_worker_step_s": statistics.median(step1[window:]),
                    "overhead_1_worker": statistics.median(step1[window:]) / plain,
                    "ray_2_workers_step_s": statistics.median(step2[window:]),
                    "tokens_per_s_1": statistics.median(tokens1[window:]),
                    "tokens_per_s_2": statistics.median(tokens2[window:]),
                    "throughput_2_over_1": statistics.median(tokens2[window:]) / statistics.median(tokens1[window:]),
                    "fixed_s_1": wall1 - REPORT_EVERY * sum(step1),
                    "fixed_s_2": wall2 - REPORT_EVERY * sum(step2),
                }
            )
    table = Table(title=f"tiny LoRA LM, global batch {args.batch}, {args.steps} steps, medians after {skip}")
    for column in ("optimizer", "plain ms", "Ray+DS 1w ms", "× plain", "Ray+DS 2w ms", "tok/s 1w", "tok/s 2w",
                   "2w / 1w", "fixed s 1w", "fixed s 2w"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["optimizer"],
            f"{1000 * row['plain_step_s']:.1f}",
            f"{1000 * row['ray_1_worker_step_s']:.1f}",
            f"{row['overhead_1_worker']:.2f}",
            f"{1000 * row['ray_2_workers_step_s']:.1f}",
            f"{row['tokens_per_s_1']:.0f}",
            f"{row['tokens_per_s_2']:.0f}",
            f"{row['throughput_2_over_1']:.2f}",
            f"{row['fixed_s_1']:.1f}",
            f"{row['fixed_s_2']:.1f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
