"""GSM8K / GLUE loading against independent parses of the shared files, bad input, and feature formatting."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer

from fisher_scale.data import (
    GLUE_TASKS,
    IGNORE_INDEX,
    collate,
    default_data_dir,
    encode_prompt,
    glue_classifier_features,
    glue_lm_features,
    glue_split,
    glue_task,
    gsm8k_features,
    is_hub_id,
    lm_features,
    load_glue,
    load_gsm8k,
)

DATA = default_data_dir()
GSM8K = DATA / "gsm8k"
GLUE = DATA / "glue"
needs_gsm8k = pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K copy not found in {GSM8K}")


def byte_ids(text: str) -> list[int]:
    """ByT5's ids, computed without the tokenizer: UTF-8 byte + 3 (pad 0, eos 1, unk 2)."""
    return [b + 3 for b in text.encode()]


# --------------------------------------------------------------------------------------------- GSM8K


@needs_gsm8k
@pytest.mark.parametrize("split,rows", [("train", 7473), ("test", 1319)])
def test_gsm8k_local_folder_and_file_give_every_record(split: str, rows: int) -> None:
    records = load_gsm8k(split, GSM8K)
    raw = [json.loads(line) for line in (GSM8K / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == rows
    assert records == [{"question": r["question"], "answer": r["answer"]} for r in raw]
    assert load_gsm8k("ignored", GSM8K / f"{split}.jsonl") == records
    assert load_gsm8k(split, str(GSM8K)) == records


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"question": "How many?", "answer": "2 + 3 = 5\n#### 5"}


@pytest.mark.parametrize(
    "bad,message",
    [
        ('{"question": "q", "answer": ', "not JSON"),
        ({"question": "q"}, "question and answer"),
        ({"question": 3, "answer": "#### 3"}, "question and answer"),
        ({"question": "q", "answer": "it is 5"}, "#### <number>"),
        ({"question": "q", "answer": "#### five"}, "#### <number>"),
    ],
)
def test_gsm8k_malformed_line_names_file_and_line(tmp_path: Path, bad: object, message: str) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", bad])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: .*{message}"):
        load_gsm8k("train", tmp_path)


