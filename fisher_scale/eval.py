"""Evaluation: GSM8K answer extraction and accuracy, GLUE metrics, batched evaluation loops.

Every loop shards its examples over ``torch.distributed`` ranks when a process group is up (rank
r takes ``examples[r::world]``), gathers the per-example results with ``all_gather_object`` and
computes the metrics from the whole set, so every rank returns the same numbers as one process
would. Ranks run equally many batches and generation steps (``synced_gpus``), so a ZeRO-3 model,
whose every forward gathers parameters collectively, evaluates sharded too. Within a rank, batches group
examples of similar text length to waste little on padding.

Metric names are the ones training reports: ``gsm8k/accuracy``, ``gsm8k/loss``,
``glue/<task>/<metric>`` and ``glue/<task>/loss`` (task ``sst2``, ``stsb``, ``mnli_m``, ``mnli_mm`` ...).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fisher_scale.data import (
    IGNORE_INDEX,
    GlueTask,
    Record,
    collate,
    encode_prompt,
    glue_classifier_features,
    glue_split,
    glue_task,
    gsm8k_features,
    gsm8k_user_text,
    lm_features,
)
from fisher_scale.optim.distributor import all_gather_object, all_reduce_numbers, rank_world

# a sign only where it cannot be a minus between two terms ("16-3"), an optional $, 1,000-style groups, decimals
_SIGN = r"(?:(?<![\w)\]])-)?"
_NUMBER = rf"{_SIGN}\$?\s?{_SIGN}(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_MARKED_RE = re.compile(rf"####\s*({_NUMBER})")


def normalize_number(text: str) -> str:
    """``"$1,000.50"`` → ``"1000.5"``: Decimal normalisation, so 18, 18.0 and 18.00 compare equal."""
    value = Decimal(re.sub(r"[\s$,]", "", text)).normalize()
    return "0" if value == 0 else format(value, "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution or model output, normalised; None if it has no number.

    The number after the first ``####`` marker if there is one (GSM8K's format), else the last
    number in the text.
    """
    marked = _MARKED_RE.search(text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = _NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(predictions: Sequence[str | None], references: Sequence[str | None]) -> float:
    """Exact match of normalised answers; a missing prediction is wrong."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} and {len(references)}")
    return sum(p is not None and p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def glue_metrics(task: str, predictions: Sequence[float], references: Sequence[float]) -> dict[str, float]:
    """GLUE's official metrics: CoLA Matthews correlation, STS-B Pearson/Spearman, MRPC/QQP accuracy and F1,
    accuracy elsewhere (``MNLI``, ``MNLI-m``, ``MNLI-mm`` included)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} and {len(references)}")
    compute = {
        "pearson": lambda: pearsonr(predictions, references).statistic,
        "spearman": lambda: spearmanr(predictions, references).statistic,
        "matthews_corr": lambda: matthews_corrcoef(references, predictions),
        "accuracy": lambda: accuracy_score(references, predictions),
        "f1": lambda: f1_score(references, predictions),
    }
    return {name: float(compute[name]()) for name in glue_metric_names(task)}


def glue_metric_names(task: str) -> tuple[str, ...]:
    """The metric names :func:`glue_metrics` returns for a task (sweeps check their target metric against them)."""
    name = glue_task(task).name
    if name == "stsb":
        return ("pearson", "spearman")
    if name == "cola":
        return ("matthews_corr",)
    return ("accuracy", "f1") if name in ("mrpc", "qqp") else ("accuracy",)


def glue_metric_prefix(task: str, split: str = "dev") -> str:
    """``glue/sst2``; MNLI's dev halves are ``glue/mnli_m`` and ``glue/mnli_mm``."""
    spec = glue_task(task)
    if spec.name != "mnli":
        return f"glue/{spec.name}"
    return "glue/" + {"dev_matched": "mnli_m", "dev_mismatched": "mnli_mm"}.get(glue_split(task, split), "mnli")


