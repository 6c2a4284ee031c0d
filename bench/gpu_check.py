"""The GPU path in one command: NCCL, bf16 and DeepSpeed ZeRO 0/2/3 through the local launcher (no Ray).

On one GPU it trains a random model with every shape of Qwen2.5-0.5B (``qwen2.5-0.5b-shape``: built from its
config, nothing downloaded) with LoRA r8 on synthetic GSM8K-format text, AdamW / AdaFisher / AdaFish × ZeRO
0, 2, 3 × FISH mask off / on, in bf16 (ZeRO 0 in fp32: DeepSpeed's bf16 wrapper at stage 0 is refused by the
config). It fails unless every loss is finite and the last epoch's mean loss is below the first's, prints the
step time and its ratio to AdamW's, peak GPU memory and optimizer-state bytes, and checks that a tiny fp32 run
under NCCL on the GPU ends where the same run under gloo on the CPU ends (max relative difference ≤ 1e-4).

    python bench/gpu_check.py [--workers N] [--json out.json]  # N GPUs (default 1); goal: < 8 min on one H100/H200
    python bench/gpu_check.py --cpu [--workers 2]               # gloo, the tiny model in fp32 (the test suite)

One GPU exercises devices, dtypes, NCCL's set-up and DeepSpeed's single-rank paths; the collectives between
ranks (statistics, AdaFish's small matrices, scores, evaluation) need ``--workers 2`` or more, which runs each
configuration at the same global batch over that many GPUs (or CPU processes).

Goals (issue 11; benchmarks, not tests): on the GPU, AdaFisher's step ≤ 1.05× AdamW's, AdaFish's ≤ 1.10×,
AdaFisher's optimizer state ≤ 0.6× AdamW's without a mask (with one, masked entries hold no moments, so the
factor vectors weigh more and the ratio rises).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from fisher_scale.train.local import run_jobs

#: learning rates inside each optimizer's working region on MiniLM + LoRA (DESIGN.md)
LEARNING_RATES = {"adamw": 1e-3, "adafisher": 1e-3, "adafish": 0.02}
STAGES = (0, 2, 3)
EXAMPLES, BATCH = 16, 4  # four steps an epoch: the first and last epochs see the same examples
TOLERANCE = 1e-4


def synthetic_gsm8k(folder: Path) -> Path:
    """GSM8K-format word problems with their ``#### N`` answers (train and test), from a fixed seed."""
    folder.mkdir(parents=True, exist_ok=True)
    draw = random.Random(0)
    for split in ("train", "test"):
        with (folder / f"{split}.jsonl").open("w") as lines:
            for _ in range(EXAMPLES):
                a, b = draw.randint(2, 99), draw.randint(2, 99)
                question = f"Ann has {a} apples and buys {b} more. How many apples does she have?"
                answer = f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
                lines.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return folder