def test_gsm8k_missing_split_and_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [GOOD])
    write_jsonl(tmp_path / "extra.jsonl", [GOOD])
    assert load_gsm8k("train", tmp_path) == [GOOD]
    with pytest.raises(FileNotFoundError, match=r"test.jsonl; splits in .*: extra, train"):
        load_gsm8k("test", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_gsm8k("train", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="train, test"):
        load_gsm8k("validation", "openai/gsm8k")  # refused before any network access


@pytest.mark.parametrize(
    "source,hub",
    [
        ("openai/gsm8k", True),
        ("nyu-mll/glue", True),
        ("data/train.jsonl", False),
        ("./gsm8k", False),
        ("/abs/gsm8k", False),
        ("a/b/c", False),
        (Path("openai/gsm8k"), False),
    ],
)
def test_hub_ids_and_paths(source: str | Path, hub: bool) -> None:
    assert is_hub_id(source) is hub


# ------------------------------------------------------------------------------------------------ GLUE

OFFICIAL_ROWS = [
    ("CoLA", "train", 8551),
    ("CoLA", "dev", 1043),
    ("SST-2", "train", 67349),
    ("SST-2", "dev", 872),
    ("MRPC", "train", 3668),
    ("MRPC", "dev", 408),
    ("RTE", "train", 2490),
    ("RTE", "dev", 277),
    ("STS-B", "train", 5749),
    ("STS-B", "dev", 1500),
    ("QNLI", "dev", 5463),
    ("WNLI", "train", 635),
    ("WNLI", "dev", 71),
]
#: the hub's class order, written out here independently of fisher_scale.data
HUB_LABELS = {
    "CoLA": {"0": 0, "1": 1},
    "SST-2": {"0": 0, "1": 1},
    "MRPC": {"0": 0, "1": 1},
    "WNLI": {"0": 0, "1": 1},
    "RTE": {"entailment": 0, "not_entailment": 1},
    "QNLI": {"entailment": 0, "not_entailment": 1},
}


def naive_glue(folder: str, path: Path) -> list[dict]:
    """An independent parse: split lines on tabs, pick columns by hand."""
    lines = path.read_text(encoding="utf-8").lstrip("\ufeff").split("\n")
    rows = [line.split("\t") for line in lines if line]
    if folder == "CoLA":
        return [{"sentence1": r[3], "sentence2": None, "label": HUB_LABELS["CoLA"][r[1]]} for r in rows]
    header, body = rows[0], rows[1:]
    col = {name: header.index(name) for name in header}
    if folder == "SST-2":
        return [{"sentence1": r[col["sentence"]], "sentence2": None, "label": int(r[col["label"]])} for r in body]
    if folder == "MRPC":
        return [{"sentence1": r[3], "sentence2": r[4], "label": int(r[0])} for r in body]
    if folder == "STS-B":
        return [{"sentence1": r[7], "sentence2": r[8], "label": float(r[9])} for r in body]
    if folder == "QNLI":
        return [{"sentence1": r[1], "sentence2": r[2], "label": HUB_LABELS["QNLI"][r[3]]} for r in body]
    return [{"sentence1": r[1], "sentence2": r[2], "label": HUB_LABELS[folder][r[3]]} for r in body]


@pytest.mark.parametrize("folder,split,rows", OFFICIAL_ROWS)
def test_glue_local_official_counts_labels_and_fields(folder: str, split: str, rows: int) -> None:
    path = GLUE / folder / f"{split}.tsv"
    if not path.is_file():
        pytest.skip(f"GLUE copy not found: {path}")
    records = load_glue(folder, split, GLUE)
    assert len(records) == rows
    assert records == naive_glue(folder, path)
    labels = {r["label"] for r in records}
    if folder == "STS-B":
        assert all(isinstance(v, float) for v in labels) and min(labels) == 0.0 and max(labels) == 5.0
    else:
        assert labels == {0, 1} and all(type(v) is int for v in labels)
    if glue_task(folder).hub_fields[1] is None:
        assert all(r["sentence2"] is None for r in records)


def test_glue_validation_is_dev() -> None:
    if not (GLUE / "RTE" / "dev.tsv").is_file():
        pytest.skip(f"GLUE copy not found in {GLUE}")
    assert load_glue("rte", "validation", GLUE) == load_glue("RTE", "dev", str(GLUE))


def test_glue_missing_task_and_split_list_what_exists() -> None:
    if not (GLUE / "QNLI" / "dev.tsv").is_file():
        pytest.skip(f"GLUE copy not found in {GLUE}")
    with pytest.raises(FileNotFoundError, match=r"no train split for GLUE QNLI.*present: dev$"):
        load_glue("QNLI", "train", GLUE)
    with pytest.raises(FileNotFoundError, match=r"no GLUE task QQP .*tasks present: CoLA, MRPC, QNLI, RTE, SST-2"):
        load_glue("QQP", "train", GLUE)


def test_glue_task_and_split_names() -> None:
    assert [glue_task(n).name for n in ("SST-2", "sst2", "STS-B", "stsb", "MNLI", "MNLI-m", "mnli-mm", "QNLI")] == [
        "sst2",
        "sst2",
        "stsb",
        "stsb",
        "mnli",
        "mnli",
        "mnli",
        "qnli",
    ]
    assert glue_split("MNLI-m", "dev") == "dev_matched"
    assert glue_split("MNLI-mm", "validation") == "dev_mismatched"
    assert glue_split("MNLI", "validation_mismatched") == "dev_mismatched"
    with pytest.raises(ValueError, match="train, dev_matched, dev_mismatched; not 'dev'"):
        glue_split("MNLI", "dev")
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'; tasks: CoLA, SST-2"):
        glue_task("squad")
    with pytest.raises(ValueError, match="splits train, dev; not 'test'"):
        load_glue("SST-2", "test", GLUE)
    assert {t.name: t.num_labels for t in GLUE_TASKS.values()} == {
        "cola": 2,
        "sst2": 2,
        "mrpc": 2,
        "qqp": 2,
        "stsb": 1,
        "mnli": 3,
        "qnli": 2,
        "rte": 2,
        "wnli": 2,
    }


def write_tsv(path: Path, lines: list[str], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


MNLI_HEADER = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"


def mnli_line(i: int, label: str) -> str:
    return f"{i}\tp\tq\tfiction\t()\t()\t()\t()\tpremise {i}\thypothesis {i}\t{label}\t{label}"


def test_glue_mnli_and_qqp_formats_and_the_hub_label_order(tmp_path: Path) -> None:
    labels = ["contradiction", "entailment", "neutral"]
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", [MNLI_HEADER] + [mnli_line(i, x) for i, x in enumerate(labels)])
    records = load_glue("MNLI-mm", "dev", tmp_path)
    assert [r["label"] for r in records] == [2, 0, 1]  # entailment 0, neutral 1, contradiction 2
    assert records[1] == {"sentence1": "premise 1", "sentence2": "hypothesis 1", "label": 0}
    write_tsv(
        tmp_path / "QQP" / "train.tsv",
        ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tWhy?\tHow?\t0", '1\t3\t4\tA "q\tB\t1'],
    )
    assert load_glue("QQP", "train", tmp_path) == [
        {"sentence1": "Why?", "sentence2": "How?", "label": 0},
        {"sentence1": 'A "q', "sentence2": "B", "label": 1},
    ]


def test_glue_reads_mrpc_with_a_byte_order_mark(tmp_path: Path) -> None:
    write_tsv(
        tmp_path / "MRPC" / "dev.tsv",
        ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", '1\t7\t8\t"Quoted, unbalanced.\tOther.'],
        bom=True,
    )
    assert load_glue("mrpc", "dev", tmp_path) == [
        {"sentence1": '"Quoted, unbalanced.', "sentence2": "Other.", "label": 1}
    ]


@pytest.mark.parametrize(
    "folder,lines,line,message",
    [
        ("SST-2", ["sentence\tlabel", "good .\t1", "no label"], 3, "expected 2 tab-separated fields, found 1"),
        ("SST-2", ["sentence\tlabel", "good .\t1", "odd .\t2"], 3, "label '2' is not one of 0, 1"),
        ("RTE", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tneutral"], 2, "not one of entailment, not_entailment"),
        ("CoLA", ["gj04\t1\t\tfine.", "gj04\t1\t*"], 2, "expected 4 tab-separated fields, found 3"),
        (
            "STS-B",
            ["index\tsentence1\tsentence2\tscore", "0\ta\tb\t5.5"],
            2,
            r"score '5.5' is not a number in \[0, 5\]",
        ),
        ("STS-B", ["index\tsentence1\tsentence2\tscore", "0\ta\tb\thigh"], 2, "score 'high'"),
        ("SST-2", ["text\tlabel", "good .\t1"], 1, "header lacks column"),
    ],
)
def test_glue_malformed_line_or_label_names_file_and_line(
    tmp_path: Path, folder: str, lines: list[str], line: int, message: str
) -> None:
    path = write_tsv(tmp_path / folder / "train.tsv", lines)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:{line}: .*{message}"):
        load_glue(folder, "train", tmp_path)


# -------------------------------------------------------------------------------------------- features


def test_gsm8k_features_train_on_the_answer_only() -> None:
    tokenizer = ByT5Tokenizer()
    example = {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}
    prompt = byte_ids("Question: What is 2+3?\nAnswer:")
    answer = [*byte_ids(" 2+3=5\n#### 5"), 1]
    features = gsm8k_features(example, tokenizer, max_length=512)
    assert features["input_ids"] == prompt + answer
    assert features["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert features["attention_mask"] == [1] * len(prompt + answer)
    cut = gsm8k_features(example, tokenizer, max_length=40)
    assert cut["input_ids"] == (prompt + answer)[:40] and cut["labels"] == features["labels"][:40]


def test_chat_template_is_used_when_the_tokenizer_has_one() -> None:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    features = gsm8k_features({"question": "Why?", "answer": "#### 1"}, tokenizer)
    prompt = [*byte_ids("<user>Question: Why?"), 1, *byte_ids("<assistant>")]  # "</s>" is ByT5's EOS token
    assert features["input_ids"] == [*prompt, *byte_ids("#### 1"), 1]  # no space before the answer
    assert features["labels"] == [IGNORE_INDEX] * len(prompt) + [*byte_ids("#### 1"), 1]


def test_glue_lm_features_keep_the_label_when_truncating() -> None:
    tokenizer = ByT5Tokenizer()
    record = {"sentence1": "a very long sentence " * 20, "sentence2": None, "label": 1}
    features = glue_lm_features("SST-2", record, tokenizer, max_length=64)
    label = [*byte_ids(" positive"), 1]
    assert len(features["input_ids"]) == 64
    assert features["input_ids"][-len(label) :] == label
    assert [t for t in features["labels"] if t != IGNORE_INDEX] == label
    prompt = encode_prompt(tokenizer, glue_task("sst2").user_text(record))
    assert features["input_ids"][: -len(label)] == prompt[-(64 - len(label)) :]  # the prompt lost its start
    stsb = glue_lm_features("stsb", {"sentence1": "a", "sentence2": "b", "label": 3.5}, tokenizer)
    assert [t for t in stsb["labels"] if t != IGNORE_INDEX] == [*byte_ids(" 4"), 1]  # 3.5 rounds half up
    with pytest.raises(ValueError, match="max_length is 5"):
        lm_features(tokenizer, "x", "positive", max_length=5, truncate_prompt=True)


def test_glue_classifier_features_and_collate() -> None:
    tokenizer = ByT5Tokenizer()
    pair = glue_classifier_features("rte", {"sentence1": "ab", "sentence2": "c", "label": 1}, tokenizer)
    single = glue_classifier_features("stsb", {"sentence1": "xyz", "sentence2": "w", "label": 2}, tokenizer)
    assert pair == {"input_ids": [*byte_ids("ab"), 1, *byte_ids("c"), 1], "attention_mask": [1] * 5, "labels": 1}
    assert single["labels"] == 2.0 and isinstance(single["labels"], float)
    batch = collate([pair, {**single, "labels": 0}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[*pair["input_ids"], 0], single["input_ids"]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0], [1] * 6]
    assert batch["labels"].dtype == torch.long
    assert collate([single], 0)["labels"].dtype == torch.float32


def test_collate_pads_labels_with_ignore_index_left_or_right() -> None:
    short = {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [IGNORE_INDEX, 6]}
    long = {"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 8, 9]}
    right = collate([short, long], pad_token_id=3)
    assert right["input_ids"].tolist() == [[5, 6, 3], [7, 8, 9]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX], [IGNORE_INDEX, 8, 9]]
    left = collate([short, long], pad_token_id=3, padding_side="left")
    assert left["input_ids"].tolist() == [[3, 5, 6], [7, 8, 9]]
    assert left["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        collate([short], 0, padding_side="middle")


# ------------------------------------------------------------------------------------- hub code path


def test_hub_sources_map_splits_fields_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path with ``datasets.load_dataset`` replaced by rows shaped like the hub's (no network)."""
    calls = []
    hub_rows = {
        ("openai/gsm8k", "main", "test"): [{"question": "q", "answer": "a\n#### 4"}],
        ("nyu-mll/glue", "mnli", "validation_mismatched"): [{"premise": "p", "hypothesis": "h", "label": 2}],
        ("nyu-mll/glue", "sst2", "validation"): [{"sentence": "s", "label": 1, "idx": 0}],
        ("nyu-mll/glue", "stsb", "train"): [{"sentence1": "a", "sentence2": "b", "label": 3.8}],
        ("nyu-mll/glue", "rte", "train"): [{"sentence1": "a", "sentence2": "b", "label": -1}],
    }

    def load_hub(source: str, config: str, split: str) -> list[dict]:
        calls.append((source, config, split))
        return hub_rows[(source, config, split)]

    monkeypatch.setattr("fisher_scale.data._load_hub", load_hub)
    assert load_gsm8k("test", "openai/gsm8k") == [{"question": "q", "answer": "a\n#### 4"}]
    assert load_glue("MNLI-mm", "dev", "nyu-mll/glue") == [{"sentence1": "p", "sentence2": "h", "label": 2}]
    assert load_glue("SST-2", "validation", "nyu-mll/glue") == [{"sentence1": "s", "sentence2": None, "label": 1}]
    assert load_glue("STS-B", "train", "nyu-mll/glue") == [{"sentence1": "a", "sentence2": "b", "label": 3.8}]
    with pytest.raises(ValueError, match=r"nyu-mll/glue/rte\[train\] row 0: label -1 outside RTE's set"):
        load_glue("RTE", "train", "nyu-mll/glue")
    assert calls[:4] == [
        ("openai/gsm8k", "main", "test"),
        ("nyu-mll/glue", "mnli", "validation_mismatched"),
        ("nyu-mll/glue", "sst2", "validation"),
        ("nyu-mll/glue", "stsb", "train"),
    ]


def test_hub_source_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install datasets"):
        load_gsm8k("train", "openai/gsm8k")
