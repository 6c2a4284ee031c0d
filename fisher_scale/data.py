"""Data: GSM8K and GLUE loading and their formatting into model features.

A ``source`` is either a Hugging Face hub dataset id (``openai/gsm8k``, ``nyu-mll/glue``, loaded
with the optional ``datasets`` package) or a local copy in the original formats: GSM8K jsonl files
(a file, or a folder of ``<split>.jsonl``) and the GLUE tsv dump (``<source>/<TASK>/<split>.tsv``).
A local path must exist; anything else shaped like ``owner/name`` is taken for a hub id. Loaders
return plain dicts so that records pickle to Ray workers and compare in tests.

Formatting for causal LMs puts the task text in the tokenizer's chat template when it has one
(instruct models), else in a plain ``...\\nAnswer:`` template, and trains on the completion only:
the prompt's labels are -100.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fisher_scale.errors import InputError, MissingInput, MissingPackage

GSM8K_HUB = "openai/gsm8k"
GLUE_HUB = "nyu-mll/glue"
#: label of positions that carry no loss (``torch.nn.CrossEntropyLoss``'s default ignore_index)
IGNORE_INDEX = -100

Record = dict[str, Any]
Features = dict[str, Any]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_GSM8K_FINAL = re.compile(r"^####\s*-?\$?[\d,]*\.?\d+\s*$", re.MULTILINE)


def default_data_dir() -> Path:
    """``../shared/data`` beside the repository checkout: the offline GSM8K/GLUE copies (whatever the CWD)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def is_hub_id(source: str | Path) -> bool:
    """A string shaped like ``owner/name`` that is no existing path and names no data file."""
    if isinstance(source, Path) or Path(source).exists():
        return False
    return _HUB_ID.fullmatch(source) is not None and not source.endswith((".jsonl", ".json", ".tsv"))


