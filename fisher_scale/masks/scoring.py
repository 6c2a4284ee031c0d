"""FISH scores (ALGORITHMS.md §3): per-example squared gradients, batched with ``torch.func``.

``score_j = Σ_i (∂ loss(x_i, y_i) / ∂θ_j)²`` over single examples (batch-size-1 semantics, dropout
off). ``vmap(grad(...))`` computes the per-example gradients of a whole batch in one pass; the
result equals the one-example-at-a-time definition (tests compare the two).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from fisher_scale.optim.distributor import all_reduce

TARGETS = ("peft", "model")
VARIANTS = ("empirical", "expect")
#: top-level module names of task heads (HF sequence classifiers): always trained under target="model"
DEFAULT_HEAD = ("classifier", "score")


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _is_head(name: str, head: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(h in parts[:-1] for h in head)


def candidate_parameters(
    model: nn.Module, target: str, head: Iterable[str] = DEFAULT_HEAD
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """(candidates for selection, task-head parameters that are always kept) by parameter name.

    ``target="peft"`` (FISH-Tuning): the adapter matrices of PEFT tuner layers (LoRA A/B, LoRA
    embedding A/B, ...), found through peft's ``BaseTunerLayer.adapter_layer_names``; a head in
    ``modules_to_save`` is trained densely and is not part of the mask. ``target="model"`` (FISH
    Mask): every trainable parameter, the task head (modules named in ``head``) always kept.
    """
    if target not in TARGETS:
        raise ValueError(f"mask.target must be one of {TARGETS}, got {target!r}")
    trainable = _named_trainable(model)
    if target == "model":
        heads = {n: p for n, p in trainable.items() if _is_head(n, head)}
        candidates = {n: p for n, p in trainable.items() if n not in heads}
    else:
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapter_ids = {
            id(p)
            for module in model.modules()
            if isinstance(module, BaseTunerLayer)
            for attr in module.adapter_layer_names
            for p in getattr(module, attr).parameters()
        }
        candidates = {n: p for n, p in trainable.items() if id(p) in adapter_ids}
        heads = {}
    if not candidates:
        raise ValueError(
            f"mask.target={target!r} finds no trainable candidate parameter in {type(model).__name__}"
            + (" (is it a PEFT model with trainable adapters?)" if target == "peft" else "")
        )
    return candidates, heads


def _examples(batches: Iterable[Mapping[str, Tensor]], samples: int) -> Iterator[dict[str, Tensor]]:
    """Batches cut to ``samples`` examples in total (their leading dimension indexes examples)."""
    remaining = samples
    for batch in batches:
        size = next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
        take = min(size, remaining)
        yield {k: v[:take] if isinstance(v, Tensor) else v for k, v in batch.items()}
        remaining -= take
        if remaining == 0:
            return


def fisher_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    target: str = "peft",
    variant: str = "empirical",
    samples: int = 1024,
    head: Iterable[str] = DEFAULT_HEAD,
) -> dict[str, Tensor]:
    """FISH scores of the candidate parameters, by name; ``batches`` yield dicts the model accepts.

    ``variant="empirical"`` uses the true labels (``labels`` in each batch); ``"expect"`` takes the
    exact expectation over the model's predicted classes, ``Σ_c p(c|x)·(∂(-log p(c|x))/∂θ)²``, and
    is defined for classifiers only. Under ``torch.distributed`` each rank scores its own examples
    and the scores are summed over ranks, so every rank selects the same mask.
    """
    if variant not in VARIANTS:
        raise ValueError(f"mask.variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"mask.samples must be an integer >= 1, got {samples!r}")
    candidates, _ = candidate_parameters(model, target, head)
    scorer = _PerExampleGradients(model, candidates)
    # fp64 sums: the selection's top-k must not depend on the order examples were added in (batches, ranks)
    scores = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in candidates.items()}
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with warnings.catch_warnings():
            # functorch has no batching rule for CPU flash attention yet and falls back to a loop: correct, only slower
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            for batch in _examples(batches, samples):
                tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
                squared = scorer.empirical(tensors) if variant == "empirical" else scorer.expected(tensors)
                for name, value in squared.items():
                    scores[name] += value
                seen += next(iter(tensors.values())).shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("mask scoring received no examples")
    for name in scores:  # one at a time: a second set of model-sized buffers at once would double the memory
        (scores[name],) = all_reduce(scores[name])
    return {n: s.float() for n, s in scores.items()}


class _PerExampleGradients:
    """Sums of squared per-example gradients of one batch, via ``vmap`` over its examples."""

    def __init__(self, model: nn.Module, candidates: Mapping[str, nn.Parameter]) -> None:
        self.model = model
        self.params = {n: p.detach() for n, p in candidates.items()}
        self.fixed = {
            n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in candidates
        }
        self.causal = any(getattr(m, "is_causal", False) is True for m in model.modules())

    def _per_example(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A padding mask becomes each example's own (T, T) attention mask (causal for decoders): HF's
        mask construction branches on the mask's values, which ``vmap`` cannot trace."""
        mask = batch.get("attention_mask")
        if mask is None or mask.ndim != 2:
            return batch
        keys = mask.bool()[:, None, :].expand(-1, mask.shape[1], -1)
        if self.causal:
            keys = keys & torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device).tril()
        return {**batch, "attention_mask": keys[:, None]}

    def _forward(self, params: dict[str, Tensor], example: dict[str, Tensor]) -> object:
        single = {k: v.unsqueeze(0) for k, v in example.items()}
        return functional_call(self.model, {**self.fixed, **params}, args=(), kwargs=single)

    def empirical(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Σ_i g_i² with g_i the gradient of example i's loss at its true label."""
        if "labels" not in batch:
            raise ValueError("mask scoring needs 'labels' in every batch (the empirical Fisher uses true labels)")
        loss = grad(lambda p, example: self._forward(p, example).loss)
        grads = vmap(loss, in_dims=(None, 0))(self.params, self._per_example(batch))
        return {name: g.double().square().sum(0) for name, g in grads.items()}

    def expected(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Σ_i Σ_c p(c|x_i)·g_ic², one forward and one pullback per class for each example."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            logits = self.model(**inputs).logits
        if logits.ndim != 2 or logits.shape[-1] < 2:
            raise ValueError(
                "mask.variant='expect' is defined for classification (logits of shape (batch, classes)); "
                f"this model returns logits of shape {tuple(logits.shape)}"
            )
        probs = torch.softmax(logits.float(), -1)
        classes = logits.shape[-1]

        def per_class(params: dict[str, Tensor], example: dict[str, Tensor]) -> dict[str, Tensor]:
            _, pullback = vjp(lambda q: torch.log_softmax(self._forward(q, example).logits[0].float(), -1), params)
            (grads,) = vmap(pullback)(-torch.eye(classes))
            return grads

        grads = vmap(per_class, in_dims=(None, 0))(self.params, self._per_example(inputs))
        return {
            name: (probs.double().view(*probs.shape, *([1] * (g.ndim - 2))) * g.double().square()).sum((0, 1))
            for name, g in grads.items()
        }
