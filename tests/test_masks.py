"""FISH Mask / FISH-Tuning (ALGORITHMS.md §3) against one-example-at-a-time loops and explicit counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisher_scale.masks import (
    MaskSchedule,
    apply_mask,
    candidate_parameters,
    equal_budget_ratio,
    fisher_scores,
    load_mask,
    mask_report,
    save_mask,
    select_mask,
)
from fisher_scale.models import Lora, apply_lora, tiny_causal_lm
from fisher_scale.optim import build_optimizer
from fisher_scale.optim.pieces import elementwise

from .conftest import lm_batch, tiny_classifier, tiny_lora_qwen2


def _class_batches(seed: int, count: int = 2, batch: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 64, (batch, 9), generator=generator),
            "labels": torch.randint(0, 3, (batch,), generator=generator),
        }
        for _ in range(count)
    ]


def _loop_scores(model: nn.Module, batches: list[dict], names: list[str], variant: str, samples: int) -> dict:
    """The definition: one example at a time, dropout off, squared gradients summed."""
    params = dict(model.named_parameters())
    scores = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()
    examples = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    for example in examples[:samples]:
        if variant == "empirical":
            model.zero_grad()
            model(**example).loss.backward()
            for n in names:
                scores[n] += params[n].grad.square()
        else:
            inputs = {k: v for k, v in example.items() if k != "labels"}
            with torch.no_grad():
                probs = torch.softmax(model(**inputs).logits[0], -1)
            for c in range(probs.shape[0]):
                model.zero_grad()
                (-torch.log_softmax(model(**inputs).logits[0], -1)[c]).backward()
                for n in names:
                    scores[n] += probs[c] * params[n].grad.square()
    return scores


@pytest.mark.parametrize(
    "kind,target,variant,samples",
    [
        ("lora_lm", "peft", "empirical", 6),
        ("classifier", "model", "empirical", 8),
        ("classifier", "model", "expect", 5),
    ],
)
def test_batched_scores_equal_the_single_example_loop(kind: str, target: str, variant: str, samples: int) -> None:
    if kind == "lora_lm":
        model, batches = tiny_lora_qwen2(), [lm_batch(0, batch=4), lm_batch(1, batch=4)]
    else:
        model, batches = tiny_classifier(), _class_batches(0)
    model.train()
    scores = fisher_scores(model, batches, target=target, variant=variant, samples=samples)
    assert model.training  # mode restored
    candidates, _ = candidate_parameters(model, target)
    assert set(scores) == set(candidates)
    expected = _loop_scores(model, batches, list(scores), variant, samples)
    for name, score in scores.items():
        torch.testing.assert_close(score, expected[name], rtol=1e-4, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert sum(float(s.sum()) for s in scores.values()) > 0


def test_peft_target_takes_only_adapter_matrices_and_model_target_keeps_the_head() -> None:
    candidates, heads = candidate_parameters(tiny_lora_qwen2(), "peft")
    assert candidates and all(".lora_A." in n or ".lora_B." in n for n in candidates) and not heads
    candidates, heads = candidate_parameters(tiny_classifier(), "model")
    assert set(heads) == {"classifier.weight", "classifier.bias"}
    assert "bert.embeddings.word_embeddings.weight" in candidates


def test_exactly_k_kept_with_deterministic_ties() -> None:
    scores = {"a": torch.tensor([3.0, 1.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 0.0], [5.0, 1.0]])}
    mask = select_mask(scores, 0.5)  # k = 4 of 8: 5, 3 and the first two of the five 1.0s in flat order
    assert mask["a"].tolist() == [True, True, True, False]
    assert mask["b"].tolist() == [[False, False], [True, False]]
    for ratio in (0.125, 0.25, 0.375, 0.625, 1.0):
        assert sum(int(m.sum()) for m in select_mask(scores, ratio).values()) == round(ratio * 8)
    flat_zero = {"x": torch.zeros(10)}
    assert select_mask(flat_zero, 0.3)["x"].tolist() == [True] * 3 + [False] * 7


def brute_selection(scores: dict[str, torch.Tensor], k: int, lowest: bool) -> dict[str, list[bool]]:
    """The k highest (or lowest) entries by sorting (score, flat index) pairs: ties go to the lowest index."""
    flat = [(v, name, i) for name in scores for i, v in enumerate(scores[name].reshape(-1).tolist())]
    order = sorted(range(len(flat)), key=lambda j: (flat[j][0] if lowest else -flat[j][0], j))
    chosen = {(flat[j][1], flat[j][2]) for j in order[:k]}
    return {name: [(name, i) in chosen for i in range(scores[name].numel())] for name in scores}


@pytest.mark.parametrize("selection", ["fisher", "reversed"])
def test_fisher_and_reversed_selection_equal_a_sort(selection: str) -> None:
    generator = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.randint(0, 5, (6, 7), generator=generator).float(),
        "b": torch.randint(0, 5, (9,), generator=generator).float(),
    }
    for ratio in (0.1, 0.3, 0.5, 0.9):
        mask = select_mask(scores, ratio, selection=selection)
        expected = brute_selection(scores, round(ratio * 51), lowest=selection == "reversed")
        assert {n: m.reshape(-1).tolist() for n, m in mask.items()} == expected, ratio


def test_random_selection_keeps_k_seeded_entries_whatever_the_scores() -> None:
    """Exactly k entries, the same for a seed, other entries for another seed; over 300 seeds every entry is
    kept about ratio of the time, so the scores (here strictly ordered) play no part."""
    scores = {"a": torch.arange(30.0).reshape(5, 6), "b": torch.arange(30.0, 40.0)}
    masks = [select_mask(scores, 0.3, selection="random", seed=seed) for seed in range(300)]
    assert all(sum(int(m.sum()) for m in mask.values()) == 12 for mask in masks)
    assert all(torch.equal(masks[0][n], select_mask(scores, 0.3, selection="random", seed=0)[n]) for n in scores)
    assert not all(torch.equal(masks[0][n], masks[1][n]) for n in scores)
    frequency = torch.stack([torch.cat([m["a"].reshape(-1), m["b"]]).float() for m in masks]).mean(0)
    assert frequency.sub(0.3).abs().max() < 0.12  # ~4.5 standard deviations of a 300-draw frequency
    with pytest.raises(ValueError, match=r"mask\.selection must be one of"):
        select_mask(scores, 0.3, selection="lowest")


def test_random_selection_scores_nothing() -> None:
    model = _standard_lora()

    def no_batches() -> list:
        raise AssertionError("a random mask must not score")

    schedule = MaskSchedule(model, build_optimizer("adamw", model), no_batches, ratio=0.25, selection="random")
    schedule.before_step(0)
    candidates, _ = candidate_parameters(model, "peft")
    kept = sum(int(schedule.mask[n].sum()) for n in candidates)
    assert kept == round(0.25 * sum(p.numel() for p in candidates.values()))


def test_selection_is_global_not_per_layer() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = {"loud": 1000 * torch.rand(50, generator=generator), "quiet": torch.rand(50, generator=generator)}
    mask = select_mask(scores, 0.4)  # 40 entries: all from the loud layer
    assert int(mask["loud"].sum()) == 40 and int(mask["quiet"].sum()) == 0


def test_task_head_is_always_kept_and_counts_against_the_budget() -> None:
    model = tiny_classifier()
    candidates, heads = candidate_parameters(model, "model")
    scores = {n: torch.rand_like(p) for n, p in candidates.items()}
    mask = select_mask(scores, 0.01, always_keep=heads)
    total = sum(p.numel() for p in (*candidates.values(), *heads.values()))
    assert sum(int(m.sum()) for m in mask.values()) == round(0.01 * total)
    assert all(mask[n].all() for n in heads)
    with pytest.raises(ValueError, match="raise the ratio"):
        select_mask(scores, 1e-6, always_keep=heads)


MASK_OPTIMIZERS = ["adamw", "adafisher", "adafisherw", "adafish"]


@pytest.mark.parametrize("name", MASK_OPTIMIZERS)
def test_masked_entries_stay_bit_identical_under_every_optimizer(name: str) -> None:
    model = tiny_lora_qwen2()
    optimizer = build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    candidates, _ = candidate_parameters(model, "peft")
    generator = torch.Generator().manual_seed(3)
    mask = select_mask({n: torch.rand(p.shape, generator=generator) for n, p in candidates.items()}, 0.3)
    before = {n: p.detach().clone() for n, p in candidates.items()}
    updates = apply_mask(model, optimizer, mask)
    for step in range(12):
        optimizer.zero_grad()
        model(**lm_batch(step)).loss.backward()
        optimizer.step()
    for n, p in candidates.items():
        assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]]), n
        assert not torch.equal(p.detach()[mask[n]], before[n][mask[n]]), n
    with updates.full_state():
        full = [(n, k, v) for n, p in candidates.items() for k, v in optimizer.state[p].items() if elementwise(v, p)]
        assert full and all(not value[~mask[n]].any() for n, _, value in full)


@pytest.mark.parametrize("name", MASK_OPTIMIZERS)
def test_masked_entries_hold_no_state_between_steps_and_train_as_with_full_zeroed_state(name: str) -> None:
    """Outside ``step()`` each per-element state tensor of a masked parameter holds its kept entries only, and
    training is the same as the plain rule run at full size: the gradient masked, then after every step the
    masked values put back and their state zeroed (an independent loop with the same optimizer)."""
    from fisher_scale.optim import optimizer_state_bytes

    def trained(packed: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = tiny_lora_qwen2()
        optimizer = build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
        params = dict(model.named_parameters())
        if packed:
            apply_mask(model, optimizer, mask)
        start = {n: params[n].detach().clone() for n in mask}
        for step in range(8):
            optimizer.zero_grad()
            model(**lm_batch(step)).loss.backward()
            if not packed:
                for n, m in mask.items():
                    params[n].grad.mul_(m)
            optimizer.step()
            if not packed:
                with torch.no_grad():
                    for n, m in mask.items():
                        params[n].copy_(torch.where(m, params[n], start[n]))
                        for value in optimizer.state[params[n]].values():
                            if elementwise(value, params[n]):
                                value.masked_fill_(~m, 0)
        return model, optimizer

    candidates, _ = candidate_parameters(tiny_lora_qwen2(), "peft")
    generator = torch.Generator().manual_seed(5)
    mask = select_mask({n: torch.rand(p.shape, generator=generator) for n, p in candidates.items()}, 0.25)
    (packed_model, packed_optimizer), (full_model, full_optimizer) = trained(True), trained(False)
    for (n, a), b in zip(packed_model.named_parameters(), full_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), n
    params = dict(packed_model.named_parameters())
    per_element = 0
    for n, m in mask.items():
        moments = [
            v for v in packed_optimizer.state[params[n]].values() if isinstance(v, torch.Tensor) and v.numel() > 1
        ]
        assert moments and all(v.shape == (int(m.sum()),) for v in moments), n
        per_element += len(moments)
    saved = optimizer_state_bytes(full_optimizer) - optimizer_state_bytes(packed_optimizer)
    masked = sum(int((~m).sum()) for m in mask.values())
    assert saved == masked * 4 * per_element // len(mask)  # fp32, the same moments in every masked tensor


def _standard_lora() -> nn.Module:
    """peft's own init: B = 0."""
    return apply_lora(tiny_causal_lm(seed=0), Lora(rank=4, target_modules=("q_proj", "v_proj")))


