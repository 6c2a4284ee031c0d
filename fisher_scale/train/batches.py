"""Which examples each rank trains on at each step: deterministic, disjoint across ranks, resumable.

Step k of a run uses the global positions ``[k·G, (k+1)·G)`` of an endless stream of seeded
per-epoch permutations, G = workers × per-worker batch × accumulation steps. Rank r's micro-batch m
takes positions ``k·G + (m·workers + r)·b + [0, b)``. So N workers at batch b and one worker at
batch N·b see the same examples in every step, and the data position after a checkpoint is just
the step number, whatever the number of workers on resume.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fisher_scale.errors import InputError


class StepBatches:
    def __init__(self, num_examples: int, batch_size: int, accumulation: int, world: int, seed: int) -> None:
        if num_examples < 1:
            raise InputError("the training set is empty")
        self.num_examples, self.batch_size, self.accumulation, self.world = (
            num_examples,
            batch_size,
            accumulation,
            world,
        )
        self.seed = seed

    @property
    def global_batch(self) -> int:
        return self.world * self.batch_size * self.accumulation

    @lru_cache(maxsize=4)  # noqa: B019 (a handful of epochs per object, freed with it)
    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def indices(self, step: int, rank: int, micro: int) -> list[int]:
        """Example indices of rank ``rank``'s micro-batch ``micro`` in optimizer step ``step``."""
        base = step * self.global_batch + (micro * self.world + rank) * self.batch_size
        return [
            int(self._permutation(p // self.num_examples)[p % self.num_examples])
            for p in range(base, base + self.batch_size)
        ]
