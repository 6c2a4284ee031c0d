"""Layer rules: how a layer's inputs and output gradients become Kronecker factor statistics.

Formulas are ALGORITHMS.md §1.1. Every rule returns a statistic as ``(weighted_sum, weight)``
so that micro-batches and data-parallel ranks combine exactly by adding both parts: the fresh
statistic of an optimizer step is ``Σ weighted_sum / Σ weight``. For row-based layers (Linear,
Conv2d, Embedding) that is the row-weighted mean of ALGORITHMS.md §1.4; for the norm rules, whose
statistics are squares of batch sums, it is the batch-weighted mean of the per-micro-batch values.

Layers are recognised by type (``isinstance``), never by class name; model-specific RMSNorm
classes are registered explicitly and users can add their own with :func:`register_layer_rule`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def full_shape(param: Tensor) -> tuple[int, ...]:
    """The parameter's logical shape (ZeRO-3 leaves ``p.shape`` empty and keeps it in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: Tensor) -> int:
    return math.prod(full_shape(param))


@dataclass(frozen=True)
class ParamSlot:
    """One trainable parameter of a supported layer and how its elements pair with the factors.

    The parameter is viewed as a (rows, cols) matrix whose preconditioner is
    ``outer(row_factor, col_factor) + damping``; see :meth:`factor_pair`.
    """

    name: str
    param: nn.Parameter
    role: str  # weight | bias | embedding | scale | shift

    def factor_pair(self, H: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
        """(row factor, column factor) for this parameter from the layer's diagonal factors."""
        if self.role == "weight":  # (out, in...) with the bias, if any, as H's last entry
            cols = math.prod(full_shape(self.param)[1:])
            return S, H[:cols]
        if self.role == "bias":
            return S, H[-1:]
        if self.role == "embedding":  # (vocab, dim): one-hot inputs index the rows
            return H, S
        if self.role == "scale":
            return S, H[0:1]
        return S, H[1:2]  # shift


Stat = tuple[Tensor, float]


def _row_moment(rows: Tensor, full: bool) -> Tensor:
    """Σ_rows r² (diagonal, fp32) or Σ_rows r rᵀ (full, fp64).

    A full factor's small eigenvalues carry absolute errors of the order of its largest entry times
    the precision; next to a damping of 1e-3, fp32 would make them (and the update) depend on the
    order in which rows were summed, e.g. on the number of ranks. The matrices are at most
    ``max_full_dim`` wide, so fp64 costs little.
    """
    if full:
        rows = rows.double()
        return rows.T @ rows
    return rows.float().square().sum(0)


def _with_ones(rows: Tensor, bias: bool) -> Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1) if bias else rows


class LayerRule:
    """Base class of a layer type's statistics; subclasses implement the three methods below."""

    #: the layer is a matrix [W | b] whose factors are second moments of rows, so AdaFish may keep
    #: a small side as a full matrix; other layers' factors are diagonal only
    allows_full: ClassVar[bool] = True
    #: trailing feature dims of the layer's input when its rows are a batch's tokens (so padded tokens can be
    #: dropped, see ``CurvatureTracker.token_mask``); None for layers whose rows are not tokens
    input_feature_dims: ClassVar[int | None] = None

    def slots(self, layer: nn.Module, prefix: str) -> list[ParamSlot]:
        raise NotImplementedError

    def input_stat(self, layer: nn.Module, h: Tensor, full: bool) -> Stat:
        raise NotImplementedError

    def output_stat(self, layer: nn.Module, s: Tensor, full: bool) -> Stat:
        raise NotImplementedError

    def factor_lengths(self, layer: nn.Module) -> tuple[int, int]:
        """Lengths of the input and output factors (H, S), for a memory plan: a matrix layer's [W | b] sides."""
        shape = full_shape(layer.weight)
        return math.prod(shape[1:]) + (getattr(layer, "bias", None) is not None), shape[0]


def _trainable_slots(layer: nn.Module, prefix: str, roles: dict[str, str]) -> list[ParamSlot]:
    slots = []
    for attr, role in roles.items():
        p = getattr(layer, attr, None)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            slots.append(ParamSlot(f"{prefix}{attr}", p, role))
    return slots


class LinearRule(LayerRule):
    """``H = mean_rows h̄²``, ``S = mean_rows s²`` (peft's lora_A / lora_B are plain Linear layers)."""

    input_feature_dims = 1

    def slots(self, layer: nn.Module, prefix: str) -> list[ParamSlot]:
        return _trainable_slots(layer, prefix, {"weight": "weight", "bias": "bias"})

    def input_stat(self, layer: nn.Module, h: Tensor, full: bool) -> Stat:
        rows = _with_ones(h.reshape(-1, h.shape[-1]), layer.bias is not None)
        return _row_moment(rows, full), float(rows.shape[0])

    def output_stat(self, layer: nn.Module, s: Tensor, full: bool) -> Stat:
        rows = s.reshape(-1, s.shape[-1])
        return _row_moment(rows, full), float(rows.shape[0])


