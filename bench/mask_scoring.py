"""FISH mask costs: batched (vmap) scoring vs the one-example loop, and the step overhead of a mask.

Part 1 scores ``--samples`` GLUE SST-2 sentences (the training set's scoring batches, as a run scores them)
on the tiny LoRA LM both ways, checks that the scores agree and prints the speed-up (goal ≥ 5× on a 2-CPU
machine). Part 2 trains the ``--step-model`` with and without an active mask (10 %, seeded random: no
scoring in the timed steps) in the training loop that Ray Train runs (``train.worker.Run``), here in one
local process, on the same batches, ``--repeats`` times each in turn, and prints the median step-time
ratio (goal ≤ 1.05×).

    python bench/mask_scoring.py [--samples 1024] [--batch-size 32] [--step-model small|tiny] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.config import ExperimentConfig
from fisher_scale.data import default_data_dir
from fisher_scale.masks import candidate_parameters, fisher_scores
from fisher_scale.models import PRESETS
from fisher_scale.train import metrics as metric
from fisher_scale.train.dataset import TrainingSet
from fisher_scale.train.local import run_jobs
from fisher_scale.train.worker import build_model

WARMUP = 5
#: sentences per training step of the overhead part
STEP_BATCH = 8


def config(model: str, source: Path, seq_len: int, batch_size: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A LoRA r8 run of ``model`` on SST-2 with AdaFisher, evaluation off; ``sections`` update its sections."""
    base: dict[str, Any] = {
        "seed": 0,
        "lr": 1e-3,
        "model": {"name": model},
        "optimizer": {"name": "adafisher"},
        "data": {"dataset": "glue/sst2", "source": str(source), "max_length": seq_len, "batch_size": batch_size},
        "eval": {"enabled": False},
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return base


def loop_scores(model: torch.nn.Module, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """The definition, one example at a time."""
    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            model.zero_grad(set_to_none=True)
            model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.backward()
            for n in names:
                scores[n] += params[n].grad.square()
    model.train()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per vmap call")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps for the overhead")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm (plain, masked), in turn")
    parser.add_argument("--step-model", choices=sorted(PRESETS), default="small", help="model of the overhead part")
    parser.add_argument("--data", type=Path, default=default_data_dir() / "glue")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.samples % args.batch_size:
        parser.error("--samples must be a multiple of --batch-size")

    scoring = ExperimentConfig.model_validate(
        config(
            "tiny",
            args.data,
            args.seq_len,
            4,
            data={"max_train_examples": args.samples},
            eval={"batch_size": args.batch_size},
        )
    )
    data = TrainingSet(scoring)
    model = build_model(scoring, data.num_labels)
    score_batches = list(data.scoring_batches(range(args.samples)))
    start = time.perf_counter()
    batched = fisher_scores(model, score_batches, samples=args.samples)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    looped = loop_scores(model, score_batches, list(batched))
    loop_s = time.perf_counter() - start
    worst = max(float((batched[n] - looped[n]).abs().max() / looped[n].abs().max().clamp_min(1e-30)) for n in looped)
    candidates, _ = candidate_parameters(model, "peft")

    # the overhead is a few tensor operations per masked matrix, so it is measured on --step-model
    steps = WARMUP + args.steps
    arms = {"plain": {"enabled": False}, "masked": {"enabled": True, "ratio": 0.1, "selection": "random"}}
    step_times: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        jobs = [
            (
                f"{arm}-{repeat}",
                config(
                    args.step_model,
                    args.data,
                    args.seq_len,
                    STEP_BATCH,
                    mask=mask,
                    data={"max_train_examples": STEP_BATCH * steps},
                    train={"steps": steps, "log_every": 1, "output_dir": str(out / f"{arm}-{repeat}")},
                ),
                None,
            )
            for repeat in range(args.repeats)
            for arm, mask in arms.items()
        ]
        run_jobs(1, jobs, out)
        for name, _, _ in jobs:
            reports = torch.load(out / f"{name}-reports.pt", weights_only=False)[WARMUP:]
            step_times[name.rsplit("-", 1)[0]] += [r[metric.STEP_TIME] for r in reports]
    plain_ms, masked_ms = (1000 * statistics.median(step_times[arm]) for arm in arms)

    rows = {
        "samples": args.samples,
        "loop_s": loop_s,
        "batched_s": batched_s,
        "speedup": loop_s / batched_s,
        "max_relative_score_difference": worst,
        "step_ms_no_mask": plain_ms,
        "step_ms_mask": masked_ms,
        "mask_step_ratio": masked_ms / plain_ms,
        "optimizer": "adafisher",
        "step_model": args.step_model,
        "candidates": sum(p.numel() for p in candidates.values()),
    }
    table = Table(title="FISH mask costs (scoring: tiny LoRA LM)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_row(f"score {args.samples} examples, loop", f"{loop_s:.2f} s", "")
    table.add_row(f"score {args.samples} examples, vmap ×{args.batch_size}", f"{batched_s:.2f} s", "")
    table.add_row("speed-up", f"{rows['speedup']:.2f}×", "≥ 5×")
    table.add_row("max relative score difference", f"{worst:.1e}", "")
    table.add_row(f"adafisher step ({args.step_model} model), no mask", f"{plain_ms:.1f} ms", "")
    table.add_row("adafisher step, mask (10 %)", f"{masked_ms:.1f} ms", "")
    table.add_row("mask step overhead", f"{rows['mask_step_ratio']:.3f}×", "≤ 1.05×")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
