"""Per-rank memory of a training run, term by term, from the config alone (nothing but a model config is read).

The model's parameters come from its meta-device skeleton with LoRA applied, the optimizer's state from its own
:class:`~fisher_scale.optim.StateLayout`, activations from :mod:`fisher_scale.plan.activations`, and what
DeepSpeed 0.19.8 allocates for a client optimizer from its source (stage_1_and_2.py, stage3.py,
partition_parameters.py, unfused_optimizer.py; the README's memory-plan section lists the rules). A run's
peak is the memory held throughout plus the largest of its phases' working sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fisher_scale.config import ExperimentConfig
from fisher_scale.plan.activations import (
    FP32,
    DecoderShape,
    Training,
    checkpointed_model,
    decoder_model,
    loss_working_set,
)

if TYPE_CHECKING:  # the optimizers load torch: read-only commands import this module and must not
    from fisher_scale.optim import StateLayout

#: DeepSpeed's defaults for the zero_optimization keys the plan reads (deepspeed/runtime/zero/config.py)
ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "sub_group_size": 1_000_000_000,
}
#: FISH scoring's vmap(grad) over a batch holds this many times what a plain backward of that batch holds (measured:
#: 2.50-2.58× on tiny-x4/x8 LoRA models at 2-8 examples × 64-256 tokens, per-example gradients included)
SCORING_FACTOR = 2.55
#: an optimizer step's temporaries, in fp32 values per element it updates (AdamW's denominator, AdaFisher's F̃
#: block and direction)
STEP_TEMPORARIES = 2


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    trainable: bool


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of the model, read once per model and optimizer setting."""

    params: tuple[Param, ...]
    layout: StateLayout
    #: the decoder's shape for the activation terms; None for a model type they do not describe
    shape: DecoderShape | None
    #: parameter names a FISH mask selects among, and its always-kept head
    candidates: frozenset[str] = frozenset()
    heads: frozenset[str] = frozenset()
    #: the mask's kept fraction of the candidates (``mask.ratio``, or the equal-budget ratio of ``mask.budget_rank``)
    kept: float = 1.0


def model_facts(cfg: ExperimentConfig) -> ModelFacts:
    """The model's parameters and the optimizer's layout, from the meta-device skeleton (only its config is read)."""
    from fisher_scale.masks import DEFAULT_HEAD, candidate_parameters, equal_budget_ratio
    from fisher_scale.models import Lora, apply_lora, model_skeleton
    from fisher_scale.optim import build_optimizer, state_layout
    from fisher_scale.tasks import task_of

    model = model_skeleton(cfg.model.name, cfg.model.task, num_labels=task_of(cfg.data.dataset).num_labels(cfg) or 2)
    shape = DecoderShape.of(model.config, causal=cfg.model.task == "causal_lm")
    if cfg.peft.enabled:
        lora = Lora(cfg.peft.rank, cfg.peft.alpha, cfg.peft.dropout, cfg.peft.target_modules)
        model = apply_lora(model, lora, task=cfg.model.task)
    optimizer = build_optimizer(cfg.optimizer.name, model, **cfg.optimizer.hyperparameters(cfg.lr))
    params = tuple(Param(n, p.numel(), p.requires_grad) for n, p in model.named_parameters())
    layout = state_layout(optimizer, model)
    if not cfg.mask.enabled:
        return ModelFacts(params, layout, shape)
    candidates, heads = candidate_parameters(
        model, cfg.mask.target, DEFAULT_HEAD if cfg.mask.head is None else cfg.mask.head
    )
    ratio = cfg.mask.ratio if cfg.mask.budget_rank is None else equal_budget_ratio(model, cfg.mask.budget_rank)
    # select_mask keeps round(ratio·(candidates + heads)) entries, the heads whole among them
    head = sum(p.numel() for p in heads.values())
    candidate = sum(p.numel() for p in candidates.values())
    kept = max(0.0, (round(ratio * (candidate + head)) - head) / candidate)
    return ModelFacts(params, layout, shape, frozenset(candidates), frozenset(heads), kept)


@dataclass
class MemoryPlan:
    """A rank's planned bytes: ``held`` (weights, state, ... kept for the whole run) and the working set of each
    phase of a step; the peak is the held total plus the largest phase."""

    held: dict[str, int]
    phases: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def peak(self) -> int:
        return sum(self.held.values()) + self.phases[self.peak_phase]


def zero_settings(cfg: ExperimentConfig) -> dict[str, int]:
    """The zero_optimization values the plan reads: ``distributed.deepspeed``'s, else DeepSpeed's defaults."""
    given = cfg.distributed.deepspeed.get("zero_optimization", {})
    return {key: int(given.get(key, default)) for key, default in ZERO_DEFAULTS.items()}