def _load_hub(source: str, config: str, split: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingPackage(
            f"loading {source!r} from the Hugging Face hub needs the datasets package: "
            "pip install datasets (or pip install 'fisher_scale[hub]'); or pass a local copy"
        ) from None
    return datasets.load_dataset(source, config, split=split)


# --------------------------------------------------------------------------------------------- GSM8K


def load_gsm8k(split: str = "train", source: str | Path = GSM8K_HUB) -> list[Record]:
    """GSM8K problems as ``{"question", "answer"}``; the answer is the reasoning ending in ``#### N``.

    ``source``: a hub id (config ``main``), a folder holding ``<split>.jsonl`` or one jsonl file
    (read as it is, whatever ``split`` says).
    """
    if is_hub_id(source):
        if split not in ("train", "test"):
            raise InputError(f"{source} has the splits train, test; not {split!r}")
        rows = _load_hub(str(source), "main", split)
        return [_gsm8k_record(row, f"{source}[{split}] row {index}") for index, row in enumerate(rows)]
    path = Path(source)
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            present = ", ".join(sorted(p.stem for p in path.glob("*.jsonl"))) or "none"
            raise MissingInput(f"GSM8K split {split!r} not found: no {file}; splits in {path}: {present}")
    elif path.is_file():
        file = path
    else:
        raise MissingInput(f"GSM8K source not found: {path}")
    records = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{file}:{number}: not JSON ({error})") from None
            records.append(_gsm8k_record(row, f"{file}:{number}"))
    return records


def _gsm8k_record(row: Any, where: str) -> Record:
    if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        raise InputError(f"{where}: a GSM8K record needs string fields question and answer")
    if not _GSM8K_FINAL.search(row["answer"]):
        raise InputError(f"{where}: the answer has no final '#### <number>' line")
    return {"question": row["question"], "answer": row["answer"]}


def gsm8k_user_text(question: str) -> str:
    return f"Question: {question}"


# ------------------------------------------------------------------------------------------------ GLUE


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's fields live in the tsv dump and on the hub, its labels and its LM verbaliser."""

    name: str
    folder: str
    splits: tuple[str, ...]
    #: tsv columns of sentence1, sentence2 (None: single sentence) and label; header names, or indices without a header
    columns: tuple[str | int, str | int | None, str | int]
    hub_fields: tuple[str, str | None]
    #: label strings of the tsv in class-index order (the hub's order); None for STS-B's float score in [0, 5]
    file_labels: tuple[str, ...] | None
    #: words a causal LM answers with, per class (STS-B: the rounded score)
    verbalizers: tuple[str, ...]
    #: the LM instruction; ``{s1}``/``{s2}`` are the sentences
    template: str

    @property
    def is_regression(self) -> bool:
        return self.file_labels is None

    @property
    def num_labels(self) -> int:
        """Outputs of a sequence-classification head (1 = regression)."""
        return 1 if self.file_labels is None else len(self.file_labels)

    def user_text(self, record: Record) -> str:
        return self.template.format(s1=record["sentence1"], s2=record["sentence2"])

    def verbalizer(self, label: float) -> str:
        """The LM completion of a gold label; STS-B scores round half up to 0-5."""
        return self.verbalizers[min(5, math.floor(label + 0.5)) if self.is_regression else int(label)]


_TRAIN_DEV = ("train", "dev")
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_PAIR = "Sentence 1: {s1}\nSentence 2: {s2}\n"

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            "cola",
            "CoLA",
            _TRAIN_DEV,
            (3, None, 1),
            ("sentence", None),
            _BINARY,
            ("unacceptable", "acceptable"),
            "Sentence: {s1}\nIs this sentence grammatically acceptable or unacceptable?",
        ),
        GlueTask(
            "sst2",
            "SST-2",
            _TRAIN_DEV,
            ("sentence", None, "label"),
            ("sentence", None),
            _BINARY,
            ("negative", "positive"),
            "Sentence: {s1}\nIs the sentiment of this sentence positive or negative?",
        ),
        GlueTask(
            "mrpc",
            "MRPC",
            _TRAIN_DEV,
            ("#1 String", "#2 String", "Quality"),
            ("sentence1", "sentence2"),
            _BINARY,
            ("no", "yes"),
            _PAIR + "Do the two sentences mean the same thing? Answer yes or no.",
        ),
        GlueTask(
            "qqp",
            "QQP",
            _TRAIN_DEV,
            ("question1", "question2", "is_duplicate"),
            ("question1", "question2"),
            _BINARY,
            ("no", "yes"),
            "Question 1: {s1}\nQuestion 2: {s2}\nDo the two questions ask the same thing? Answer yes or no.",
        ),
        GlueTask(
            "stsb",
            "STS-B",
            _TRAIN_DEV,
            ("sentence1", "sentence2", "score"),
            ("sentence1", "sentence2"),
            None,
            ("0", "1", "2", "3", "4", "5"),
            _PAIR + "How similar are the two sentences, from 0 (unrelated) to 5 (same meaning)?",
        ),
        GlueTask(
            "mnli",
            "MNLI",
            ("train", "dev_matched", "dev_mismatched"),
            ("sentence1", "sentence2", "gold_label"),
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("yes", "maybe", "no"),
            "Premise: {s1}\nHypothesis: {s2}\nDoes the premise entail the hypothesis? Answer yes, maybe or no.",
        ),
        GlueTask(
            "qnli",
            "QNLI",
            _TRAIN_DEV,
            ("question", "sentence", "label"),
            ("question", "sentence"),
            _NLI2,
            ("yes", "no"),
            "Question: {s1}\nSentence: {s2}\nDoes the sentence answer the question? Answer yes or no.",
        ),
        GlueTask(
            "rte",
            "RTE",
            _TRAIN_DEV,
            ("sentence1", "sentence2", "label"),
            ("sentence1", "sentence2"),
            _NLI2,
            ("yes", "no"),
            _PAIR + "Does sentence 1 entail sentence 2? Answer yes or no.",
        ),
        GlueTask(
            "wnli",
            "WNLI",
            _TRAIN_DEV,
            ("sentence1", "sentence2", "label"),
            ("sentence1", "sentence2"),
            _BINARY,
            ("no", "yes"),
            _PAIR + "Does sentence 1 entail sentence 2? Answer yes or no.",
        ),
    )
}

