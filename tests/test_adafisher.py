"""AdaFisher / AdaFisherW against independent computations (ALGORITHMS.md §1)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from fisher_scale.optim import AdaFish, AdaFisher, AdaFisherW
from fisher_scale.optim.adafisher import FisherOptimizer, fragment_preconditioner

from . import brute
from .conftest import lm_batch, tiny_classifier, tiny_lora_qwen2, tiny_qwen2

OPTIMIZERS = [AdaFisher, AdaFisherW, AdaFish]


class ReferenceOracle:
    """The reference code's update (AtlasAnalyticsLab/AdaFisher, eb858c6), re-stated from its
    definition with explicit loops and an explicit ``torch.kron``, on models whose parameters all
    belong to Linear, Conv2d, BatchNorm2d or LayerNorm layers."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        beta: float,
        damping: float,
        gamma: float,
        interval: int,
        weight_decay: float,
        decoupled: bool,
    ) -> None:
        self.layers = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d | nn.BatchNorm2d | nn.LayerNorm)
        }
        self.recorder = brute.Recorder(self.layers)
        self.lr, self.beta, self.damping, self.gamma = lr, beta, damping, gamma
        self.interval, self.weight_decay, self.decoupled = interval, weight_decay, decoupled
        self.H: dict[str, torch.Tensor] = {}
        self.S: dict[str, torch.Tensor] = {}
        self.momentum: dict[nn.Parameter, torch.Tensor] = {}
        self.t: dict[nn.Parameter, int] = {}
        self.steps = 0

    def _fresh(self, layer: nn.Module, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(layer, nn.Conv2d):
            return brute.conv_input(h, layer), brute.conv_output(s)
        if isinstance(layer, nn.Linear):
            return brute.linear_input(h, layer.bias is not None), brute.linear_output(s)
        return brute.norm_input(h), brute.norm_output(s, 1 if isinstance(layer, nn.BatchNorm2d) else -1)

    @torch.no_grad()
    def step(self) -> None:
        if self.steps % self.interval == 0:
            for name, layer in self.layers.items():
                (h,), (s,) = self.recorder.inputs[name], self.recorder.grads[name]
                h_new, s_new = self._fresh(layer, h, s)
                if self.steps == 0:
                    self.H[name], self.S[name] = torch.ones_like(h_new), torch.ones_like(s_new)
                self.H[name] = self.gamma / 10 * self.H[name] + self.gamma / 100 * brute.min_max(h_new)
                self.S[name] = self.gamma / 10 * self.S[name] + self.gamma / 100 * brute.min_max(s_new)
        self.recorder.clear()
        for name, layer in self.layers.items():
            kron = torch.kron(self.H[name].unsqueeze(1), self.S[name].unsqueeze(0)).t() + self.damping
            if layer.bias is not None:
                self._update(layer.weight, kron[:, :-1].reshape(layer.weight.shape))
                self._update(layer.bias, kron[:, -1])
            else:
                self._update(layer.weight, kron.reshape(layer.weight.shape))
        self.steps += 1

    def _update(self, p: nn.Parameter, f_tilde: torch.Tensor) -> None:
        g = p.grad.double()
        if not self.decoupled:
            g = g + self.weight_decay * p.double()
        self.t[p] = self.t.get(p, 0) + 1
        m = self.momentum[p] = self.beta * self.momentum.get(p, torch.zeros_like(g)) + (1 - self.beta) * g
        correction = 1 - self.beta ** self.t[p]
        if self.decoupled:
            p.copy_(p.double() - self.lr * (m / correction / f_tilde + self.weight_decay * p.double()))
        else:
            p.copy_(p.double() - self.lr / correction * m / f_tilde)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3, bias=False))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


@pytest.mark.parametrize("make_model,shape", [(_mlp, (10, 6)), (_cnn, (5, 2, 4, 4))])
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("interval", [1, 2])
def test_official_mode_reproduces_reference_update_for_update(make_model, shape, cls, interval) -> None:
    torch.manual_seed(0)
    ours_model = make_model()
    oracle_model = copy.deepcopy(ours_model)
    settings = dict(lr=1e-3, beta=0.9, damping=1e-3, weight_decay=0.01)
    ours = cls(
        ours_model, ema_decay=0.8, ema_mode="official", fallback="official", curvature_interval=interval, **settings
    )
    oracle = ReferenceOracle(oracle_model, gamma=0.8, interval=interval, decoupled=cls is AdaFisherW, **settings)
    for step in range(5):
        x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
        for model, optimizer in ((ours_model, ours), (oracle_model, oracle)):
            for p in model.parameters():
                p.grad = None
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        for (name, p), q in zip(ours_model.named_parameters(), oracle_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name, s=step: f"{n} step {s}: {m}")