@dataclass
class EvalResult:
    """Metrics (the same on every rank) and one record per evaluated example, in input order."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _sharded(
    items: list[Record],
    batch_size: int,
    run: Callable[[list[Record]], list[dict[str, Any]]],
    desc: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """``run`` over this rank's share in batches; every rank gets all results back in input order.

    Batches are formed longest text first, so that examples of similar length share a batch and
    padding wastes little compute (the order of the results is unaffected).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    rank, world = rank_world()
    local = items[rank::world]
    order = sorted(range(len(local)), key=lambda i: -sum(len(v) for v in local[i].values() if isinstance(v, str)))
    results: list[dict[str, Any]] = [{} for _ in local]
    # Ranks run equally many batches, a rank with fewer filling in with one repeated example whose result is
    # dropped: a ZeRO-3 model gathers its parameters collectively in every forward, so forwards must pair up.
    (rounds,) = all_reduce_numbers(-(-len(local) // batch_size), op="max")
    # None: tqdm draws only on a terminal (a Ray worker's output is a log file)
    with tqdm(total=len(local), desc=desc, disable=None if progress and rank == 0 else True, leave=False) as bar:
        for start in range(0, int(rounds) * batch_size, batch_size):
            positions = order[start : start + batch_size]
            if not positions:
                run((local or items)[:1])
                continue
            for position, result in zip(positions, run([local[i] for i in positions]), strict=True):
                results[position] = result
            bar.update(len(positions))
    if world == 1:
        return results
    shares = all_gather_object(results)
    ordered: list[dict[str, Any]] = [{} for _ in items]
    for r, share in enumerate(shares):
        ordered[r::world] = share
    return ordered


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` without autograd inside; the previous train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return pad


def completion_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a right-padded batch: the summed log-probability of its labelled tokens, and their count.

    Only the labelled positions go through the softmax, so a large vocabulary costs little memory.
    """
    batch = {key: value.to(_device(model)) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    logp = logits[:, :-1][mask].float().log_softmax(-1).gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    sums = torch.zeros(len(targets), dtype=torch.float64, device=logp.device).index_add_(0, rows, logp.double())
    return sums.cpu(), mask.sum(1).cpu()


def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded without special tokens."""
    pad = _pad_id(tokenizer)
    batch = collate([{"input_ids": p, "attention_mask": [1] * len(p)} for p in prompts], pad, "left")
    batch = {key: value.to(_device(model)) for key, value in batch.items()}
    configured = model.generation_config.eos_token_id
    stops = {*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id} - {None}
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        synced_gpus=rank_world()[1] > 1,  # every rank decodes until all are done: ZeRO-3 forwards pair up
        pad_token_id=pad,
        eos_token_id=sorted(stops) or None,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_gsm8k(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Record],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    max_length: int = 512,
    max_examples: int | None = None,
    loss: bool = True,
    progress: bool = True,
) -> EvalResult:
    """Greedy-decoding accuracy (``gsm8k/accuracy``) and, with ``loss``, the teacher-forced answer loss
    (``gsm8k/loss``, mean over answer tokens of ``max_length``-truncated examples)."""
    items = list(examples)[:max_examples]

    def run(chunk: list[Record]) -> list[dict[str, Any]]:
        prompts = [encode_prompt(tokenizer, gsm8k_user_text(e["question"])) for e in chunk]
        texts = generate(model, tokenizer, prompts, max_new_tokens)
        sums, counts = torch.zeros(len(chunk)), torch.zeros(len(chunk))
        if loss:
            features = [gsm8k_features(e, tokenizer, max_length) for e in chunk]
            sums, counts = completion_logprobs(model, collate(features, _pad_id(tokenizer)))
        rows = []
        for example, text, logp, count in zip(chunk, texts, sums.tolist(), counts.tolist(), strict=True):
            gold, predicted = extract_answer(example["answer"]), extract_answer(text)
            rows.append(
                {
                    "question": example["question"],
                    "generated": text,
                    "predicted": predicted,
                    "gold": gold,
                    "correct": predicted is not None and predicted == gold,
                    "nll": -logp,
                    "tokens": int(count),
                }
            )
        return rows

    with _evaluating(model):
        rows = _sharded(items, batch_size, run, "gsm8k", progress)
    metrics = {"gsm8k/accuracy": gsm8k_accuracy([r["predicted"] for r in rows], [r["gold"] for r in rows])}
    if loss:
        metrics["gsm8k/loss"] = sum(r["nll"] for r in rows) / max(1, sum(r["tokens"] for r in rows))
    return EvalResult(metrics, rows)


def majority_share(predictions: Sequence[int]) -> float:
    """The share of the most frequent predicted class: 1.0 is one class for every example, a classifier
    collapsed to chance level whatever its accuracy."""
    return Counter(predictions).most_common(1)[0][1] / len(predictions)


def _glue_result(spec: GlueTask, task: str, split: str, rows: list[dict[str, Any]], loss: float) -> EvalResult:
    """GLUE's metrics, the loss, and for a classification task the share of its most frequent prediction."""
    prefix = glue_metric_prefix(task, split)
    predictions = [r["prediction"] for r in rows]
    values = glue_metrics(spec.name, predictions, [r["label"] for r in rows])
    if not spec.is_regression:
        values["majority_share"] = majority_share(predictions)
    return EvalResult({**{f"{prefix}/{k}": v for k, v in values.items()}, f"{prefix}/loss": loss}, rows)


def evaluate_glue_classifier(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    records: Sequence[Record],
    *,
    split: str = "dev",
    batch_size: int = 32,
    max_length: int = 128,
    max_examples: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """A sequence-classification model on a GLUE split: argmax class (STS-B: the regression output),
    GLUE metrics and the mean cross-entropy (STS-B: squared error) as ``loss``."""
    spec, items = glue_task(task), list(records)[:max_examples]

    def run(chunk: list[Record]) -> list[dict[str, Any]]:
        batch = collate([glue_classifier_features(spec, r, tokenizer, max_length) for r in chunk], _pad_id(tokenizer))
        labels = batch.pop("labels").to(_device(model))
        logits = model(**{key: value.to(_device(model)) for key, value in batch.items()}).logits.float()
        if spec.is_regression:
            predictions = logits[:, 0]
            losses = (predictions - labels).square()
        else:
            predictions = logits.argmax(-1)
            losses = nn.functional.cross_entropy(logits, labels, reduction="none")
        return [
            {"prediction": p, "label": r["label"], "loss": x}
            for p, r, x in zip(predictions.tolist(), chunk, losses.tolist(), strict=True)
        ]

    with _evaluating(model):
        rows = _sharded(items, batch_size, run, f"glue/{spec.name}", progress)
    return _glue_result(spec, task, split, rows, sum(r["loss"] for r in rows) / len(rows))


def glue_label_scores(
    model: nn.Module, tokenizer: Any, task: str | GlueTask, records: Sequence[Record], max_length: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total log-likelihood of each class's verbaliser continuation, ``(examples, classes)``, and its token counts."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    features = [
        lm_features(tokenizer, spec.user_text(r), word, max_length, truncate_prompt=True)
        for r in records
        for word in spec.verbalizers
    ]
    sums, counts = completion_logprobs(model, collate(features, _pad_id(tokenizer)))
    return sums.view(len(records), -1), counts.view(len(records), -1)


def evaluate_glue_lm(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    records: Sequence[Record],
    *,
    split: str = "dev",
    batch_size: int = 8,
    max_length: int = 256,
    max_examples: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """A causal LM on a GLUE split by label likelihood: the class whose verbaliser has the highest total
    log-likelihood (STS-B: the expected score under the softmax of the six scores); ``loss`` is the
    gold verbaliser's mean token negative log-likelihood."""
    spec, items = glue_task(task), list(records)[:max_examples]

    def run(chunk: list[Record]) -> list[dict[str, Any]]:
        scores, counts = glue_label_scores(model, tokenizer, spec, chunk, max_length)
        if spec.is_regression:
            values = torch.tensor([float(v) for v in spec.verbalizers], dtype=scores.dtype)
            predictions = (scores.softmax(-1) @ values).tolist()
        else:
            predictions = scores.argmax(-1).tolist()
        rows = []
        for record, prediction, row_scores, row_counts in zip(chunk, predictions, scores, counts, strict=True):
            gold = spec.verbalizers.index(spec.verbalizer(record["label"]))
            rows.append(
                {
                    "prediction": prediction,
                    "label": record["label"],
                    "scores": row_scores.tolist(),
                    "nll": -float(row_scores[gold]),
                    "tokens": int(row_counts[gold]),
                }
            )
        return rows

    with _evaluating(model):
        rows = _sharded(items, batch_size, run, f"glue/{spec.name}", progress)
    return _glue_result(spec, task, split, rows, sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