def plan_memory(cfg: ExperimentConfig, facts: ModelFacts | None = None) -> MemoryPlan:
    """The per-rank plan of ``cfg`` (``facts``: :func:`model_facts` of it, to reuse across configs that share them)."""
    facts = facts or model_facts(cfg)
    n, stage = cfg.distributed.num_workers, cfg.distributed.zero_stage
    b = 2 if cfg.model.dtype == "bfloat16" else 4
    zero = zero_settings(cfg)
    trained = [p for p in facts.params if p.trainable]
    t = sum(p.numel for p in trained)
    # the elements a rank's optimizer updates: the parameters (stage 0), one flat partition padded to a multiple
    # of 2·N (stages 1-2), or each parameter's 1/N share, padded (stage 3)
    if stage == 3:
        owned = sum(math.ceil(p.numel / n) for p in trained)
    else:
        owned = t if stage == 0 else 2 * math.ceil(t / (2 * n))
    tensors = len(trained) if stage == 0 else 1 if stage < 3 else math.ceil(owned / zero["sub_group_size"])
    bucket = b * zero["reduce_bucket_size"]  # allocated whole, whatever the gradients' size
    held = {"weights": weight_bytes(facts.params, stage, n, b, zero)}
    held["fp32 master weights"] = master_bytes(stage, b, owned)
    held["gradients"] = (owned * b + bucket) if stage == 3 else 0
    held["optimizer state"] = state_bytes(facts, owned, tensors, stage)
    held["Fisher factors"] = facts.layout.replicated
    held["mask"] = (sum(p.numel for p in trained if p.name in facts.candidates) if stage == 0 else owned) * bool(
        facts.candidates
    )
    gradients = {
        0: 2 * t * b,  # the gradients, and the flat copy DeepSpeed all-reduces (also on one rank)
        1: 2 * t * b + bucket + owned * b,  # ... with the bucket, and this rank's reduced partition
        2: t * b + bucket + owned * b,
        3: t * b,  # the concatenated bucket it reduce-scatters
    }[stage]
    # the step: stage 0 still holds the gradients; the others a flat gradient partition and its fp32 copy
    step = (t * b if stage == 0 else owned * b + 4 * owned * (b == 2)) + 4 * STEP_TEMPORARIES * owned
    phases = {"gradient reduction": gradients, "optimizer step": step}
    phases.update(activation_phases(cfg, facts, b))
    if "activations" in phases and stage == 3 and n > 1:
        phases["activations"] += gather_bytes(facts.params, b, zero)
    plan = MemoryPlan(held, phases)
    if facts.shape is None:
        plan.notes.append("no activation term for this model type: activations are not counted")
    return plan


def master_bytes(stage: int, b: int, owned: int) -> int:
    """fp32 copies of the trained weights: stages 1-2 clone the partition (also for fp32 models), stage 3 only in
    bf16 (in fp32 its master aliases the partition), stage 0 has none (the optimizer updates the parameters; bf16
    needs ZeRO 1-3, a config error)."""
    return 4 * owned * (stage in (1, 2) or (stage == 3 and b == 2))


def weight_bytes(params: tuple[Param, ...], stage: int, n: int, b: int, zero: dict[str, int]) -> int:
    """Model-dtype weights on a rank. ZeRO-3 keeps each parameter's 1/N share, whole copies of those under the
    persistence threshold, and, gathered, those used again within its reuse distance: at the turn from forward
    to backward, the last half-distance of the forward's parameters."""
    total = sum(p.numel for p in params)
    if stage < 3 or n == 1:
        return b * total
    small = sum(p.numel for p in params if p.numel <= zero["stage3_param_persistence_threshold"])
    shares = sum(math.ceil(p.numel / n) for p in params)
    return b * (shares + small + min(total - small, zero["stage3_max_reuse_distance"] // 2))


def gather_bytes(params: tuple[Param, ...], b: int, zero: dict[str, int]) -> int:
    """ZeRO-3's all-gathers in flight during a training forward and backward: the flat buffers of the parameters
    it fetches, up to ``stage3_prefetch_bucket_size`` elements (measured: a second copy of every gathered parameter
    of a model smaller than the bucket; FISH scoring gathers once, without them)."""
    fetched = sum(p.numel for p in params if p.numel > zero["stage3_param_persistence_threshold"])
    return b * min(fetched, zero["stage3_prefetch_bucket_size"])


def state_bytes(facts: ModelFacts, owned: int, tensors: int, stage: int) -> int:
    """The optimizer's per-element and per-tensor state on a rank, kept entries only where a mask applies."""
    layout = facts.layout
    trained = [p for p in facts.params if p.trainable]
    masked = sum(p.numel for p in trained if p.name in facts.candidates) / sum(p.numel for p in trained)
    per_element = layout.per_element + layout.fallback_per_element * any(p.name in layout.fallback for p in trained)
    if stage == 0:
        per_element_bytes = sum(
            p.numel
            * (layout.per_element + layout.fallback_per_element * (p.name in layout.fallback))
            * (facts.kept if p.name in facts.candidates else 1.0)
            for p in trained
        )
    else:
        per_element_bytes = owned * per_element * (1 - masked + masked * facts.kept)
    return round(per_element_bytes) + layout.per_tensor * tensors


def activation_phases(cfg: ExperimentConfig, facts: ModelFacts, b: int) -> dict[str, int]:
    """The forward-to-backward turn (saved activations and the loss's working set), with a FISH mask its scoring
    (:data:`SCORING_FACTOR` turns at its batch) and a causal LM's evaluation."""
    shape = facts.shape
    if shape is None:
        return {}
    training = Training(frozenset(cfg.peft.target_modules), cfg.peft.rank, cfg.peft.dropout, full=not cfg.peft.enabled)
    tokens = cfg.data.max_length

    def turn(batch: int, checkpointed: bool) -> int:
        saved = (checkpointed_model if checkpointed else decoder_model)(shape, b, training, batch=batch, tokens=tokens)
        return saved + loss_working_set(shape, b, batch=batch, tokens=tokens)

    phases = {"activations": turn(cfg.data.batch_size, cfg.model.activation_checkpointing)}
    if facts.candidates:  # scoring runs in eval mode, where transformers checkpoints no layer
        phases["mask scoring"] = round(SCORING_FACTOR * turn(cfg.mask.batch_size or cfg.eval.batch_size, False))
    if cfg.eval.enabled and cfg.model.task == "causal_lm":
        # no gradient: the logits of an evaluation batch, and the fp32 log-softmax of their target rows (all rows
        # at most) with its fp32 copy
        phases["evaluation"] = cfg.eval.batch_size * tokens * shape.outputs * (b + 2 * FP32)
    return phases
