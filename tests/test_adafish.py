"""AdaFish (ALGORITHMS.md §2) against explicit Kronecker solves and Riemannian-preconditioned LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_scale.optim import AdaFish, kronecker_direction
from fisher_scale.optim.curvature import full_factor

from . import brute
from .conftest import lm_batch, tiny_lora_qwen2


def _as_factor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.ndim == 1:
        return x, None
    values, vectors = torch.linalg.eigh(x)
    return values, vectors


def _random_psd(n: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return a @ a.T / n


@pytest.mark.parametrize("out_full,in_full", [(False, True), (True, False), (True, True), (False, False)])
def test_damped_inverse_equals_explicit_kronecker_solve(out_full: bool, in_full: bool) -> None:
    """``(O ⊗ I + λ·1) vec(X) = vec(M)`` solved with a materialised Kronecker product."""
    generator = torch.Generator().manual_seed(0)
    rows, cols, damping = 5, 3, 0.1
    out_factor = (
        _random_psd(rows, generator) if out_full else torch.rand(rows, generator=generator, dtype=torch.float64)
    )
    in_factor = _random_psd(cols, generator) if in_full else torch.rand(cols, generator=generator, dtype=torch.float64)
    m = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    as_matrix = [f if f.ndim == 2 else torch.diag(f) for f in (out_factor, in_factor)]
    system = torch.kron(*as_matrix) + damping * torch.eye(rows * cols, dtype=torch.float64)
    expected = torch.linalg.solve(system, m.reshape(-1)).reshape(rows, cols)
    got = kronecker_direction(m, _as_factor(out_factor), _as_factor(in_factor), damping)
    torch.testing.assert_close(got, expected)


def test_reduces_to_riemannian_preconditioned_lora() -> None:
    """With P = A Aᵀ (resp. Q = Bᵀ B) and unit diagonal factors: Zhang & Pilanci (2024)'s step."""
    generator = torch.Generator().manual_seed(1)
    n, r, m_out, damping = 7, 3, 6, 0.05
    A = torch.randn(r, n, generator=generator, dtype=torch.float64)
    B = torch.randn(m_out, r, generator=generator, dtype=torch.float64)
    grad_A = torch.randn(r, n, generator=generator, dtype=torch.float64)
    grad_B = torch.randn(m_out, r, generator=generator, dtype=torch.float64)
    eye_r = torch.eye(r, dtype=torch.float64)
    ones = torch.ones
    step_B = kronecker_direction(grad_B, (ones(m_out, dtype=torch.float64), None), _as_factor(A @ A.T), damping)
    step_A = kronecker_direction(grad_A, _as_factor(B.T @ B), (ones(n, dtype=torch.float64), None), damping)
    torch.testing.assert_close(step_B, grad_B @ torch.linalg.inv(A @ A.T + damping * eye_r))
    torch.testing.assert_close(step_A, torch.linalg.inv(B.T @ B + damping * eye_r) @ grad_A)


def test_first_step_on_a_lora_pair_matches_brute_force() -> None:
    """One AdaFish step on y = B A x: factors from explicit outer products, update from an explicit solve."""
    torch.manual_seed(0)
    n, r, m_out, lr, damping = 6, 2, 5, 0.1, 0.01
    model = nn.Sequential(nn.Linear(n, r, bias=False), nn.Linear(r, m_out, bias=False))
    before = [p.detach().clone() for p in model.parameters()]
    recorder = brute.Recorder({"A": model[0], "B": model[1]})
    optimizer = AdaFish(model, lr=lr, damping=damping, max_full_dim=r)
    assert optimizer.curvature.layers["0"].full_out and not optimizer.curvature.layers["0"].full_in
    assert optimizer.curvature.layers["1"].full_in and not optimizer.curvature.layers["1"].full_out
    model(torch.randn(9, n)).square().mean().backward()
    grads = [p.grad.double() for p in model.parameters()]
    optimizer.step()

    x, z = recorder.inputs["A"][0], recorder.inputs["B"][0]
    g_z, g_y = recorder.grads["A"][0], recorder.grads["B"][0]

    def solve(diag_left: torch.Tensor | None, full: torch.Tensor, diag_right: torch.Tensor | None, g: torch.Tensor):
        full = full / full.diagonal().mean()  # scaled by its mean diagonal
        left = torch.diag(diag_left) if diag_left is not None else full
        right = torch.diag(diag_right) if diag_right is not None else full
        system = torch.kron(left, right) + damping * torch.eye(g.numel(), dtype=torch.float64)
        return torch.linalg.solve(system, g.reshape(-1)).reshape(g.shape)

    # first step from zero momentum: m / (1 - β) = g
    step_A = solve(None, brute.full_moment(g_z), brute.min_max(brute.linear_input(x, False)), grads[0])
    step_B = solve(brute.min_max(brute.linear_output(g_y)), brute.full_moment(z), None, grads[1])
    for p, start, step in zip(model.parameters(), before, (step_A, step_B), strict=True):
        brute.assert_close(start - p.detach(), lr * step, rtol=1e-4, atol=1e-8)


def test_full_factor_eigendecomposition_is_scaled_by_mean_diagonal() -> None:
    generator = torch.Generator().manual_seed(2)
    p = _random_psd(4, generator).float()
    values, vectors = full_factor(p)
    rebuilt = (vectors @ torch.diag(values) @ vectors.T).float()
    torch.testing.assert_close(rebuilt, p / p.diagonal().mean(), atol=1e-5, rtol=1e-5)


def test_peft_lora_layers_get_full_rank_sides() -> None:
    model = tiny_lora_qwen2(rank=4)
    optimizer = AdaFish(model)
    layers = optimizer.curvature.layers
    lora_A = [s for n, s in layers.items() if "lora_A" in n]
    lora_B = [s for n, s in layers.items() if "lora_B" in n]
    assert lora_A and lora_B and len(layers) == len(lora_A) + len(lora_B)
    # hidden size 32 <= 64 keeps both sides of these tiny layers full; the r side is full in any case
    assert all(s.full_out for s in lora_A) and all(s.full_in for s in lora_B)
    model(**lm_batch(0)).loss.backward()
    optimizer.step()
    for s in lora_B:
        assert s.eigen["H"][1].shape == (4, 4)
