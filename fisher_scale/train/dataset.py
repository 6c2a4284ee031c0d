"""The experiment's training set on a worker: features, batches by index, the loss and evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from fisher_scale.config import ExperimentConfig
from fisher_scale.data import IGNORE_INDEX, collate
from fisher_scale.tasks import task_of


def _has_target(features: dict[str, Any]) -> bool:
    return any(label != IGNORE_INDEX for label in features["labels"][1:])


def scoring_share(samples: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``samples`` scoring examples: sizes differ by at most one and
    the shares of all ranks cover every example once (1024 on 3 ranks: 341, 341, 342)."""
    return range(samples * rank // world, samples * (rank + 1) // world)


#: the last training set this process tokenised, by its data and model config: (features, examples dropped)
_TOKENISED: dict[tuple[str, str], tuple[list[dict[str, Any]], int]] = {}


class TrainingSet:
    """Tokenised training examples; every rank builds the same list, :class:`StepBatches` picks indices."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        from fisher_scale.models import load_tokenizer

        self.cfg = cfg
        self.task = task_of(cfg.data.dataset)
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.causal = cfg.model.task == "causal_lm"
        self.num_labels = self.task.num_labels(cfg)
        key = (cfg.data.model_dump_json(), cfg.model.model_dump_json())
        if key not in _TOKENISED:  # a process that trains again (a reused Tune actor) tokenises the set once
            _TOKENISED.clear()
            records = self.task.training_records(self.task.source(cfg))[: cfg.data.max_train_examples]
            features = [self.task.features(r, self.tokenizer, cfg) for r in records]
            # a causal LM's example whose prompt fills data.max_length has no target token: nothing to learn, and a
            # step made only of such examples would have no loss
            kept = [f for f in features if not self.causal or _has_target(f)]
            _TOKENISED[key] = (kept, len(features) - len(kept))
        self.features, self.dropped = _TOKENISED[key]  # dropped: examples left out for that reason
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def __len__(self) -> int:
        return len(self.features)

    def collate(self, indices: list[int]) -> dict[str, Tensor]:
        return collate([self.features[i] for i in indices], self.pad_id)

    def target_count(self, batch: dict[str, Tensor]) -> int:
        """Items the loss averages over: predicted tokens of a causal LM, examples of a classifier."""
        if self.causal:
            return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return int(batch["labels"].shape[0])

    def loss(self, model: nn.Module, batch: dict[str, Tensor], items: float) -> Tensor:
        """Sum of the batch's per-item losses divided by ``items`` (not by the batch's own count)."""
        if self.causal:
            return model(**batch, num_items_in_batch=items).loss
        return model(**batch).loss * (self.target_count(batch) / items)

    def scoring_batches(self, share: range) -> Iterator[dict[str, Tensor]]:
        """FISH scoring examples: a rank's :func:`scoring_share` of the first ``mask.samples`` training
        examples (repeated when the set is smaller), so the ranks together score what one process would."""
        chosen = [i % len(self) for i in share]
        size = self.cfg.mask.batch_size or self.cfg.eval.batch_size
        for start in range(0, len(chosen), size):
            yield self.collate(chosen[start : start + size])

    def evaluate(self, model: nn.Module, rank: int, world: int) -> dict[str, Any]:
        """The dataset's metrics on its evaluation split (sharded over ranks), or nothing when disabled."""
        if not self.cfg.eval.enabled:
            return {}
        model.eval()
        try:
            with torch.no_grad():
                return self.task.evaluate(self.cfg, model, self.tokenizer)
        finally:
            model.train()
