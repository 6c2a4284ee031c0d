"""GSM8K answer extraction on every gold answer, GLUE metrics against hand computations and scipy/sklearn,
end-to-end evaluation of tiny trained models checked against unbatched recomputation, and sharded
evaluation (2 gloo ranks) against one process."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from fisher_scale.data import (
    IGNORE_INDEX,
    collate,
    default_data_dir,
    encode_prompt,
    glue_task,
    gsm8k_features,
    gsm8k_user_text,
    load_glue,
)
from fisher_scale.eval import (
    evaluate_glue_classifier,
    evaluate_glue_lm,
    evaluate_gsm8k,
    extract_answer,
    glue_metric_prefix,
    glue_metrics,
    gsm8k_accuracy,
)
from fisher_scale.models import load_model, load_tokenizer

from . import plants

DATA = default_data_dir()


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and lose a lot when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_gold_answer_is_extracted(split: str) -> None:
    path = DATA / "gsm8k" / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K copy not found: {path}")
    answers = [json.loads(line)["answer"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(answers) == {"train": 7473, "test": 1319}[split]
    for answer in answers:
        gold = Fraction(answer.split("####")[-1].strip().replace(",", ""))
        extracted = extract_answer(answer)
        assert extracted is not None and Fraction(extracted) == gold, answer


@pytest.mark.parametrize(
    "text,expected",
    [
        ("#### 18", "18"),
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("The answer is 72.", "72"),
        ("So she earned $1,234.50 in total.", "1234.5"),
        ("It costs $ 5", "5"),
        ("The temperature is -5 degrees", "-5"),
        ("Change: -$3.", "-3"),
        ("16 - 3 - 4 = 9 eggs", "9"),
        ("16-3-4=9", "9"),
        ("He pays 3.50 each", "3.5"),
        ("Total: 18.00", "18"),
        ("Total: 18.0.", "18"),
        ("100 apples", "100"),
        ("0.0", "0"),
        ("-0", "0"),
        ("#### 5\n\nQuestion: a train has 40 seats", "5"),
        ("The answer is 12 and then 13 more", "13"),
        ("(2 + 3) - 1 = 4", "4"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer_from_model_style_outputs(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_normalised_answers_compare_equal() -> None:
    assert extract_answer("18") == extract_answer("18.0") == extract_answer("$18.00") == extract_answer("#### 18")
    assert gsm8k_accuracy(["18", None, "3.5", "7"], ["18", "5", "3.5", "8"]) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        gsm8k_accuracy(["1"], [])


# ------------------------------------------------------------------------------------------- metrics

PREDICTED = [1, 1, 0, 1, 0, 0, 1, 1]
GOLD = [1, 0, 0, 1, 1, 0, 1, 0]  # tp 3, fp 2, fn 1, tn 2


def test_glue_metrics_against_hand_computation() -> None:
    tp, fp, fn, tn = 3, 2, 1, 2
    accuracy = (tp + tn) / 8
    f1 = 2 * tp / (2 * tp + fp + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert glue_metrics("CoLA", PREDICTED, GOLD) == {"matthews_corr": pytest.approx(mcc)}
    for task in ("MRPC", "qqp"):
        assert glue_metrics(task, PREDICTED, GOLD) == {"accuracy": accuracy, "f1": pytest.approx(f1)}
    for task in ("SST-2", "RTE", "QNLI", "WNLI", "MNLI", "MNLI-m", "MNLI-mm"):
        assert glue_metrics(task, PREDICTED, GOLD) == {"accuracy": accuracy}
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    pearson = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    # ranks of y are 1, 3, 2, 4: Spearman = 1 - 6 Σd² / (n(n²-1)) = 1 - 6·2/60
    assert glue_metrics("STS-B", x, y) == {"pearson": pytest.approx(pearson), "spearman": pytest.approx(0.8)}
    with pytest.raises(ValueError, match="equally many"):
        glue_metrics("sst2", [1], [1, 0])


def test_glue_metrics_match_scipy_and_sklearn() -> None:
    generator = torch.Generator().manual_seed(0)
    predicted, gold = torch.randint(0, 2, (200,), generator=generator), torch.randint(0, 2, (200,), generator=generator)
    p, g = predicted.tolist(), gold.tolist()
    assert glue_metrics("cola", p, g)["matthews_corr"] == pytest.approx(matthews_corrcoef(g, p))
    assert glue_metrics("mrpc", p, g) == {"accuracy": accuracy_score(g, p), "f1": pytest.approx(f1_score(g, p))}
    three_p, three_g = (torch.randint(0, 3, (200,), generator=generator).tolist() for _ in range(2))
    assert glue_metrics("mnli", three_p, three_g) == {"accuracy": accuracy_score(three_g, three_p)}
    scores, truth = torch.rand(100, generator=generator).tolist(), torch.rand(100, generator=generator).tolist()
    assert glue_metrics("stsb", scores, truth) == {
        "pearson": pytest.approx(pearsonr(scores, truth)[0]),
        "spearman": pytest.approx(spearmanr(scores, truth)[0]),
    }


def test_metric_names() -> None:
    assert glue_metric_prefix("SST-2") == "glue/sst2"
    assert glue_metric_prefix("STS-B", "validation") == "glue/stsb"
    assert glue_metric_prefix("MNLI-m") == "glue/mnli_m"
    assert glue_metric_prefix("MNLI", "dev_mismatched") == "glue/mnli_mm"
    assert glue_metric_prefix("mnli-mm", "validation") == "glue/mnli_mm"


# ------------------------------------------------------------------------------------------ end to end


def train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_lm_memorises_gsm8k_style_answers_and_scores_all_correct() -> None:
    """Training format and generation prompt agree, left padding works, the marker is extracted."""
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny", seed=0)
    examples = [{"question": f"What is {a} plus {b}?", "answer": f"#### {a + b}"} for a, b in [(2, 3), (10, 7), (4, 4)]]
    examples.append({"question": "What is 21 plus 5?", "answer": "#### 26"})
    train(model, [collate([gsm8k_features(e, tokenizer) for e in examples], 0)], steps=150, lr=3e-3)
    result = evaluate_gsm8k(model, tokenizer, examples, batch_size=3, max_new_tokens=12, progress=False)
    assert [p["generated"] for p in result.predictions] == [" " + e["answer"] for e in examples]
    assert result.metrics["gsm8k/accuracy"] == 1.0 and result.metrics["gsm8k/loss"] < 0.1
    assert model.training  # evaluation restored the mode it found


def test_gsm8k_slice_trains_and_evaluates_end_to_end() -> None:
    if not (DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip(f"GSM8K copy not found in {DATA / 'gsm8k'}")
    from fisher_scale.data import load_gsm8k

    tokenizer, model = load_tokenizer("tiny"), load_model("tiny", seed=1)
    batch = collate([gsm8k_features(e, tokenizer, 512) for e in load_gsm8k("train", DATA / "gsm8k")[:4]], 0)
    losses = train(model, [batch], steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    model.eval()
    test = load_gsm8k("test", DATA / "gsm8k")
    result = evaluate_gsm8k(
        model, tokenizer, test, batch_size=3, max_new_tokens=6, max_length=512, max_examples=5, progress=False
    )
    assert len(result.predictions) == 5 and not model.training
    for example, row in zip(test[:5], result.predictions, strict=True):
        # one by one, unpadded, straight through generate
        prompt = torch.tensor([encode_prompt(tokenizer, gsm8k_user_text(example["question"]))])
        alone = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=0)
        assert row["generated"] == tokenizer.decode(alone[0, prompt.shape[1] :], skip_special_tokens=True)
        assert row["gold"] == extract_answer(example["answer"]) and row["predicted"] == extract_answer(row["generated"])
        # the loss of one example is HF's own mean token loss on it
        with torch.no_grad():
            hf_loss = model(**collate([gsm8k_features(example, tokenizer, 512)], 0)).loss
        assert row["nll"] / row["tokens"] == pytest.approx(float(hf_loss), rel=1e-5)
    rows = result.predictions
    assert result.metrics["gsm8k/accuracy"] == sum(r["predicted"] == r["gold"] for r in rows) / 5
    assert result.metrics["gsm8k/loss"] == pytest.approx(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))


def test_sst2_slice_trains_an_encoder_and_evaluates_end_to_end() -> None:
    if not (DATA / "glue" / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"SST-2 copy not found in {DATA / 'glue'}")
    from fisher_scale.data import glue_classifier_features

    tokenizer = load_tokenizer("tiny-encoder")
    model = load_model("tiny-encoder", "classification", num_labels=2, seed=0)
    records = load_glue("SST-2", "train", DATA / "glue")[:16]
    features = [glue_classifier_features("sst2", r, tokenizer, 64) for r in records]
    losses = train(model, [collate(features[:8], 0), collate(features[8:], 0)], steps=60, lr=1e-3)
    assert losses[-1] < losses[0]
    dev = load_glue("SST-2", "dev", DATA / "glue")
    result = evaluate_glue_classifier(
        model, tokenizer, "SST-2", dev, batch_size=8, max_length=64, max_examples=24, progress=False
    )
    predictions, hf_losses = [], []
    model.eval()  # as the evaluation runs it: no dropout
    with torch.no_grad():
        for record in dev[:24]:
            one = collate([glue_classifier_features("sst2", record, tokenizer, 64)], 0)
            output = model(**one)
            predictions.append(int(output.logits.argmax()))
            hf_losses.append(float(output.loss))
    gold = [r["label"] for r in dev[:24]]
    assert [r["prediction"] for r in result.predictions] == predictions
    assert result.metrics == {
        "glue/sst2/accuracy": accuracy_score(gold, predictions),
        "glue/sst2/loss": pytest.approx(sum(hf_losses) / 24, rel=1e-5),
        "glue/sst2/majority_share": max(predictions.count(c) for c in (0, 1)) / 24,
    }
    train_result = evaluate_glue_classifier(model, tokenizer, "SST-2", records, max_length=64, progress=False)
    assert train_result.metrics["glue/sst2/accuracy"] == 1.0  # the 16 training sentences are memorised


def explicit_label_loglik(model: torch.nn.Module, tokenizer: Any, prompt: list[int], word: str) -> tuple[float, int]:
    """log p(" word</s>" | prompt), one sequence, a loop over its tokens."""
    continuation = [*tokenizer(" " + word, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(continuation)), len(continuation)


SYNTHETIC_SST2 = [
    {"sentence1": "a charming, funny film", "sentence2": None, "label": 1},
    {"sentence1": "dull and lifeless", "sentence2": None, "label": 0},
    {"sentence1": "one of the year's best", "sentence2": None, "label": 1},
    {"sentence1": "a mess", "sentence2": None, "label": 0},
    {"sentence1": "it works", "sentence2": None, "label": 1},
]


def test_causal_lm_glue_picks_the_most_likely_verbaliser() -> None:
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny", seed=2)
    spec = glue_task("sst2")
    result = evaluate_glue_lm(model, tokenizer, "SST-2", SYNTHETIC_SST2, batch_size=2, progress=False)
    nll = tokens = 0
    for record, row in zip(SYNTHETIC_SST2, result.predictions, strict=True):
        prompt = encode_prompt(tokenizer, spec.user_text(record))
        scored = [explicit_label_loglik(model, tokenizer, prompt, word) for word in ("negative", "positive")]
        assert row["scores"] == pytest.approx([s for s, _ in scored], rel=1e-5)
        assert row["prediction"] == max((0, 1), key=lambda c: scored[c][0])
        nll, tokens = nll - scored[record["label"]][0], tokens + scored[record["label"]][1]
    predicted = [r["prediction"] for r in result.predictions]
    assert result.metrics == {
        "glue/sst2/accuracy": accuracy_score([r["label"] for r in SYNTHETIC_SST2], predicted),
        "glue/sst2/loss": pytest.approx(nll / tokens, rel=1e-5),
        "glue/sst2/majority_share": max(predicted.count(c) for c in (0, 1)) / 5,
    }


def test_causal_lm_stsb_predicts_the_expected_score() -> None:
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny", seed=3)
    records = [
        {"sentence1": "A man is dancing.", "sentence2": "A man dances.", "label": 4.6},
        {"sentence1": "A cat sleeps.", "sentence2": "Stocks fell.", "label": 0.2},
        {"sentence1": "Kids play.", "sentence2": "Children are playing.", "label": 3.4},
    ]
    result = evaluate_glue_lm(model, tokenizer, "STS-B", records, progress=False)
    expected = []
    for row in result.predictions:
        weights = [math.exp(s) for s in row["scores"]]
        expected.append(sum(w * v for w, v in zip(weights, range(6), strict=True)) / sum(weights))
    assert [r["prediction"] for r in result.predictions] == pytest.approx(expected)
    truth = [r["label"] for r in records]
    assert result.metrics["glue/stsb/pearson"] == pytest.approx(pearsonr(expected, truth)[0])
    assert set(result.metrics) == {"glue/stsb/pearson", "glue/stsb/spearman", "glue/stsb/loss"}


def test_regression_encoder_reports_squared_error() -> None:
    tokenizer, model = load_tokenizer("tiny-encoder"), load_model("tiny-encoder", "classification", num_labels=1)
    records = [
        {"sentence1": "a b", "sentence2": "a c", "label": 3.0},
        {"sentence1": "x", "sentence2": "y", "label": 0.5},
    ]
    result = evaluate_glue_classifier(model, tokenizer, "stsb", records, progress=False)
    model.eval()
    with torch.no_grad():
        outputs = [float(model(**collate([f], 0)).logits) for f in (glue_features(r, tokenizer) for r in records)]
    assert [r["prediction"] for r in result.predictions] == pytest.approx(outputs, rel=1e-5)
    mse = sum((o - r["label"]) ** 2 for o, r in zip(outputs, records, strict=True)) / 2
    assert result.metrics["glue/stsb/loss"] == pytest.approx(mse, rel=1e-5)


def test_classifier_reports_the_share_of_its_most_frequent_prediction() -> None:
    """``glue/<task>/majority_share``, counted here from the per-example predictions; 1.0 = one class for all."""
    tokenizer, model = load_tokenizer("tiny-encoder"), load_model("tiny-encoder", "classification", num_labels=2)
    result = evaluate_glue_classifier(model, tokenizer, "sst2", SYNTHETIC_SST2, progress=False)
    predictions = [r["prediction"] for r in result.predictions]
    share = max(predictions.count(c) for c in set(predictions)) / len(predictions)
    assert result.metrics["glue/sst2/majority_share"] == share
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([0.0, 1e4]))  # every sentence class 1
    result = evaluate_glue_classifier(model, tokenizer, "sst2", SYNTHETIC_SST2, progress=False)
    assert result.metrics["glue/sst2/majority_share"] == 1.0 and result.metrics["glue/sst2/accuracy"] == 0.6


def glue_features(record: dict, tokenizer: Any) -> dict:
    from fisher_scale.data import glue_classifier_features

    features = glue_classifier_features("stsb", record, tokenizer)
    del features["labels"]
    return features


def test_max_examples_and_progress_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress bar is drawn on a terminal only (a Ray worker's output is a log file), and not when turned off."""
    tokenizer, model = load_tokenizer("tiny-encoder"), load_model("tiny-encoder", "classification", num_labels=2)
    result = evaluate_glue_classifier(model, tokenizer, "sst2", SYNTHETIC_SST2, max_examples=3, batch_size=2)
    assert len(result.predictions) == 3
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    evaluate_glue_classifier(model, tokenizer, "sst2", SYNTHETIC_SST2, max_examples=3, batch_size=2)
    assert "glue/sst2" in capsys.readouterr().err
    evaluate_glue_classifier(model, tokenizer, "sst2", SYNTHETIC_SST2, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------- sharding

SYNTHETIC_GSM8K = [{"question": f"What is {a} times 3?", "answer": f"#### {3 * a}"} for a in range(5)]


def evaluations() -> dict[str, Any]:
    """The same evaluations in one process and in every rank of a group: 5 examples, uneven shards."""
    tokenizer = load_tokenizer("tiny")
    lm, encoder = load_model("tiny", seed=4), load_model("tiny-encoder", "classification", num_labels=2, seed=4)
    out = {
        "gsm8k": evaluate_gsm8k(lm, tokenizer, SYNTHETIC_GSM8K, batch_size=2, max_new_tokens=6),
        "encoder": evaluate_glue_classifier(encoder, tokenizer, "sst2", SYNTHETIC_SST2, batch_size=2),
        "lm": evaluate_glue_lm(lm, tokenizer, "sst2", SYNTHETIC_SST2, batch_size=2),
    }
    return {name: (result.metrics, result.predictions) for name, result in out.items()}


class TerminalText(io.StringIO):
    def isatty(self) -> bool:
        return True


def sharded_worker(rank: int, world: int, port: int, out: str, prepare: Callable[[], None] | None) -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    if prepare is not None:
        prepare()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stderr = TerminalText()  # as on a terminal: rank 0 draws its progress bar, the others do not
        with contextlib.redirect_stderr(stderr):
            results = evaluations()
        torch.save({"results": results, "stderr": stderr.getvalue()}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def sharded_evaluations(out: Path, prepare: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """What each of two gloo ranks reports for ``evaluations()``, with ``prepare`` run first in each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(sharded_worker, args=(2, port, str(out), prepare), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def mismatches(single: dict[str, Any], ranks: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(evaluation, field) pairs in which a rank's metrics or its per-example records, in input order, differ."""
    found = set()
    for name, (metrics, predictions) in single.items():
        for rank in ranks:
            sharded_metrics, sharded_predictions = rank["results"][name]
            if sharded_metrics != pytest.approx(metrics, rel=1e-6):
                found.add((name, "metrics"))
            for key in ("generated", "prediction", "gold", "label", "question"):
                if [p.get(key) for p in sharded_predictions] != [p.get(key) for p in predictions]:
                    found.add((name, key))
            for key in ("loss", "nll"):  # per example: batches are padded differently in one process and in two
                values = [p[key] for p in predictions if key in p]
                if values and [p[key] for p in sharded_predictions] != pytest.approx(values, rel=1e-4):
                    found.add((name, key))
    return found


def test_sharded_evaluation_over_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    single = evaluations()
    ranks = sharded_evaluations(tmp_path / "sharded")
    assert not mismatches(single, ranks)
    assert "gsm8k" in ranks[0]["stderr"] and "glue/sst2" in ranks[0]["stderr"]
    assert "gsm8k" not in ranks[1]["stderr"] and "glue/sst2" not in ranks[1]["stderr"]
    # the same comparison catches results put back one position off within a rank's share, in every evaluation
    planted = mismatches(single, sharded_evaluations(tmp_path / "planted", plants.rotated_evaluation_share))
    assert {name for name, _ in planted} == set(single), planted


def test_label_positions_are_the_only_scored_ones() -> None:
    """A completion's log-likelihood ignores the prompt and the padding (right-padded batch of unequal rows)."""
    from fisher_scale.eval import completion_logprobs

    model = load_model("tiny", seed=5)
    rows = [
        {"input_ids": [10, 11, 12, 13], "attention_mask": [1] * 4, "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
        {"input_ids": [20, 21], "attention_mask": [1, 1], "labels": [IGNORE_INDEX, 21]},
    ]
    sums, counts = completion_logprobs(model, collate(rows, 0))
    with torch.no_grad():
        first = model(input_ids=torch.tensor([[10, 11, 12, 13]])).logits[0].double().log_softmax(-1)
        second = model(input_ids=torch.tensor([[20, 21]])).logits[0].double().log_softmax(-1)
    assert sums.tolist() == pytest.approx([float(first[1, 12] + first[2, 13]), float(second[0, 21])], rel=1e-5)
    assert counts.tolist() == [2, 1]
