"""FISH mask costs: batched (vmap) scoring vs the one-example loop, and the step overhead of a mask.

Part 1 scores ``--samples`` GSM8K byte sequences on the demo's LoRA LM both ways, checks that the
scores agree and prints the speed-up (goal ≥ 5× on a 2-CPU machine). Part 2 trains two copies of
the model on the same batches, one with an active mask, stepping in turn, and prints the median
step-time ratio (goal ≤ 1.05×).

    python bench/mask_scoring.py [--samples 1024] [--batch-size 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.data import default_data_dir
from fisher_scale.demo import DemoRun, gsm8k_byte_chunks, interleaved
from fisher_scale.masks import apply_mask, candidate_parameters, fisher_scores, select_mask
from fisher_scale.models import PRESETS, Lora


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
    parser.add_argument("--optimizer", default="adafisher")
    parser.add_argument("--step-model", choices=sorted(PRESETS), default="small", help="model of the overhead part")
    parser.add_argument("--data", type=Path, default=default_data_dir() / "gsm8k" / "train.jsonl")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.samples % args.batch_size:
        parser.error("--samples must be a multiple of --batch-size")

    lora = Lora(rank=8)
    plain, masked = (DemoRun(args.optimizer, 3e-3, PRESETS["tiny"], lora) for _ in range(2))
    score_batches = gsm8k_byte_chunks(args.data, args.seq_len, args.batch_size, args.samples // args.batch_size)

    start = time.perf_counter()
    batched = fisher_scores(masked.model, score_batches, samples=args.samples)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    looped = loop_scores(plain.model, score_batches, list(batched))
    loop_s = time.perf_counter() - start
    worst = max(float((batched[n] - looped[n]).abs().max() / looped[n].abs().max().clamp_min(1e-30)) for n in looped)

    candidates, _ = candidate_parameters(masked.model, "peft")
    # the overhead is a few tensor operations per masked matrix, so it is measured on --step-model
    plain, masked = (DemoRun(args.optimizer, 3e-3, PRESETS[args.step_model], lora) for _ in range(2))
    step_candidates, _ = candidate_parameters(masked.model, "peft")
    generator = torch.Generator().manual_seed(0)
    random_scores = {n: torch.rand(p.shape, generator=generator) for n, p in step_candidates.items()}
    apply_mask(masked.model, masked.optimizer, select_mask(random_scores, 0.1))
    warmup = 5
    train_batches = gsm8k_byte_chunks(args.data, 128, 4, warmup + args.steps)
    for _ in interleaved([plain, masked], train_batches):
        pass
    plain_ms = 1000 * statistics.median(plain.record.step_seconds[warmup:])
    masked_ms = 1000 * statistics.median(masked.record.step_seconds[warmup:])

    rows = {
        "samples": args.samples,
        "loop_s": loop_s,
        "batched_s": batched_s,
        "speedup": loop_s / batched_s,
        "max_relative_score_difference": worst,
        "step_ms_no_mask": plain_ms,
        "step_ms_mask": masked_ms,
        "mask_step_ratio": masked_ms / plain_ms,
        "optimizer": args.optimizer,
        "step_model": args.step_model,
        "candidates": sum(p.numel() for p in candidates.values()),
    }
    table = Table(title="FISH mask costs (scoring: tiny demo LoRA LM)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    table.add_row(f"score {args.samples} examples, loop", f"{loop_s:.2f} s", "")
    table.add_row(f"score {args.samples} examples, vmap ×{args.batch_size}", f"{batched_s:.2f} s", "")
    table.add_row("speed-up", f"{rows['speedup']:.2f}×", "≥ 5×")
    table.add_row("max relative score difference", f"{worst:.1e}", "")
    table.add_row(f"{args.optimizer} step ({args.step_model} model), no mask", f"{plain_ms:.1f} ms", "")
    table.add_row(f"{args.optimizer} step, mask (10 %)", f"{masked_ms:.1f} ms", "")
    table.add_row("mask step overhead", f"{rows['mask_step_ratio']:.3f}×", "≤ 1.05×")
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
