"""Per-rank optimizer + Fisher state under DeepSpeed ZeRO, and AdaFisher's step-time overhead.

Trains the ``small`` preset (SmolLM2-135M's layer shape, 4 layers) with LoRA on GLUE SST-2 for a few
steps, for 1 and 2 workers × ZeRO stages 0-3 × AdamW / AdaFisher, in local gloo process groups, and
reads ``optimizer_state_bytes_per_rank`` and the step time from the run's reports. Goals (issue 4): at
2 workers with ZeRO ≥ 1 the per-rank state ≤ 0.55× the 1-worker state; AdaFisher's ≤ 0.6× AdamW's;
AdaFisher's step ≤ 1.15× AdamW's under ZeRO-2 with 2 workers.

    python bench/zero_memory.py [--steps 8] [--model small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.data import default_data_dir
from fisher_scale.train.local import run_jobs

OPTIMIZERS = {"adamw": 1e-3, "adafisher": 1e-3}


def job(name: str, out: Path, model: str, optimizer: str, stage: int, batch: int, steps: int, rank: int) -> tuple:
    config = {
        "lr": OPTIMIZERS[optimizer],
        "model": {"name": model},
        "peft": {"rank": rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]},
        "optimizer": {"name": optimizer},
        "data": {
            "dataset": "glue/sst2",
            "source": str(default_data_dir() / "glue"),
            "max_length": 64,
            "max_train_examples": 512,
            "batch_size": batch,
        },
        "train": {"steps": steps, "log_every": steps, "output_dir": str(out / name)},
        "eval": {"enabled": False},
        "distributed": {
            "zero_stage": stage,
            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
    }
    return name, config, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default="small")
    parser.add_argument(
        "--rank", type=int, default=8, help="LoRA rank: the replicated factors are ~1/rank of the adapter"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for world in (1, 2):
            jobs = [
                job(f"w{world}-z{stage}-{opt}", out, args.model, opt, stage, 8 // world, args.steps, args.rank)
                for stage in range(4)
                for opt in OPTIMIZERS
            ]
            run_jobs(world, jobs, out)
            for name, _, _ in jobs:
                report = torch.load(out / f"{name}-reports.pt", weights_only=False)[-1]
                _, stage, opt = name.split("-")
                rows.append(
                    {
                        "workers": world,
                        "zero_stage": int(stage[1:]),
                        "optimizer": opt,
                        "state_bytes_per_rank": report["memory/optimizer_state_bytes_per_rank"],
                        "step_time_s": report["train/step_time_s"],
                    }
                )
    state = {(r["workers"], r["zero_stage"], r["optimizer"]): r for r in rows}
    table = Table(title=f"{args.model} LM, LoRA r={args.rank}, global batch 8, ZeRO per-rank optimizer + Fisher state")
    for column in (
        "workers",
        "ZeRO",
        "optimizer",
        "state KiB/rank",
        "× 1 worker",
        "× AdamW",
        "step ms",
        "step × AdamW",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        one = state[(1, r["zero_stage"], r["optimizer"])]["state_bytes_per_rank"]
        adamw = state[(r["workers"], r["zero_stage"], "adamw")]
        r["ratio_to_one_worker"] = r["state_bytes_per_rank"] / one
        r["ratio_to_adamw"] = r["state_bytes_per_rank"] / adamw["state_bytes_per_rank"]
        r["step_ratio_to_adamw"] = r["step_time_s"] / adamw["step_time_s"]
        table.add_row(
            str(r["workers"]),
            str(r["zero_stage"]),
            r["optimizer"],
            f"{r['state_bytes_per_rank'] / 1024:.1f}",
            f"{r['ratio_to_one_worker']:.3f}",
            f"{r['ratio_to_adamw']:.3f}",
            f"{1000 * r['step_time_s']:.0f}",
            f"{r['step_ratio_to_adamw']:.3f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