def job(name: str, out: Path, data: Path, **settings: Any) -> tuple[str, dict[str, Any], None]:
    gpu, optimizer = settings["gpu"], settings["optimizer"]
    config = {
        "seed": 0,
        "lr": LEARNING_RATES[optimizer],
        "model": {"name": settings["model"], "dtype": settings["dtype"]},
        "peft": {"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "optimizer": {"name": optimizer, **({"damping": 0.1} if optimizer == "adafish" else {})},
        "mask": {"enabled": settings["mask"], "ratio": 0.5, "samples": 8, "warmup_steps": 2},
        "data": {
            "dataset": "gsm8k",
            "source": str(data),
            "max_length": 96,
            "batch_size": BATCH // settings["workers"],
            "max_train_examples": EXAMPLES,
        },
        # on the host, peak memory as the GPU counts it: live tensor bytes (the resident set says little of a run)
        "train": {
            "steps": settings["steps"],
            "log_every": 1,
            "profile": True,
            "trace_memory": not gpu,
            "output_dir": str(out / name),
        },
        "eval": {"enabled": False},
        "distributed": {
            "zero_stage": settings["stage"],
            "use_gpu": gpu,
            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        },
    }
    return name, config, None


def grid(out: Path, data: Path, gpu: bool, steps: int, workers: int) -> list[tuple[str, dict[str, Any], None]]:
    model = "qwen2.5-0.5b-shape" if gpu else "tiny"
    jobs = []
    for stage in STAGES:
        dtype = "bfloat16" if gpu and stage > 0 else "float32"
        for optimizer in LEARNING_RATES:
            for mask in (False, True):
                settings = {"gpu": gpu, "model": model, "dtype": dtype, "optimizer": optimizer, "mask": mask}
                settings["workers"] = workers
                name = f"z{stage}-{optimizer}-mask{int(mask)}"
                jobs.append(job(name, out, data, stage=stage, steps=steps, **settings))
    return jobs


def summarise(out: Path, jobs: list[tuple[str, dict[str, Any], None]]) -> list[dict[str, Any]]:
    rows = []
    for name, config, _ in jobs:
        reports = torch.load(out / f"{name}-reports.pt", weights_only=False)
        losses = [r["train/loss"] for r in reports]
        epoch = EXAMPLES // BATCH
        rows.append(
            {
                "name": name,
                "zero_stage": config["distributed"]["zero_stage"],
                "optimizer": config["optimizer"]["name"],
                "mask": config["mask"]["enabled"],
                "dtype": config["model"]["dtype"],
                "first_epoch_loss": statistics.fmean(losses[:epoch]),
                "last_epoch_loss": statistics.fmean(losses[-epoch:]),
                "finite": all(math.isfinite(v) for v in losses),
                "step_time_s": statistics.median(r["train/step_time_s"] for r in reports[epoch:]),
                "peak_bytes": max(r["memory/peak_bytes"] for r in reports),
                "state_bytes": reports[-1]["memory/optimizer_state_bytes_per_rank"],
            }
        )
    adamw = {(r["zero_stage"], r["mask"]): r for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        reference = adamw[(r["zero_stage"], r["mask"])]
        r["step_ratio_to_adamw"] = r["step_time_s"] / reference["step_time_s"]
        r["state_ratio_to_adamw"] = r["state_bytes"] / reference["state_bytes"]
    return rows


def backend_agreement(out: Path, data: Path, gpu: bool) -> float:
    """Max relative difference of the tiny fp32 model's adapter after the same run under NCCL/GPU and gloo/CPU
    (on a CPU-only machine: gloo twice, a determinism check)."""
    settings = {"model": "tiny", "dtype": "float32", "optimizer": "adafisher", "mask": True, "stage": 2, "steps": 8}
    settings["workers"] = 1
    cpu = job("agree-gloo", out, data, gpu=False, **settings)
    run_jobs(1, [cpu], out)
    other = job("agree-nccl" if gpu else "agree-gloo-again", out, data, gpu=gpu, **settings)
    run_jobs(1, [other], out, backend="nccl" if gpu else "gloo")
    a, b = (load_file(str(out / name / "adapter" / "adapter_model.safetensors")) for name in (other[0], cpu[0]))
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def failures(rows: list[dict[str, Any]], agreement: float) -> list[str]:
    problems = [f"{r['name']}: a non-finite loss" for r in rows if not r["finite"]]
    problems += [
        f"{r['name']}: loss did not decrease ({r['first_epoch_loss']:.4f} → {r['last_epoch_loss']:.4f})"
        for r in rows
        if r["finite"] and not r["last_epoch_loss"] < r["first_epoch_loss"]
    ]
    if not agreement <= TOLERANCE:
        problems.append(f"NCCL/GPU and gloo/CPU runs differ by {agreement:.2e} (> {TOLERANCE:g})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="gloo and the tiny model (no GPU needed)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (a multiple of 4)")
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2, 4), help="ranks (GPUs) per run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        parser.error("no CUDA device is visible: run with --cpu for the CPU mode")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = synthetic_gsm8k(out / "data")
        jobs = grid(out, data, gpu, args.steps, args.workers)
        run_jobs(args.workers, jobs, out, backend="nccl" if gpu else "gloo")
        rows = summarise(out, jobs)
        agreement = backend_agreement(out, data, gpu)
    device = torch.cuda.get_device_name() if gpu else "CPU (gloo)"
    title = f"GPU check on {device}, {args.workers} rank(s): LoRA r8, global batch {BATCH}, {args.steps} steps"
    table = Table(title=title)
    for column in ("ZeRO", "optimizer", "mask", "dtype", "loss first→last epoch", "step ms", "× AdamW"):
        table.add_column(column, justify="right")
    for column in ("peak MiB", "state MiB", "state × AdamW"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["zero_stage"]),
            r["optimizer"],
            "on" if r["mask"] else "off",
            r["dtype"],
            f"{r['first_epoch_loss']:.3f} → {r['last_epoch_loss']:.3f}",
            f"{1000 * r['step_time_s']:.1f}",
            f"{r['step_ratio_to_adamw']:.3f}",
            f"{r['peak_bytes'] / 2**20:.0f}",
            f"{r['state_bytes'] / 2**20:.2f}",
            f"{r['state_ratio_to_adamw']:.3f}",
        )
    console = Console(width=160)
    console.print(table)
    console.print(
        f"tiny fp32 run, {'NCCL/GPU vs gloo/CPU' if gpu else 'gloo twice'}: max relative difference "
        f"{agreement:.2e} (≤ {TOLERANCE:g}); {time.perf_counter() - started:.0f} s in all"
    )
    problems = failures(rows, agreement)
    if args.json:
        args.json.write_text(
            json.dumps({"device": device, "rows": rows, "agreement": agreement, "failures": problems}, indent=2)
        )
    for problem in problems:
        console.print(f"[red]FAILED[/red] {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
