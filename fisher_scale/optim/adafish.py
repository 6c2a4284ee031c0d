"""AdaFish (ALGORITHMS.md §2): low-rank generalized-Fisher preconditioning for LoRA.

**DECISION**: this is the project's reconstruction of Hu & Li (arXiv 2403.13128), whose code is
not public. A factor side of dimension ≤ ``max_full_dim`` of a Linear or Conv2d layer is kept as a
full matrix (the r×r input factor of ``lora_B``, the r×r output factor of ``lora_A``); larger sides
stay diagonal as in AdaFisher. The damped inverse ``(D ⊗ P + λI)⁻¹ vec(M)`` is solved exactly in
the factors' eigenbases. Momentum, bias correction and decoupled weight decay are AdaFisherW's;
the EMA is the convex one only (there is no reference code to be "official" to).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fisher_scale.hyperparameters import AdaFishHyperparameters
from fisher_scale.optim.adafisher import FisherOptimizer
from fisher_scale.optim.curvature import Factor, LayerCurvature
from fisher_scale.optim.distributor import all_reduce
from fisher_scale.optim.layers import full_numel, full_shape
from fisher_scale.optim.pieces import Piece


def kronecker_direction(m: Tensor, out_factor: Factor, in_factor: Factor, damping: float) -> Tensor:
    """Solve ``(O ⊗ I + λ·1) vec(X) = vec(M)`` for X of shape (out, in), i.e. ``O X Iᵀ + λX = M``.

    Each factor is (values, eigenvectors) with eigenvectors None for a diagonal factor, so
    ``X = V_o ((V_oᵀ M V_i) ⊘ (Λ_o Λ_iᵀ + λ)) V_iᵀ``; with both sides diagonal this is AdaFisher's
    ``M / F̃``.
    """
    (out_values, out_vectors), (in_values, in_vectors) = out_factor, in_factor
    dtype = m.dtype
    m = m.to(torch.promote_types(torch.promote_types(dtype, out_values.dtype), in_values.dtype))
    if out_vectors is not None:
        m = out_vectors.T @ m
    if in_vectors is not None:
        m = m @ in_vectors
    m = m / (torch.outer(out_values, in_values) + damping)
    if in_vectors is not None:
        m = m @ in_vectors.T
    if out_vectors is not None:
        m = out_vectors @ m
    return m.to(dtype)


class AdaFish(FisherOptimizer):
    """AdaFisherW's update with the r×r sides of LoRA layers preconditioned by full matrices."""

    decoupled = True

    hyperparameter_class = AdaFishHyperparameters

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        present = {id(t) for group in self.param_groups for t in group["params"]}
        if any(id(t) not in present for t in self.pieces):
            raise ValueError(
                "AdaFish needs all trainable parameters in one step() call (one param group, one ZeRO-3 sub-group: "
                "raise zero_optimization.sub_group_size): its r×r solves need every piece of a LoRA layer"
            )
        return super().step(closure)

    def _directions(self, work: list[tuple[Tensor, Piece]]) -> list[Tensor]:
        """Diagonal layers as AdaFisherW; layers with a full side solved whole, [M_W | m_b] at once (§2).

        Each layer's momentum matrix is assembled from the pieces this rank holds and summed over
        ranks (pieces are disjoint), so under ZeRO every rank solves the same small LoRA system and
        keeps its own slice: only these r-sided matrices travel, never a gradient.
        """
        full = [
            layer
            for layer in self.curvature.layers.values()
            if layer.factors is not None and (layer.full_in or layer.full_out)
        ]
        in_full = {id(p) for p in _full_layer_params(full)}
        diagonal = [i for i, (_, piece) in enumerate(work) if id(piece.param) not in in_full]
        directions: list[Tensor | None] = [None] * len(work)
        for i, direction in zip(diagonal, super()._directions([work[i] for i in diagonal]), strict=True):
            directions[i] = direction
        if not full:
            return directions
        blocks = {
            id(p): torch.zeros(full_numel(p), dtype=torch.float32, device=p.device) for p in _full_layer_params(full)
        }
        for tensor, piece in work:
            if id(piece.param) in in_full:
                blocks[id(piece.param)][piece.start : piece.end] = piece.of(self.state[tensor]["exp_avg"])
        if self.distributor.partitioned:
            blocks = dict(zip(blocks, all_reduce(*blocks.values()), strict=True))
        solved = {}
        for layer in full:
            members = _members(layer)
            out_dim = full_shape(members[0])[0]
            matrix = torch.cat([blocks[id(p)].view(out_dim, -1) for p in members], 1)
            h, s = layer.factors
            result = kronecker_direction(matrix, s, h, self.damping)
            start = 0
            for p in members:
                width = full_numel(p) // out_dim
                solved[id(p)] = result[:, start : start + width].reshape(-1)
                start += width
        for i, (_, piece) in enumerate(work):
            if directions[i] is None:
                directions[i] = solved[id(piece.param)][piece.start : piece.end]
        return directions


def _full_layer_params(layers: list[LayerCurvature]) -> list[nn.Parameter]:
    return [p for layer in layers for p in _members(layer)]


def _members(layer: LayerCurvature) -> list[nn.Parameter]:
    """The layer's [W | b] parameters (a frozen one contributes zero momentum)."""
    return [p for p in (layer.layer.weight, layer.layer.bias) if p is not None]
