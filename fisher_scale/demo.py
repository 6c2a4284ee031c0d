"""The optimizer demo: LoRA fine-tuning of a tiny byte-level causal LM on GSM8K text with each optimizer.

A quick look at the optimizers without Ray (``fisher-scale demo``; the main job is ``fisher-scale tune
tune_configs/demo.yaml``) and the harness that ``bench/optimizer_overhead.py`` times. Every optimizer sees the
same batches from the same initial weights, so the rows of its table are directly comparable.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fisher_scale.errors import InputError, MissingInput
from fisher_scale.models import Lora, TinyLM, apply_lora, tiny_causal_lm
from fisher_scale.optim import FisherOptimizer, build_optimizer, optimizer_state_bytes

#: learning rates that train the demo model with each optimizer (AdaFish's F̃ is O(1), see ALGORITHMS.md §2)
DEMO_LR = {"adamw": 3e-3, "adafisher": 3e-3, "adafisherw": 3e-3, "adafish": 0.3}


def gsm8k_byte_chunks(path: Path, seq_len: int, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``seq_len`` UTF-8 bytes of GSM8K question/answer text (ids = byte + 3, as ByT5)."""
    if not path.is_file():
        raise MissingInput(f"GSM8K file not found: {path} (expected the jsonl of ../shared/data/gsm8k)")
    needed = seq_len * batch_size * count
    stream = bytearray()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                stream += f"Question: {record['question']}\nAnswer: {record['answer']}\n\n".encode()
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise InputError(f"{path}:{number}: not a GSM8K record with question and answer ({error})") from None
            if len(stream) >= needed:
                break
    if len(stream) < needed:
        raise InputError(f"{path} holds {len(stream)} bytes of text, fewer than the {needed} the demo needs")
    ids = torch.tensor(list(stream[:needed]), dtype=torch.long).add_(3).view(count, batch_size, seq_len)
    return [{"input_ids": chunk, "labels": chunk} for chunk in ids]


@dataclass
class RunRecord:
    """What one optimizer did on the demo task."""

    optimizer: str
    lr: float
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    state_bytes: int = 0
    curvature_contrast: float | None = None

    def summary(self) -> dict[str, object]:
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "first_loss": self.losses[0],
            "final_loss": self.losses[-1],
            "median_step_s": statistics.median(self.step_seconds),
            "state_bytes": self.state_bytes,
            "median_curvature_contrast": self.curvature_contrast,
        }


class DemoRun:
    """One optimizer on its own copy of the demo model; :meth:`step` trains on one batch and times it."""

    def __init__(self, name: str, lr: float, spec: TinyLM, lora: Lora, seed: int = 0) -> None:
        self.model: nn.Module = apply_lora(tiny_causal_lm(spec, seed=seed), lora)
        self.model.train()
        self.optimizer = build_optimizer(name, self.model, lr=lr)
        self.record = RunRecord(name, lr)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.record.step_seconds.append(time.perf_counter() - start)
        self.record.losses.append(float(loss.detach()))

    def finish(self) -> RunRecord:
        self.record.state_bytes = optimizer_state_bytes(self.optimizer)
        if isinstance(self.optimizer, FisherOptimizer):
            contrast = self.optimizer.curvature_contrast().values()
            self.record.curvature_contrast = statistics.median(contrast) if contrast else None
        return self.record


def interleaved(runs: list[DemoRun], batches: list[dict[str, torch.Tensor]]) -> Iterator[int]:
    """Step every run on each batch in turn, so that machine-load drift hits all optimizers alike."""
    for index, batch in enumerate(batches):
        for run in runs:
            run.step(batch)
        yield index