class Conv2dRule(LinearRule):
    """Rows are unfolded input patches, ordered (channel, kernel-row, kernel-col) like the weight.

    ``H = Σ_rows h̄² / (N_p·d)`` with N_p = B·oh·ow and d the patch length (the reference's extra
    1/d only rescales a layer); groups pool their patches into the same rows, as the reference does.
    """

    input_feature_dims = None

    def input_stat(self, layer: nn.Module, h: Tensor, full: bool) -> Stat:
        assert isinstance(layer, nn.Conv2d)
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        h = F.pad(h, layer._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(h, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        batch, _, locations = patches.shape
        d = patches.shape[1] // layer.groups
        rows = patches.view(batch, layer.groups, d, locations).permute(0, 1, 3, 2).reshape(-1, d)
        rows = _with_ones(rows, layer.bias is not None)
        return _row_moment(rows, full) / d, float(batch * locations)

    def output_stat(self, layer: nn.Module, s: Tensor, full: bool) -> Stat:
        rows = s.movedim(1, -1).reshape(-1, s.shape[1])
        return _row_moment(rows, full), float(rows.shape[0])


class EmbeddingRule(LinearRule):
    """A Linear layer on one-hot inputs: ``H[token] = count(token)/N`` (a diagonal moment by nature)."""

    allows_full = False
    input_feature_dims = 0

    def slots(self, layer: nn.Module, prefix: str) -> list[ParamSlot]:
        return _trainable_slots(layer, prefix, {"weight": "embedding"})

    def factor_lengths(self, layer: nn.Module) -> tuple[int, int]:
        return layer.num_embeddings, layer.embedding_dim

    def input_stat(self, layer: nn.Module, h: Tensor, full: bool) -> Stat:
        assert isinstance(layer, nn.Embedding)
        counts = torch.bincount(h.reshape(-1), minlength=layer.num_embeddings).float()
        return counts, float(h.numel())


class NormRule(LayerRule):
    """BatchNorm2d / LayerNorm / RMSNorm: a 2-entry input factor (scale, shift), as the reference.

    Input: reduce every dim but dim 1, ``v = Σ h / D²`` with D the product of the reduced dims
    after the batch dim; ``H = [Σ v², len(v)] / B²``. Output: ``S[c] = (Σ_{all but c} s)² / B``
    where c is the channel dim (1 for BatchNorm, the last for LayerNorm and RMSNorm).
    RMSNorm (**DECISION**, ALGORITHMS.md §1.1) has a scale only and uses H[0].
    """

    allows_full = False

    def __init__(self, channel_dim: int) -> None:
        self.channel_dim = channel_dim

    def slots(self, layer: nn.Module, prefix: str) -> list[ParamSlot]:
        return _trainable_slots(layer, prefix, {"weight": "scale", "bias": "shift"})

    def input_stat(self, layer: nn.Module, h: Tensor, full: bool) -> Stat:
        h = h.float()
        batch = h.shape[0]
        reduced = [d for d in range(h.ndim) if d != 1]
        norm = math.prod(h.shape[d] for d in reduced if d != 0)
        v = h.sum(dim=reduced) / norm**2
        return torch.stack([v.square().sum(), v.new_tensor(float(v.numel()))]) / batch, float(batch)

    def factor_lengths(self, layer: nn.Module) -> tuple[int, int]:
        return 2, full_shape(layer.weight)[0]

    def output_stat(self, layer: nn.Module, s: Tensor, full: bool) -> Stat:
        s = s.float()
        channel = self.channel_dim % s.ndim
        summed = s.sum(dim=[d for d in range(s.ndim) if d != channel])
        return summed.square(), float(s.shape[0])


_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.Embedding: EmbeddingRule(),
    nn.BatchNorm2d: NormRule(channel_dim=1),
    nn.LayerNorm: NormRule(channel_dim=-1),
    nn.RMSNorm: NormRule(channel_dim=-1),
}


def _register_transformers_rmsnorms() -> None:
    """RMSNorm classes of the HF architectures this platform targets (each model defines its own)."""
    import importlib

    for module, cls in [
        ("qwen2", "Qwen2RMSNorm"),
        ("qwen3", "Qwen3RMSNorm"),
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
    ]:
        try:
            found = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
        except (ImportError, AttributeError):
            continue
        _RULES.setdefault(found, NormRule(channel_dim=-1))


def register_layer_rule(layer_type: type[nn.Module], rule: LayerRule) -> None:
    """Support another layer type (matched with isinstance, subclasses included)."""
    _RULES[layer_type] = rule


def rule_for(layer: nn.Module) -> LayerRule | None:
    """The rule of the most specific registered type that ``layer`` is an instance of."""
    mro = type(layer).__mro__
    matches = [t for t in _RULES if t in mro]
    return _RULES[min(matches, key=mro.index)] if matches else None


def find_rules(model: nn.Module) -> dict[str, tuple[nn.Module, LayerRule]]:
    """Every supported layer of ``model`` by module name (HF RMSNorms are registered on first use)."""
    if "transformers" in sys.modules:
        _register_transformers_rmsnorms()
    found = {}
    for name, layer in model.named_modules():
        rule = rule_for(layer)
        if rule is not None:
            found[name] = (layer, rule)
    return found
