"""Training-step time and optimizer-state bytes of AdamW, AdaFisher(W) and AdaFish on LoRA fine-tuning.

All optimizers train copies of the same model on the same GSM8K byte batches, stepping in turn
(interleaved), so load drift on the machine hits each alike; the table gives medians after warm-up
and ratios to AdamW measured in the same run. Goals (issue 2, on a 2-CPU machine): AdaFisher step
≤ 1.10× AdamW, AdaFish ≤ 1.20×, AdaFisher state ≤ 0.6× AdamW.

    python bench/optimizer_overhead.py [--model small|tiny] [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.data import default_data_dir
from fisher_scale.demo import DEMO_LR, DemoRun, gsm8k_byte_chunks, interleaved
from fisher_scale.models import PRESETS, Lora

GOALS = {"adafisher": (1.10, 0.6), "adafisherw": (1.10, 0.6), "adafish": (1.20, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="small")
    parser.add_argument("--optimizers", default="adamw,adafisher,adafish")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--data", type=Path, default=default_data_dir() / "gsm8k" / "train.jsonl")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = args.optimizers.split(",")
    if names[0] != "adamw":
        parser.error("--optimizers must start with adamw (the baseline of the ratios)")

    batches = gsm8k_byte_chunks(args.data, args.seq_len, args.batch_size, args.warmup + args.steps)
    lora = Lora(
        rank=args.rank, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    runs = [DemoRun(name, DEMO_LR[name], PRESETS[args.model], lora) for name in names]
    for _ in interleaved(runs, batches):
        pass
    records = [run.finish() for run in runs]
    baseline_time = statistics.median(records[0].step_seconds[args.warmup :])
    baseline_bytes = records[0].state_bytes
    rows = []
    for record in records:
        median = statistics.median(record.step_seconds[args.warmup :])
        time_goal, bytes_goal = GOALS.get(record.optimizer, (None, None))
        rows.append(
            {
                "optimizer": record.optimizer,
                "median_step_ms": 1000 * median,
                "step_ratio": median / baseline_time,
                "step_goal": time_goal,
                "state_bytes": record.state_bytes,
                "state_ratio": record.state_bytes / baseline_bytes,
                "state_goal": bytes_goal,
                "final_loss": record.losses[-1],
            }
        )

    table = Table(
        title=f"{args.model} LM, LoRA r={args.rank}, batch {args.batch_size}×{args.seq_len}, "
        f"median of {args.steps} steps"
    )
    for column in ("optimizer", "step ms", "× AdamW", "goal", "state KiB", "× AdamW", "goal", "final loss"):
        table.add_column(column, justify="right", no_wrap=column == "optimizer")
    for row in rows:
        table.add_row(
            row["optimizer"],
            f"{row['median_step_ms']:.1f}",
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
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **vars(args),
            "data": str(args.data),
            "json": str(args.json),
        }
        args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
