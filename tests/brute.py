"""Brute-force statistics of ALGORITHMS.md §1.1, written with explicit loops, for the tests to compare against."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def linear_input(h: Tensor, bias: bool) -> Tensor:
    rows = h.reshape(-1, h.shape[-1]).double()
    total = torch.zeros(rows.shape[1] + bias, dtype=torch.float64)
    for row in rows:
        if bias:
            row = torch.cat([row, row.new_ones(1)])
        total += torch.tensor([v * v for v in row.tolist()], dtype=torch.float64)
    return total / rows.shape[0]


def linear_output(s: Tensor) -> Tensor:
    return linear_input(s, bias=False)


def full_moment(rows: Tensor) -> Tensor:
    """Σ_rows r rᵀ / N with explicit outer products."""
    rows = rows.reshape(-1, rows.shape[-1]).double()
    total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for row in rows:
        total += torch.outer(row, row)
    return total / rows.shape[0]


def conv_input(h: Tensor, conv: nn.Conv2d) -> Tensor:
    """Explicit patch extraction: loops over batch, group and output location."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    padded = torch.nn.functional.pad(h.double(), (pw, pw, ph, ph))
    batch, channels, height, width = padded.shape
    per_group = channels // conv.groups
    oh = (height - dh * (kh - 1) - 1) // sh + 1
    ow = (width - dw * (kw - 1) - 1) // sw + 1
    d = per_group * kh * kw
    total = torch.zeros(d + (conv.bias is not None), dtype=torch.float64)
    for b in range(batch):
        for g in range(conv.groups):
            for y in range(oh):
                for x in range(ow):
                    patch = [
                        padded[b, g * per_group + c, y * sh + i * dh, x * sw + j * dw]
                        for c in range(per_group)
                        for i in range(kh)
                        for j in range(kw)
                    ]
                    if conv.bias is not None:
                        patch.append(torch.tensor(1.0, dtype=torch.float64))
                    total += torch.stack(patch) ** 2
    return total / (batch * oh * ow * d)


def conv_output(s: Tensor) -> Tensor:
    batch, out, oh, ow = s.shape
    total = torch.zeros(out, dtype=torch.float64)
    for b in range(batch):
        for y in range(oh):
            for x in range(ow):
                total += s[b, :, y, x].double() ** 2
    return total / (batch * oh * ow)


def norm_input(h: Tensor) -> Tensor:
    """[Σ_k v_k², K] / B² with v_k = Σ over every dim but 1 of h, divided by D²."""
    h = h.double()
    batch, k = h.shape[0], h.shape[1]
    per_k = h.transpose(0, 1).reshape(k, batch, -1)
    d = per_k.shape[2]
    v = [float(per_k[i].sum()) / d**2 for i in range(k)]
    return torch.tensor([sum(x * x for x in v), k], dtype=torch.float64) / batch**2


def norm_output(s: Tensor, channel_dim: int) -> Tensor:
    batch = s.shape[0]
    s = s.double().movedim(channel_dim, 0)
    sums = torch.stack([s[c].sum() for c in range(s.shape[0])])
    return sums**2 / batch


def embedding_input(ids: Tensor, vocab: int) -> Tensor:
    counts = torch.zeros(vocab, dtype=torch.float64)
    for token in ids.reshape(-1).tolist():
        counts[token] += 1
    return counts / ids.numel()


def min_max(x: Tensor) -> Tensor:
    x = x.clone()
    x[x == float("inf")] = 1.0
    x[x == float("-inf")] = 0.0
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


class Recorder:
    """Records each hooked layer's input and output gradient, with plain hooks independent of fisher_scale."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, list[Tensor]] = {n: [] for n in layers}
        self.grads: dict[str, list[Tensor]] = {n: [] for n in layers}
        for name, layer in layers.items():
            layer.register_forward_hook(self._forward(name))

    def _forward(self, name: str):
        def hook(_layer: nn.Module, args: tuple, output: Tensor) -> None:
            if output.requires_grad:
                self.inputs[name].append(args[0].detach().clone())
                output.register_hook(lambda g: self.grads[name].append(g.detach().clone()))

        return hook

    def clear(self) -> None:
        for store in (*self.inputs.values(), *self.grads.values()):
            store.clear()


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """fp32 results against float64 loops, with a tolerance for fp32 summation order."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)
