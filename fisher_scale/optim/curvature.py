"""Collection, averaging and normalisation of the Kronecker factors (ALGORITHMS.md §1.2, §1.4).

A forward hook computes a layer's input statistic and registers a hook on the layer's output;
only when the output's gradient arrives are both statistics added to the step's accumulators.
A forward pass that is never back-propagated (evaluation with grad enabled, or the forward that
activation checkpointing re-runs inside backward) therefore adds nothing, and a checkpointed
layer is counted exactly once. Forwards inside ``torch.func`` transforms (FISH's per-example
gradients) are not training steps and are skipped.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fisher_scale.errors import NonFiniteError
from fisher_scale.optim.distributor import all_reduce, all_reduce_numbers, rank_world
from fisher_scale.optim.layers import LayerRule, ParamSlot, Stat, find_rules, full_shape


def min_max(x: Tensor) -> Tensor:
    """``(x - min) / (max - min + 1e-6)`` after replacing +inf by 1 and -inf by 0 (§1.2)."""
    x = torch.nan_to_num(x, nan=float("nan"), posinf=1.0, neginf=0.0)
    low, high = x.min(), x.max()
    return (x - low) / (high - low + 1e-6)


#: a factor as F̃ uses it: (values, eigenvectors); the eigenvectors are None for a diagonal factor
Factor = tuple[Tensor, Tensor | None]


def diagonal_factor(x: Tensor) -> Factor:
    return min_max(x), None


def full_factor(x: Tensor) -> Factor:
    """A full factor divided by its mean diagonal (both sides O(1), §2), in its eigenbasis."""
    x = x.double()
    mean_diag = x.diagonal().mean()
    x = x / mean_diag if mean_diag > 0 else x
    values, vectors = torch.linalg.eigh(x)
    return values.clamp_min(0), vectors


@dataclass(eq=False)
class LayerCurvature:
    """Factor state of one supported layer: this step's accumulators and the EMA buffers."""

    name: str
    layer: nn.Module
    rule: LayerRule
    slots: list[ParamSlot]
    full_in: bool = False
    full_out: bool = False
    acc_in: Tensor | None = None
    acc_out: Tensor | None = None
    weight: float = 0.0
    H: Tensor | None = None  # EMA of the input factor (a vector, or a matrix when full_in)
    S: Tensor | None = None  # EMA of the output factor
    ema_mode: str = "convex"
    #: eigendecompositions of the full sides, refreshed when the EMA changes (the only derived state kept)
    eigen: dict[str, Factor] = field(default_factory=dict, repr=False)

    def add(self, h: Stat, s: Stat) -> None:
        self.acc_in = h[0] if self.acc_in is None else self.acc_in + h[0]
        self.acc_out = s[0] if self.acc_out is None else self.acc_out + s[0]
        self.weight += h[1]

    @property
    def factors(self) -> tuple[Factor, Factor] | None:
        """(H, S) as F̃ uses them, or None before the first statistic. Diagonal factors are min-max
        normalised on demand (vectors: cheaper to recompute than to keep a second copy of)."""
        if self.H is None or self.S is None:
            return None
        if self.ema_mode == "official":
            return (self.H, None), (self.S, None)
        return (
            self.eigen["H"] if self.full_in else diagonal_factor(self.H),
            self.eigen["S"] if self.full_out else diagonal_factor(self.S),
        )

    def fresh(self) -> tuple[Tensor, Tensor] | None:
        """This step's statistics (row-weighted mean over micro-batches), and reset the accumulators."""
        if self.acc_in is None or self.acc_out is None:
            return None
        fresh = self.acc_in / self.weight, self.acc_out / self.weight
        self.acc_in = self.acc_out = None
        self.weight = 0.0
        return fresh