def _byte_batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    return [lm_batch(seed, batch=4, vocab=384) for seed in range(count)]


@pytest.mark.parametrize("warmup,expect_a", [(0, False), (2, True)])
def test_lora_b_zero_trap_at_warmup_zero_and_avoided_with_warmup(warmup: int, expect_a: bool) -> None:
    model = _standard_lora()
    optimizer = build_optimizer("adamw", model, lr=1e-2)
    schedule = MaskSchedule(model, optimizer, _byte_batches, ratio=0.2, samples=8, warmup_steps=warmup)
    reports = []
    for step, batch in enumerate(_byte_batches(warmup + 1)):
        report = schedule.before_step(step)
        if report is not None:
            reports.append(report)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert len(reports) == 1
    assert (reports[0]["kept/lora_A"] > 0) == expect_a
    assert reports[0]["kept/all"] == pytest.approx(0.2, abs=1e-3)
    assert any(key.startswith("kept/block/") for key in reports[0])


def test_refresh_recomputes_and_zeroes_state_of_newly_masked_entries() -> None:
    model = tiny_lora_qwen2()
    optimizer = build_optimizer("adafisherw", model, lr=1e-2, weight_decay=0.1)
    schedule = MaskSchedule(model, optimizer, lambda: [lm_batch(10 + step)], ratio=0.3, samples=4, refresh_every=3)
    masks, params, kept_across = [], dict(model.named_parameters()), 0
    for step in range(7):
        with schedule.full_state():
            before = {n: s["exp_avg"].clone() for n, p in params.items() if (s := optimizer.state.get(p))}
        if schedule.before_step(step) is not None:
            masks.append({n: m.clone() for n, m in schedule.mask.items()})
            with schedule.full_state():  # newly masked entries lose their state, entries kept in both keep theirs
                for n, m in schedule.mask.items():
                    if n in before:
                        state = optimizer.state[params[n]]["exp_avg"]
                        assert not state[~m].any()
                        both = m & masks[-2][n]
                        assert torch.equal(state[both], before[n][both]), n
                        kept_across += int(both.sum())
        optimizer.zero_grad()
        model(**lm_batch(step)).loss.backward()
        optimizer.step()
    assert len(masks) == 3  # steps 0, 3, 6
    assert any(not torch.equal(masks[0][n], masks[1][n]) for n in masks[0]) and kept_across > 0


