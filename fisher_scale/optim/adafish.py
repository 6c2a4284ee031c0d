"""AdaFish (ALGORITHMS.md §2): low-rank generalized-Fisher preconditioning for LoRA.

**DECISION**: this is the project's reconstruction of Hu & Li (arXiv 2403.13128), whose code is
not public. A factor side of dimension ≤ ``max_full_dim`` of a Linear or Conv2d layer is kept as a
full matrix (the r×r input factor of ``lora_B``, the r×r output factor of ``lora_A``); larger sides
stay diagonal as in AdaFisher. The damped inverse ``(D ⊗ P + λI)⁻¹ vec(M)`` is solved exactly in
the factors' eigenbases. Momentum, bias correction and decoupled weight decay are AdaFisherW's;
the EMA is the convex one only (there is no reference code to be "official" to).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fisher_scale.optim.adafisher import FisherOptimizer, _check
from fisher_scale.optim.curvature import Factor, LayerCurvature


def kronecker_direction(m: Tensor, out_factor: Factor, in_factor: Factor, damping: float) -> Tensor:
    """Solve ``(O ⊗ I + λ·1) vec(X) = vec(M)`` for X of shape (out, in), i.e. ``O X Iᵀ + λX = M``.

    Each factor is (values, eigenvectors) with eigenvectors None for a diagonal factor, so
    ``X = V_o ((V_oᵀ M V_i) ⊘ (Λ_o Λ_iᵀ + λ)) V_iᵀ``; with both sides diagonal this is AdaFisher's
    ``M / F̃``.
    """
    (out_values, out_vectors), (in_values, in_vectors) = out_factor, in_factor
    if out_vectors is not None:
        m = out_vectors.T @ m
    if in_vectors is not None:
        m = m @ in_vectors
    m = m / (torch.outer(out_values, in_values) + damping)
    if in_vectors is not None:
        m = m @ in_vectors.T
    if out_vectors is not None:
        m = out_vectors @ m
    return m


class AdaFish(FisherOptimizer):
    """AdaFisherW's update with the r×r sides of LoRA layers preconditioned by full matrices."""

    decoupled = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        ema_decay: float = 0.8,
        ema_mode: str = "convex",
        curvature_interval: int = 1,
        weight_decay: float = 0.0,
        fallback: str = "adamw",
        max_full_dim: int = 64,
    ) -> None:
        _check(ema_mode == "convex", "ema_mode", "'convex' for AdaFish (it has no reference code)", ema_mode)
        _check(isinstance(max_full_dim, int) and max_full_dim >= 0, "max_full_dim", "an integer >= 0", max_full_dim)
        super().__init__(
            model,
            lr,
            beta,
            damping,
            ema_decay,
            ema_mode,
            curvature_interval,
            weight_decay,
            fallback,
            max_full_dim=max_full_dim,
        )

    def _directions(self, params: list[Tensor], moments: list[Tensor]) -> dict[Tensor, Tensor]:
        whole: dict[LayerCurvature, None] = {}  # layers with a full side, in order
        rest, rest_moments = [], []
        for p, m in zip(params, moments, strict=True):
            layer, _ = self._layer_of.get(p, (None, None))
            if layer is not None and layer.factors is not None and (layer.full_in or layer.full_out):
                whole[layer] = None
            else:
                rest.append(p)
                rest_moments.append(m)
        directions = super()._directions(rest, rest_moments)
        by_id = {id(p): m for p, m in zip(params, moments, strict=True)}
        for layer in whole:
            directions.update(self._layer_directions(layer, by_id))
        return directions

    def _layer_directions(self, layer: LayerCurvature, moments: dict[int, Tensor]) -> dict[Tensor, Tensor]:
        """Precondition [M_W | m_b] jointly: the bias is the input factor's last column (§2).

        A member without a gradient this step (or frozen) contributes a zero block and gets no update.
        """
        members = [p for p in (layer.layer.weight, layer.layer.bias) if p is not None]
        out_dim = members[0].shape[0]
        blocks = [
            moments[id(p)].reshape(out_dim, -1) if id(p) in moments else p.new_zeros(out_dim, p.numel() // out_dim)
            for p in members
        ]
        h, s = layer.factors
        solved = kronecker_direction(torch.cat(blocks, 1), s, h, self.damping)
        directions, start = {}, 0
        for p, block in zip(members, blocks, strict=True):
            if id(p) in moments:
                directions[p] = solved[:, start : start + block.shape[1]].reshape(p.shape)
            start += block.shape[1]
        return directions