_SPLIT_ALIASES = {"validation": "dev", "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched"}
_HUB_SPLITS = {"train": "train", **{local: hub for hub, local in _SPLIT_ALIASES.items()}}


def _task_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def glue_task(name: str) -> GlueTask:
    """The task for a name in any usual spelling: ``SST-2``, ``sst2``, ``STS-B``, ``MNLI``, ``MNLI-m``, ``MNLI-mm``."""
    key = _task_key(name)
    task = GLUE_TASKS.get("mnli" if key in ("mnlim", "mnlimm") else key)
    if task is None:
        raise InputError(f"unknown GLUE task {name!r}; tasks: {', '.join(t.folder for t in GLUE_TASKS.values())}")
    return task


def glue_split(task: str, split: str) -> str:
    """The local split name: ``validation*`` → ``dev*``; for ``MNLI-m``/``MNLI-mm`` ``dev`` means their half."""
    spec, key = glue_task(task), _task_key(task)
    split = _SPLIT_ALIASES.get(split, split)
    if spec.name == "mnli" and split == "dev" and key != "mnli":
        split = "dev_mismatched" if key == "mnlimm" else "dev_matched"
    if split not in spec.splits:
        raise InputError(f"GLUE {spec.folder} has the splits {', '.join(spec.splits)}; not {split!r}")
    return split


def load_glue(task: str, split: str = "train", source: str | Path = GLUE_HUB) -> list[Record]:
    """GLUE examples as ``{"sentence1", "sentence2", "label"}``.

    ``sentence2`` is None for single-sentence tasks; ``label`` is the class index (the hub's order)
    or STS-B's float score. ``source``: a hub id, or the folder holding ``<TASK>/<split>.tsv``.
    """
    spec, split = glue_task(task), glue_split(task, split)
    if is_hub_id(source):
        return _glue_hub(spec, split, str(source))
    folder = Path(source) / spec.folder
    if not folder.is_dir():
        if not Path(source).is_dir():
            raise MissingInput(f"GLUE source not found: {source}")
        present = sorted(t.folder for t in GLUE_TASKS.values() if (Path(source) / t.folder).is_dir())
        raise MissingInput(f"no GLUE task {spec.folder} in {source}; tasks present: {', '.join(present) or 'none'}")
    path = folder / f"{split}.tsv"
    if not path.is_file():
        present = [s for s in spec.splits if (folder / f"{s}.tsv").is_file()]
        raise MissingInput(
            f"no {split} split for GLUE {spec.folder}: {path} missing; present: {', '.join(present) or 'none'}"
        )
    return _glue_tsv(spec, path)


def _glue_tsv(spec: GlueTask, path: Path) -> list[Record]:
    records = []
    # utf-8-sig drops MRPC's byte-order mark; quotechar=None because GLUE text holds unbalanced quotes
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quotechar=None)
        width, columns = 4, spec.columns  # CoLA, the one file without a header, has 4 fields
        if isinstance(spec.columns[0], str):
            header = next(rows, [])
            missing = [c for c in spec.columns if c is not None and c not in header]
            if missing:
                raise InputError(f"{path}:1: header lacks column(s) {missing}; it has {header}")
            width, columns = len(header), tuple(None if c is None else header.index(c) for c in spec.columns)
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if len(row) != width:
                raise InputError(f"{where}: expected {width} tab-separated fields, found {len(row)}")
            first, second, label = columns
            records.append(
                {
                    "sentence1": row[first],
                    "sentence2": None if second is None else row[second],
                    "label": _file_label(spec, row[label], where),
                }
            )
    return records


def _file_label(spec: GlueTask, text: str, where: str) -> float | int:
    if spec.file_labels is not None:
        if text not in spec.file_labels:
            raise InputError(f"{where}: label {text!r} is not one of {', '.join(spec.file_labels)}")
        return spec.file_labels.index(text)
    try:
        score = float(text)
    except ValueError:
        score = math.nan
    if not 0 <= score <= 5:
        raise InputError(f"{where}: {spec.folder} score {text!r} is not a number in [0, 5]")
    return score


