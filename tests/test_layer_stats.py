"""Fresh factor statistics of every layer rule against explicit loops (ALGORITHMS.md §1.1)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fisher_scale.optim.adafisher import AdaFisher
from fisher_scale.optim.layers import rule_for

from . import brute


def _fresh(layer: nn.Module, x: torch.Tensor, full: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, S, output grad) of one forward/backward through ``layer``, as the rule computes them."""
    rule = rule_for(layer)
    out = layer(x)
    grad = torch.randn_like(out)
    h_sum, weight = rule.input_stat(layer, x, full)
    s_sum, s_weight = rule.output_stat(layer, grad, full)
    assert weight == s_weight
    return (h_sum / weight).double(), (s_sum / weight).double(), grad


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_loops_on_3d_input(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=bias)
    x = torch.randn(2, 4, 5)
    H, S, grad = _fresh(layer, x)
    brute.assert_close(H, brute.linear_input(x, bias))
    brute.assert_close(S, brute.linear_output(grad))


def test_linear_full_factors_match_outer_products() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(6, 4)
    H, S, grad = _fresh(layer, x, full=True)
    brute.assert_close(H, brute.full_moment(torch.cat([x, torch.ones(6, 1)], 1)))
    brute.assert_close(S, brute.full_moment(grad))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=2, kernel_size=(2, 3), stride=2, bias=False),
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
    ],
)
def test_conv2d_matches_explicit_patches(kwargs: dict) -> None:
    torch.manual_seed(0)
    layer = nn.Conv2d(**kwargs)
    x = torch.randn(2, kwargs["in_channels"], 6, 7)
    H, S, grad = _fresh(layer, x)
    brute.assert_close(H, brute.conv_input(x, layer))
    brute.assert_close(S, brute.conv_output(grad))


def test_batchnorm2d_matches_loops() -> None:
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    H, S, grad = _fresh(layer, x)
    brute.assert_close(H, brute.norm_input(x))
    brute.assert_close(S, brute.norm_output(grad, channel_dim=1))


@pytest.mark.parametrize("shape", [(3, 5, 8), (6, 8)])
@pytest.mark.parametrize("layer_type", [nn.LayerNorm, nn.RMSNorm])
def test_layernorm_and_rmsnorm_match_loops(shape: tuple[int, ...], layer_type: type[nn.Module]) -> None:
    torch.manual_seed(0)
    layer = layer_type(shape[-1])
    x = torch.randn(*shape)
    H, S, grad = _fresh(layer, x)
    brute.assert_close(H, brute.norm_input(x))
    brute.assert_close(S, brute.norm_output(grad, channel_dim=-1))


def test_qwen2_rmsnorm_is_recognised_by_type() -> None:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from fisher_scale.optim.layers import NormRule, find_rules

    model = nn.Sequential(Qwen2RMSNorm(8))
    assert isinstance(find_rules(model)["0"][1], NormRule)


def test_embedding_counts_tokens() -> None:
    torch.manual_seed(0)
    layer = nn.Embedding(10, 4)
    ids = torch.randint(0, 10, (3, 7))
    H, S, grad = _fresh(layer, ids)
    brute.assert_close(H, brute.embedding_input(ids, 10))
    brute.assert_close(S, brute.linear_output(grad))


def test_tracker_collects_true_output_gradients_in_a_model() -> None:
    """End to end through the hooks: the tracker's fresh statistics equal loops over the recorded tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 2, bias=False))
    recorder = brute.Recorder({"0": model[0], "1": model[1], "3": model[3]})
    optimizer = AdaFisher(model)
    model(torch.randn(5, 4)).square().sum().backward()
    fresh = {name: state.fresh() for name, state in optimizer.curvature.layers.items()}
    expected = {
        "0": (brute.linear_input(recorder.inputs["0"][0], True), brute.linear_output(recorder.grads["0"][0])),
        "1": (brute.norm_input(recorder.inputs["1"][0]), brute.norm_output(recorder.grads["1"][0], -1)),
        "3": (brute.linear_input(recorder.inputs["3"][0], False), brute.linear_output(recorder.grads["3"][0])),
    }
    for name, (H, S) in expected.items():
        brute.assert_close(fresh[name][0].double(), H)
        brute.assert_close(fresh[name][1].double(), S)


def test_bf16_model_gives_fp32_statistics_of_its_own_activations() -> None:
    """A bf16 model's statistics are accumulated in fp32: equal (to fp32 rounding) to loops in fp64 over the very
    bf16 activations and gradients, and within bf16 precision (norm-wise) of the same model run in fp32."""
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24), nn.Tanh(), nn.Linear(24, 8, bias=False))
    x = torch.randn(32, 16)
    fresh = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = copy.deepcopy(fp32).to(dtype)
        recorder = brute.Recorder({"0": model[0], "3": model[3]})
        optimizer = AdaFisher(model)
        model(x.to(dtype)).float().square().sum().backward()
        fresh[dtype] = {name: state.fresh() for name, state in optimizer.curvature.layers.items()}
        if dtype == torch.bfloat16:
            assert recorder.inputs["3"][0].dtype == recorder.grads["3"][0].dtype == torch.bfloat16
            for name, bias in (("0", True), ("3", False)):
                H, S = fresh[dtype][name]
                assert H.dtype == S.dtype == torch.float32
                brute.assert_close(H, brute.linear_input(recorder.inputs[name][0], bias))
                brute.assert_close(S, brute.linear_output(recorder.grads[name][0]))
    for name in ("0", "1", "3"):
        for low, high in zip(fresh[torch.bfloat16][name], fresh[torch.float32][name], strict=True):
            assert float((low - high).norm() / high.norm()) < 2e-2, name  # bf16 keeps 8 bits: ~0.4% per operation