def _one_step(cls: type, model: nn.Module, x: torch.Tensor, **kwargs) -> tuple[object, dict[str, torch.Tensor]]:
    optimizer = cls(model, **kwargs)
    model(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    return optimizer, grads


def test_preconditioner_equals_explicit_kronecker_product() -> None:
    """After one step from zero momentum, θ0 - θ1 = lr·g / F̃ with F̃ = kron(S, H) + λ (convex mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(7, 5)
    recorder = brute.Recorder({"0": model[0]})
    optimizer, grads = _one_step(AdaFisher, model, x, lr=0.01, damping=0.05)
    H = brute.min_max(brute.linear_input(recorder.inputs["0"][0], True))
    S = brute.min_max(brute.linear_output(recorder.grads["0"][0]))
    f_tilde = torch.kron(S.unsqueeze(1), H.unsqueeze(0)) + 0.05  # (out, in + 1)
    expected = {
        "0.weight": 0.01 * grads["0.weight"] / f_tilde[:, :-1],
        "0.bias": 0.01 * grads["0.bias"] / f_tilde[:, -1],
    }
    for name, p in model.named_parameters():
        brute.assert_close(before[name] - p.detach(), expected[name])
    # a ZeRO-style fragment [start, end) of the flattened weight: the same entries, built from the vectors only
    layer = optimizer.curvature.layers["0"]
    weight_slot = next(s for s in layer.slots if s.role == "weight")
    for start, end in [(0, 20), (3, 11), (7, 8), (14, 20)]:
        fragment = fragment_preconditioner(weight_slot, layer.factors, 0.05, start, end)
        brute.assert_close(fragment, f_tilde[:, :-1].reshape(-1)[start:end])


def test_convex_ema_over_several_steps_matches_the_explicit_recurrence() -> None:
    """Five steps of the default (convex) mode against ALGORITHMS.md §1.2-1.3 written out: H, S start at the first
    statistic, F ← γF + (1-γ)F_new, min-max after averaging, F̃ = S·Hᵀ + λ, bias-corrected momentum over F̃."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4))
    gamma, beta, lr, damping = 0.6, 0.9, 0.01, 0.05  # γ far from 1, so a wrong mix shows in a few steps
    optimizer = AdaFisher(model, lr=lr, beta=beta, damping=damping, ema_decay=gamma)
    recorder = brute.Recorder({"0": model[0]})
    H = S = None
    momentum = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for step in range(1, 6):
        recorder.clear()
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        model.zero_grad()
        (model(torch.randn(7, 5)) ** 2).mean().backward()
        h_new = brute.linear_input(recorder.inputs["0"][0].double(), True)
        s_new = brute.linear_output(recorder.grads["0"][0].double())
        H = h_new if H is None else gamma * H + (1 - gamma) * h_new
        S = s_new if S is None else gamma * S + (1 - gamma) * s_new
        f_tilde = torch.outer(brute.min_max(S), brute.min_max(H)) + damping  # (out, in + 1): bias last
        preconditioner = {"0.weight": f_tilde[:, :-1], "0.bias": f_tilde[:, -1]}
        expected = {}
        for name, p in model.named_parameters():
            momentum[name] = beta * momentum[name] + (1 - beta) * p.grad.double()
            expected[name] = before[name] - lr / (1 - beta**step) * momentum[name] / preconditioner[name]
        optimizer.step()
        for name, p in model.named_parameters():
            brute.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_curvature_contrast_matches_materialised_f_tilde() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))
    optimizer, _ = _one_step(AdaFisher, model, torch.randn(6, 5), damping=0.01)
    for name, layer in optimizer.curvature.layers.items():
        (h, _), (s, _) = layer.factors
        entries = torch.cat([torch.outer(*slot.factor_pair(h, s)).reshape(-1) for slot in layer.slots]) + 0.01
        expected = float((entries.max() - entries.min()) / entries.min())
        assert optimizer.curvature_contrast()[name] == pytest.approx(expected, rel=1e-5)


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[list[dict]],
) -> list[float]:
    """One optimizer step per entry of ``batches``; each entry is a list of micro-batches."""
    losses = []
    for micro_batches in batches:
        optimizer.zero_grad()
        total = 0.0
        for batch in micro_batches:
            loss = model(**batch).loss / len(micro_batches)
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total)
    return losses


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_gradient_accumulation_matches_one_big_batch(cls: type) -> None:
    batches = [lm_batch(seed, batch=4) for seed in range(4)]
    split = [[{k: v[:2] for k, v in b.items()}, {k: v[2:] for k, v in b.items()}] for b in batches]
    whole_model, micro_model = tiny_lora_qwen2(), tiny_lora_qwen2()
    whole, micro = cls(whole_model, lr=1e-4), cls(micro_model, lr=1e-4)
    _train(whole_model, whole, [[b] for b in batches])
    _train(micro_model, micro, split)
    for (name, a), b in zip(_lora_state(whole_model).items(), _lora_state(micro_model).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for name, layer in whole.curvature.layers.items():
        torch.testing.assert_close(layer.S, micro.curvature.layers[name].S, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("cls,kwargs", [(AdaFisher, {}), (AdaFisherW, {"ema_mode": "official"}), (AdaFish, {})])
def test_state_dict_resume_equals_uninterrupted_run(cls: type, kwargs: dict) -> None:
    batches = [[lm_batch(seed)] for seed in range(6)]
    model = tiny_lora_qwen2()
    _train(model, cls(model, weight_decay=0.01, curvature_interval=2, **kwargs), batches)

    first = tiny_lora_qwen2()
    optimizer = cls(first, weight_decay=0.01, curvature_interval=2, **kwargs)
    _train(first, optimizer, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["optimizer"]["fisher"]["layers"]) == set(optimizer.curvature.layers)

    resumed = tiny_lora_qwen2(seed=5)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = cls(resumed, weight_decay=0.01, curvature_interval=2, **kwargs)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _train(resumed, resumed_optimizer, batches[3:])
    for (name, a), b in zip(_lora_state(model).items(), _lora_state(resumed).values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_does_not_double_count(reentrant: bool) -> None:
    batch = lm_batch(0)
    fresh = {}
    for checkpointing in (False, True):
        model = tiny_lora_qwen2()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        optimizer = AdaFisher(model)
        model(**batch).loss.backward()
        fresh[checkpointing] = {
            n: (s.weight, s.acc_in.clone(), s.acc_out.clone()) for n, s in optimizer.curvature.layers.items()
        }
    assert fresh[True].keys() == fresh[False].keys()
    for name, (weight, acc_in, acc_out) in fresh[False].items():
        assert fresh[True][name][0] == weight, name
        torch.testing.assert_close(fresh[True][name][1], acc_in)
        torch.testing.assert_close(fresh[True][name][2], acc_out)


def test_statistics_only_on_curvature_steps() -> None:
    torch.manual_seed(0)
    model = _mlp()
    optimizer = AdaFisher(model, curvature_interval=3)
    history = []
    for _ in range(7):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        collected = optimizer.curvature.layers["0"].acc_in is not None
        optimizer.step()
        history.append((collected, optimizer.curvature.layers["0"].H.clone()))
    assert [c for c, _ in history] == [True, False, False, True, False, False, True]
    for k in range(1, 7):
        changed = not torch.equal(history[k][1], history[k - 1][1])
        assert changed == (k % 3 == 0), k


def test_unsupported_parameter_falls_back_to_adamw_and_frozen_ones_are_ignored() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)
            self.layer = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.randn(2))

    torch.manual_seed(0)
    model = Model()
    twin = copy.deepcopy(model.scale)
    ours = AdaFisher(model, lr=0.01, beta=0.8, weight_decay=0.1, eps=0.3)  # an eps large enough to show
    reference = torch.optim.AdamW([twin], lr=0.01, betas=(0.8, 0.999), eps=0.3, weight_decay=0.1)
    assert set(ours.curvature.layers) == {"layer"}
    assert all(p.requires_grad for g in ours.param_groups for p in g["params"])
    frozen_before = model.frozen.weight.clone()
    for _ in range(5):
        grad = torch.randn(2)
        model.scale.grad, twin.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
        torch.testing.assert_close(model.scale, twin)
    assert torch.equal(model.frozen.weight, frozen_before)


def test_full_fine_tuning_pairs_embedding_and_rmsnorm_and_leaves_tied_weight_to_fallback() -> None:
    model = tiny_qwen2(tie=True)
    optimizer = AdaFisher(model)
    roles = {slot.name: slot.role for layer in optimizer.curvature.layers.values() for slot in layer.slots}
    assert roles["model.layers.0.input_layernorm.weight"] == "scale"
    assert roles["model.norm.weight"] == "scale"
    assert roles["model.layers.0.self_attn.q_proj.bias"] == "bias"
    assert "model.embed_tokens.weight" not in roles and "lm_head.weight" not in roles  # tied: AdamW fallback
    untied = AdaFisher(tiny_qwen2())
    untied_roles = {s.name: s.role for layer in untied.curvature.layers.values() for s in layer.slots}
    assert untied_roles["model.embed_tokens.weight"] == "embedding"
    assert untied_roles["lm_head.weight"] == "weight"


# AdaFish divides its r×r factors by their mean diagonal (ALGORITHMS.md §2), so its F̃ is O(1) where
# AdaFisher's min-max normalised products sit near λ: its useful lr is 10²-10³ times larger.
LEARNING_RATES = {
    "lora_lm": {AdaFisher: 1e-2, AdaFisherW: 1e-2, AdaFish: 1.0},
    "classifier": {AdaFisher: 1e-3, AdaFisherW: 1e-3, AdaFish: 0.1},
}


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("kind", ["lora_lm", "classifier"])
def test_tiny_model_loss_goes_down(cls: type, kind: str) -> None:
    if kind == "lora_lm":
        model, batch = tiny_lora_qwen2(), lm_batch(0, batch=8)
    else:
        model = tiny_classifier()
        generator = torch.Generator().manual_seed(0)
        batch = {
            "input_ids": torch.randint(0, 64, (12, 10), generator=generator),
            "labels": torch.randint(0, 3, (12,), generator=generator),
        }
    optimizer = cls(model, lr=LEARNING_RATES[kind][cls])
    losses = _train(model, optimizer, [[batch]] * 25)
    # random-token LM data with rank-4 LoRA moves slowly (AdamW: -5% in 25 steps); a classifier overfits
    assert losses[-1] < (0.98 if kind == "lora_lm" else 0.8) * losses[0], losses


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"damping": -1e-3}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"ema_mode": "paper"}, "ema_mode"),
        ({"fallback": "sgd"}, "fallback"),
        ({"beta": 1.0}, "beta"),
        ({"curvature_interval": 0}, "curvature_interval"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"eps": 0.0}, "eps"),
    ],
)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_invalid_hyperparameters_name_the_argument(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        cls(_mlp(), **kwargs)


def test_invalid_model_and_adafish_options() -> None:
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        AdaFisher(frozen)
    with pytest.raises(TypeError, match="model must be the nn\\.Module"):
        AdaFisher(list(_mlp().parameters()))
    with pytest.raises(ValueError, match=r"^ema_mode must be 'convex', got 'official'"):
        AdaFish(_mlp(), ema_mode="official")
    with pytest.raises(ValueError, match=r"^max_full_dim must be"):
        AdaFish(_mlp(), max_full_dim=-1)


def test_remove_hooks_stops_collection() -> None:
    model = _mlp()
    optimizer = AdaFisher(model)
    optimizer.curvature.remove_hooks()
    model(torch.randn(3, 6)).sum().backward()
    assert all(layer.acc_in is None for layer in optimizer.curvature.layers.values())


def step_in_parts(optimizer: FisherOptimizer, parts: list[list[torch.Tensor]]) -> None:
    """What a DeepSpeed engine does: one ``step()`` per param group (ZeRO 1/2) or sub-group (ZeRO 3), each call
    seeing that group alone (an empty one included), inside the loop's explicit optimizer step."""
    group = optimizer.param_groups[0]
    with optimizer.one_step():
        for part in parts:
            optimizer.param_groups = [{**group, "params": part}]
            optimizer.step()
    optimizer.param_groups = [group]


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_one_step_over_per_group_calls_equals_one_call_over_all_parameters(cls: type) -> None:
    whole_model, split_model = tiny_lora_qwen2(), tiny_lora_qwen2()
    whole, split = cls(whole_model, lr=1e-3, curvature_interval=2), cls(split_model, lr=1e-3, curvature_interval=2)
    params = split.param_groups[0]["params"]
    parts = [params[: len(params) // 3], [], params[len(params) // 3 :]]
    for seed in range(3):
        for model in (whole_model, split_model):
            model.zero_grad()
            model(**lm_batch(seed)).loss.backward()
        whole.step()
        step_in_parts(split, parts)
    assert whole.curvature.steps == split.curvature.steps == 3  # not once per call
    for (name, a), b in zip(_lora_state(whole_model).items(), _lora_state(split_model).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    for name, layer in whole.curvature.layers.items():
        torch.testing.assert_close(layer.S, split.curvature.layers[name].S, rtol=0, atol=0)


def test_adafish_refuses_a_step_split_over_calls() -> None:
    model = tiny_lora_qwen2()
    optimizer = AdaFish(model, lr=1e-3)
    model(**lm_batch(0)).loss.backward()
    params = optimizer.param_groups[0]["params"]
    with pytest.raises(ValueError, match="AdaFish needs all trainable parameters in one step"):
        step_in_parts(optimizer, [params[:2], params[2:]])