def _glue_hub(spec: GlueTask, split: str, source: str) -> list[Record]:
    first, second = spec.hub_fields
    records = []
    for index, row in enumerate(_load_hub(source, spec.name, _HUB_SPLITS[split])):
        label = row["label"]
        valid = 0 <= label <= 5 if spec.is_regression else label in range(spec.num_labels)
        if not valid:
            raise InputError(f"{source}/{spec.name}[{split}] row {index}: label {label!r} outside {spec.folder}'s set")
        records.append(
            {
                "sentence1": row[first],
                "sentence2": None if second is None else row[second],
                "label": float(label) if spec.is_regression else int(label),
            }
        )
    return records


# ------------------------------------------------------------------------------------------ features


def prompt_text(tokenizer: Any, user_text: str) -> str:
    """The prompt a causal LM continues: the chat template's user turn + assistant header, else plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{user_text}\nAnswer:"


def encode_prompt(tokenizer: Any, user_text: str) -> list[int]:
    """Prompt ids; the plain template gets the tokenizer's BOS (chat templates write their own)."""
    ids = tokenizer(prompt_text(tokenizer, user_text), add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    """Completion ids + EOS; after the plain template's ``Answer:`` the text starts with a space (BPE words do)."""
    if not getattr(tokenizer, "chat_template", None):
        text = " " + text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if tokenizer.eos_token_id is None else [*ids, tokenizer.eos_token_id]


def lm_features(
    tokenizer: Any, user_text: str, completion: str, max_length: int, truncate_prompt: bool = False
) -> Features:
    """``input_ids``, ``attention_mask``, ``labels`` with loss on the completion tokens only.

    Over ``max_length`` the sequence is cut at the end (a prompt that alone fills it leaves no
    labelled token, so the example adds nothing to a token-mean loss), or, with ``truncate_prompt``,
    the prompt loses its start so that the completion (a class label) survives whole.
    """
    prompt, answer = encode_prompt(tokenizer, user_text), encode_completion(tokenizer, completion)
    if truncate_prompt:
        if len(answer) >= max_length:
            raise InputError(f"completion {completion!r} takes {len(answer)} tokens, max_length is {max_length}")
        prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
    ids = [*prompt, *answer][:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def gsm8k_features(example: Record, tokenizer: Any, max_length: int = 512) -> Features:
    """Question → reasoning and ``#### N``, loss on the answer."""
    return lm_features(tokenizer, gsm8k_user_text(example["question"]), example["answer"], max_length)


def glue_lm_features(task: str | GlueTask, record: Record, tokenizer: Any, max_length: int = 256) -> Features:
    """A GLUE example for a causal LM: instruction → the gold label's verbaliser, loss on the label tokens."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    return lm_features(tokenizer, spec.user_text(record), spec.verbalizer(record["label"]), max_length, True)


def glue_classifier_features(task: str | GlueTask, record: Record, tokenizer: Any, max_length: int = 128) -> Features:
    """Tokenised sentence (pair) for ``AutoModelForSequenceClassification``; ``labels`` a float for STS-B."""
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    encoded = tokenizer(record["sentence1"], record["sentence2"], truncation=True, max_length=max_length)
    features = {key: list(value) for key, value in encoded.items()}
    features["labels"] = float(record["label"]) if spec.is_regression else int(record["label"])
    return features


def collate(features: Sequence[Features], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of features into tensors: ids with ``pad_token_id``, labels with -100, masks with 0.

    Right padding for training and scoring; left padding for generation, so every prompt ends
    where the new tokens start. Scalar labels (classification) become a long or float vector.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    longest = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if not isinstance(values[0], list):
            batch[key] = torch.tensor(values, dtype=torch.float32 if isinstance(values[0], float) else torch.long)
            continue
        pad = IGNORE_INDEX if key == "labels" else pad_token_id if key == "input_ids" else 0
        rows = [
            [*v, *[pad] * (longest - len(v))] if padding_side == "right" else [*[pad] * (longest - len(v)), *v]
            for v in values
        ]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return batch