def test_equal_budget_ratio_matches_vanilla_lora_parameter_count() -> None:
    wide = apply_lora(tiny_causal_lm(), Lora(rank=8, target_modules=("q_proj", "v_proj")))
    narrow = apply_lora(tiny_causal_lm(), Lora(rank=2, target_modules=("q_proj", "v_proj")))
    ratio = equal_budget_ratio(wide, rank=2)
    assert ratio == pytest.approx(0.25)
    candidates, _ = candidate_parameters(wide, "peft")
    mask = select_mask({n: torch.rand_like(p) for n, p in candidates.items()}, ratio)
    narrow_count = sum(p.numel() for n, p in narrow.named_parameters() if "lora_" in n)
    assert sum(int(m.sum()) for m in mask.values()) == narrow_count


def test_mask_saves_and_loads_and_mismatches_are_clear(tmp_path) -> None:
    model = tiny_lora_qwen2(rank=4)
    candidates, _ = candidate_parameters(model, "peft")
    mask = select_mask({n: torch.rand_like(p) for n, p in candidates.items()}, 0.5)
    path = save_mask(mask, tmp_path / "mask.safetensors")
    loaded = load_mask(path, model)
    assert loaded.keys() == mask.keys() and all(torch.equal(loaded[n], mask[n]) for n in mask)
    with pytest.raises(ValueError, match=r"mask\.safetensors: mask does not match the model: shape mismatches"):
        load_mask(path, tiny_lora_qwen2(rank=2))
    with pytest.raises(ValueError, match="unknown parameters"):
        load_mask(path, tiny_classifier())
    with pytest.raises(FileNotFoundError, match="mask file not found"):
        load_mask(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors mask file"):
        load_mask(tmp_path / "junk.safetensors")


def test_report_counts_a_and_b_separately() -> None:
    mask = {
        "m.layers.0.q.lora_A.default.weight": torch.tensor([True, False]),
        "m.layers.0.q.lora_B.default.weight": torch.tensor([True, True, True, False]),
    }
    report = mask_report(mask)
    assert report["kept/lora_A"] == 0.5 and report["kept/lora_B"] == 0.75
    assert report["kept/all"] == pytest.approx(4 / 6) and report["kept/block/m.layers.0"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ratio": 0.0}, r"mask\.ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"mask\.ratio must be in \(0, 1\]"),
    ],
)
def test_bad_ratio(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_mask({"a": torch.ones(3)}, **kwargs)


def test_bad_scoring_input() -> None:
    model, batches = tiny_lora_qwen2(), [lm_batch(0)]
    with pytest.raises(ValueError, match=r"mask\.samples must be an integer >= 1"):
        fisher_scores(model, batches, samples=0)
    with pytest.raises(ValueError, match=r"mask\.variant='expect' is defined for classification"):
        fisher_scores(model, batches, variant="expect", samples=2)
    with pytest.raises(ValueError, match=r"mask\.variant must be one of"):
        fisher_scores(model, batches, variant="fisher")
    with pytest.raises(ValueError, match=r"mask\.target must be one of"):
        fisher_scores(model, batches, target="adapters")
    with pytest.raises(ValueError, match="finds no trainable candidate"):
        fisher_scores(tiny_classifier(), _class_batches(0), target="peft")
    with pytest.raises(ValueError, match="needs 'labels'"):
        fisher_scores(model, [{"input_ids": lm_batch(0)["input_ids"]}])
    with pytest.raises(ValueError, match=r"mask\.warmup_steps must be an integer >= 0"):
        MaskSchedule(model, build_optimizer("adamw", model), lambda: batches, ratio=0.5, warmup_steps=-1)


def test_padded_batches_score_like_unpadded_single_examples() -> None:
    """Right-padded examples with an attention mask: each scores as if it were alone and unpadded."""
    model = tiny_lora_qwen2()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (3, 10), generator=generator)
    lengths = [10, 6, 8]
    mask = torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    scores = fisher_scores(model, [batch], samples=3)
    unpadded = [{"input_ids": ids[i : i + 1, :n], "labels": ids[i : i + 1, :n]} for i, n in enumerate(lengths)]
    expected = _loop_scores(model, unpadded, list(scores), "empirical", 3)
    for name, score in scores.items():
        torch.testing.assert_close(score, expected[name], rtol=1e-4, atol=1e-10)