class CurvatureTracker:
    """Hooks every supported layer that owns a trainable parameter and keeps its factors.

    ``ema_mode="convex"``: ``F ← γF + (1-γ)F_new`` from the first statistic on, min-max
    normalised (or, for a full factor, divided by its mean diagonal) when used.
    ``ema_mode="official"``: the reference code's ``F ← (γ/10)F + (γ/100)·minmax(F_new)`` from
    ones, used as is.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        ema_decay: float,
        ema_mode: str,
        interval: int,
        max_full_dim: int = 0,
    ) -> None:
        self.ema_decay = ema_decay
        self.ema_mode = ema_mode
        self.interval = interval
        self.steps = 0
        #: the factor a training loop multiplied the loss by (e.g. the number of data-parallel ranks); output
        #: gradients are divided by it so the statistics match one process on the whole batch
        self.output_grad_scale = 1.0
        #: "raise" on a non-finite statistic, or "skip" the step's statistics
        self.nonfinite = "raise"
        #: the current batch's attention mask (batch, tokens), set by a training loop: layers whose rows are
        #: tokens then count real tokens only, so padding never depends on how examples were batched
        self.token_mask: Tensor | None = None
        #: wall seconds spent computing statistics inside the hooks (profiling counts them as optimizer time)
        self.seconds = 0.0
        self.layers: dict[str, LayerCurvature] = {}
        self._by_module: dict[nn.Module, LayerCurvature] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        candidates = {
            name: (layer, rule, rule.slots(layer, f"{name}." if name else ""))
            for name, (layer, rule) in find_rules(model).items()
        }
        owners = Counter(id(s.param) for _, _, slots in candidates.values() for s in slots)
        for name, (layer, rule, slots) in candidates.items():
            # a parameter tied across layers (embedding = lm_head) mixes two Kronecker structures:
            # no single layer's factors describe it, so it is left to the fallback
            slots = [s for s in slots if owners[id(s.param)] == 1]
            if not slots:
                continue
            state = LayerCurvature(name, layer, rule, slots, ema_mode=ema_mode)
            if rule.allows_full and max_full_dim > 0:
                out_dim, in_dim = matrix_dims(layer)
                state.full_in, state.full_out = in_dim <= max_full_dim, out_dim <= max_full_dim
            self.layers[name] = state
            self._by_module[layer] = state
            self._handles.append(layer.register_forward_hook(self._on_forward))

    def planned_bytes(self) -> int:
        """Bytes of the factors once every layer has had a statistic (a memory plan's Fisher term): per side an
        fp32 vector, or an fp64 matrix and, with the convex EMA, its fp64 eigendecomposition."""
        total = 0
        for state in self.layers.values():
            sides = zip((state.full_in, state.full_out), state.rule.factor_lengths(state.layer), strict=True)
            for full, d in sides:
                eigen = 8 * d * d + 8 * d if self.ema_mode == "convex" else 0
                total += 8 * d * d + eigen if full else 4 * d
        return total

    def remove_hooks(self) -> None:
        """Detach from the model (e.g. before building another optimizer on it)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def collecting(self) -> bool:
        """Whether the current optimizer step is a curvature step (k % T == 0, k counted from 0)."""
        return self.steps % self.interval == 0

    def _on_forward(self, layer: nn.Module, args: tuple, output: object) -> None:
        if not (self.collecting and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        if torch._C._functorch.is_functorch_wrapped_tensor(output):
            return  # inside a torch.func transform (e.g. per-example FISH scoring): not a training step
        started = time.perf_counter()
        state = self._by_module[layer]
        h = args[0].detach()
        keep = self._kept_tokens(state.rule, h)
        h_stat = state.rule.input_stat(layer, h if keep is None else h[keep], state.full_in)

        def on_output_grad(grad: Tensor) -> None:
            started = time.perf_counter()
            grad = grad.detach() if keep is None else grad.detach()[keep]
            if self.output_grad_scale != 1.0:
                grad = grad / self.output_grad_scale
            state.add(h_stat, state.rule.output_stat(layer, grad, state.full_out))
            self.seconds += time.perf_counter() - started

        output.register_hook(on_output_grad)
        self.seconds += time.perf_counter() - started

    def _kept_tokens(self, rule: LayerRule, h: Tensor) -> Tensor | None:
        """The boolean token mask to select this input's rows with, if it applies."""
        mask, dims = self.token_mask, rule.input_feature_dims
        if mask is None or dims is None or tuple(h.shape[: h.ndim - dims]) != tuple(mask.shape):
            return None
        return mask.bool()

    def fold(self) -> None:
        """Fold this step's fresh statistics into the EMA (on curvature steps) and refresh F̃'s factors.

        Under ``torch.distributed`` the weighted sums and weights of all ranks are added first (after a check
        that all ranks collected the same layers), so N ranks with batch b compute what one process computes
        with batch N·b.
        """
        if not self.collecting:
            return
        self._reduce_over_ranks()
        gamma = self.ema_decay
        for state in self.layers.values():
            fresh = state.fresh()
            if fresh is None:
                continue
            h_new, s_new = fresh
            if not (torch.isfinite(h_new).all() and torch.isfinite(s_new).all()):
                if self.nonfinite == "skip":
                    continue
                raise NonFiniteError(
                    f"non-finite Fisher statistic in layer {state.name!r} at optimizer step {self.steps}"
                )
            if self.ema_mode == "official":
                state.H = _official_ema(state.H, h_new, gamma)
                state.S = _official_ema(state.S, s_new, gamma)
            else:
                state.H = h_new.clone() if state.H is None else gamma * state.H + (1 - gamma) * h_new
                state.S = s_new.clone() if state.S is None else gamma * state.S + (1 - gamma) * s_new
            self._refresh(state)

    def discard(self) -> None:
        """Drop this step's accumulated statistics (a skipped step)."""
        for state in self.layers.values():
            state.fresh()

    def _reduce_over_ranks(self) -> None:
        if rank_world()[1] == 1:
            return
        live = [s for s in self.layers.values() if s.acc_in is not None and s.acc_out is not None]
        most, least = all_reduce_numbers(len(live), -len(live), op="max")
        if most != -least:
            raise RuntimeError("ranks collected Fisher statistics for different sets of layers in the same step")
        weights = torch.tensor([s.weight for s in live], dtype=torch.float64)
        # fp64 sums: the order ranks are added in changes the statistics far below fp32 precision
        reduced = all_reduce(*(t.double() for s in live for t in (s.acc_in, s.acc_out)), weights)
        for i, state in enumerate(live):
            state.acc_in = reduced[2 * i].to(state.acc_in.dtype)
            state.acc_out = reduced[2 * i + 1].to(state.acc_out.dtype)
            state.weight = float(reduced[-1][i])

    def _refresh(self, state: LayerCurvature) -> None:
        state.eigen = {}
        if self.ema_mode == "convex":
            for side, full, buffer in (("H", state.full_in, state.H), ("S", state.full_out, state.S)):
                if full and buffer is not None:
                    state.eigen[side] = full_factor(buffer)

    def state_dict(self) -> dict:
        """Factor buffers keyed by module name, so a resumed run continues exactly."""
        return {
            "steps": self.steps,
            "layers": {n: {"H": s.H, "S": s.S} for n, s in self.layers.items() if s.H is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["layers"]) - set(self.layers)
        if unknown:
            raise ValueError(f"Fisher state names layers this model does not have: {sorted(unknown)[:5]}")
        self.steps = int(state["steps"])
        for name, layer_state in self.layers.items():
            saved = state["layers"].get(name)
            layer_state.H = None if saved is None else saved["H"].clone()
            layer_state.S = None if saved is None else saved["S"].clone()
            self._refresh(layer_state)


def _official_ema(buffer: Tensor | None, fresh: Tensor, gamma: float) -> Tensor:
    start = torch.ones_like(fresh) if buffer is None else buffer
    return (gamma / 10) * start + (gamma / 100) * min_max(fresh)


def matrix_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a matrix layer's [W | b] view, the bias being one more input column."""
    shape = full_shape(layer.weight)
    return shape[0], math.prod(shape[1:]) + (layer.bias is not None)
