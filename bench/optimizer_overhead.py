"""Training-step time and optimizer-state bytes of AdamW, AdaFisher(W) and AdaFish on LoRA fine-tuning.

Each optimizer trains the same model from the same initial weights on the same GSM8K batches, in the
training loop that Ray Train runs (``train.worker.Run``: DeepSpeed engine, guard, loss normalisation),
here in one local process (one thread, no Ray). The table gives medians after warm-up, the optimizer
phase of the step (``train.profile``) and ratios to AdamW measured in the same run. The optimizers run one
after another, so load drift on the machine is not shared out; ``--repeats`` runs the whole set again and
takes each optimizer's median over all repeats. Goals (issue 2, on a 2-CPU machine): AdaFisher step
≤ 1.10× AdamW, AdaFish ≤ 1.20×, AdaFisher state ≤ 0.6× AdamW.

    python bench/optimizer_overhead.py [--model small|tiny] [--steps 30] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.data import default_data_dir
from fisher_scale.models import PRESETS
from fisher_scale.train import metrics as metric
from fisher_scale.train.local import run_jobs

#: learning rates inside each optimizer's working region on MiniLM + LoRA (DESIGN.md); timing does not depend on them
LEARNING_RATES = {"adamw": 1e-3, "adafisher": 1e-3, "adafisherw": 1e-3, "adafish": 0.02}
GOALS = {"adafisher": (1.10, 0.6), "adafisherw": (1.10, 0.6), "adafish": (1.20, None)}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def job(name: str, optimizer: str, out: Path, args: argparse.Namespace) -> tuple[str, dict[str, Any], None]:
    steps = args.warmup + args.steps
    config = {
        "seed": 0,
        "lr": LEARNING_RATES[optimizer],
        "model": {"name": args.model},
        "peft": {"rank": args.rank, "target_modules": PROJECTIONS},
        "optimizer": {"name": optimizer},
        "data": {
            "dataset": "gsm8k",
            "source": str(args.data),
            "max_length": args.seq_len,
            "batch_size": args.batch_size,
            "max_train_examples": steps * args.batch_size,
        },
        "train": {"steps": steps, "log_every": 1, "profile": True, "output_dir": str(out / name)},
        "eval": {"enabled": False},
    }
    return name, config, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="small")
    parser.add_argument("--optimizers", default="adamw,adafisher,adafish")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer and repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="times the whole set of optimizers runs")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--data", type=Path, default=default_data_dir() / "gsm8k")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.optimizers.split(",")
    if names[0] != "adamw":
        parser.error("--optimizers must start with adamw (the baseline of the ratios)")
    unknown = sorted(set(names) - set(LEARNING_RATES))
    if unknown:
        parser.error(f"--optimizers: unknown {', '.join(unknown)} (known: {', '.join(LEARNING_RATES)})")

    reports: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        jobs = [job(f"{name}-{repeat}", name, out, args) for repeat in range(args.repeats) for name in names]
        run_jobs(1, jobs, out)
        for label, _, _ in jobs:
            timed = torch.load(out / f"{label}-reports.pt", weights_only=False)[args.warmup :]
            reports[label.rsplit("-", 1)[0]].extend(timed)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in reports[name])

    baseline_time = median("adamw", metric.STEP_TIME)
    baseline_bytes = reports["adamw"][-1][metric.STATE_BYTES]
    rows = []
    for name in names:
        step, state = median(name, metric.STEP_TIME), reports[name][-1][metric.STATE_BYTES]
        time_goal, bytes_goal = GOALS.get(name, (None, None))
        rows.append(
            {
                "optimizer": name,
                "median_step_ms": 1000 * step,
                "median_optimizer_phase_ms": 1000 * median(name, metric.phase_time("optimizer")),
                "step_ratio": step / baseline_time,
                "step_goal": time_goal,
                "state_bytes": state,
                "state_ratio": state / baseline_bytes,
                "state_goal": bytes_goal,
                "final_loss": reports[name][-1][metric.LOSS],
            }
        )

    table = Table(
        title=f"{args.model} LM, LoRA r={args.rank}, batch {args.batch_size}×{args.seq_len}, "
        f"median of {args.steps} steps × {args.repeats}"
    )
    columns = ("optimizer", "step ms", "optimizer ms", "× AdamW", "goal", "state KiB", "× AdamW", "goal", "final loss")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=column == "optimizer")
    for row in rows:
        table.add_row(
            row["optimizer"],
            f"{row['median_step_ms']:.1f}",
            f"{row['median_optimizer_phase_ms']:.1f}",
            f"{row['step_ratio']:.3f}",
            "" if row["step_goal"] is None else f"≤ {row['step_goal']}",
            f"{row['state_bytes'] / 1024:.1f}",
            f"{row['state_ratio']:.3f}",
            "" if row["state_goal"] is None else f"≤ {row['state_goal']}",
            f"{row['final_loss']:.3f}",
        )
    Console().print(table)
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "threads": 1,
            "torch": torch.__version__,
            **vars(args),
            "data": str(args.data),
            "json": str(args.json),
        }
        args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
