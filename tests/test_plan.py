"""The memory plan: its activation terms against the bytes autograd saves, its state terms against the optimizers'
own state, the largest batch against a search of every batch, and the check that refuses a run before Ray starts.
(The ZeRO state terms are checked against measured runs in test_distributed.py, the peak in bench/memory_plan.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fisher_scale.cli import main
from fisher_scale.config import ConfigError, build_config, with_values
from fisher_scale.models import Lora, apply_lora, load_model
from fisher_scale.optim import build_optimizer, optimizer_state_bytes, state_layout
from fisher_scale.plan import plan_memory
from fisher_scale.plan.activations import DecoderShape, Training, decoder_model
from fisher_scale.plan.check import USABLE, check_memory, facts_of, largest_batch

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EVERY_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")


def saved_bytes(
    model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor | None = None
) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (the weights left out); a causal
    LM's labels are its ids."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=attention, labels=ids if labels is None else labels)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("dtype", "targets", "padded"),
    [
        (torch.float32, ATTENTION, False),
        (torch.bfloat16, ATTENTION, False),
        (torch.float32, EVERY_LINEAR, True),
        (torch.bfloat16, EVERY_LINEAR, True),
        (torch.float32, ("v_proj",), False),
        (torch.float32, ("down_proj",), True),
        (torch.float32, None, False),  # full fine-tuning
        (torch.bfloat16, None, True),
    ],
)
def test_activation_terms_equal_the_bytes_autograd_saves(
    dtype: torch.dtype, targets: tuple[str, ...] | None, padded: bool
) -> None:
    model = load_model("tiny-x2", dtype=dtype)
    if targets is not None:
        # DeepSpeed casts a bf16 run's adapters to bf16 with the rest (PEFT alone keeps them in fp32)
        model = apply_lora(model, Lora(8, 16, 0.0, targets)).to(dtype)
    batch, tokens = (1, 40) if padded else (3, 48)
    ids = torch.randint(0, 384, (batch, tokens))
    attention = torch.ones_like(ids)
    if padded:
        attention[0, tokens // 2 :] = 0  # one sequence: also its labels' shift, a view
    training = Training(frozenset(targets or ()), 8, 0.0, full=targets is None)
    planned = decoder_model(
        DecoderShape.of(model.config), dtype.itemsize, training, batch=batch, tokens=tokens, padded=padded
    )
    assert saved_bytes(model, ids, attention) == planned


def test_classifier_activation_terms_equal_the_bytes_autograd_saves() -> None:
    """A decoder classifier pools one token per sequence: no vocabulary-wide log-softmax, and its trained head
    (PEFT's modules_to_save) keeps its input."""
    model = apply_lora(
        load_model("tiny-x2", task="classification", num_labels=3), Lora(8, 16, 0.0, ATTENTION), task="classification"
    )
    batch, tokens = 3, 40
    ids = torch.randint(1, 384, (batch, tokens))
    saved = saved_bytes(model, ids, torch.ones_like(ids), labels=torch.tensor([0, 2, 1]))
    shape = DecoderShape.of(model.config, causal=False)
    training = Training(frozenset(ATTENTION), 8, 0.0)
    assert saved == decoder_model(shape, 4, training, batch=batch, tokens=tokens, padded=False)


@pytest.mark.parametrize("name", ["adamw", "adafisher", "adafish"])
def test_state_layout_gives_the_optimizers_state_after_a_step(name: str) -> None:
    """Moments per element, AdamW's step counters per tensor and the Fisher factors (AdaFish's full r × r sides
    and their eigenbases included) add up to what the optimizer holds after a real step."""
    model = apply_lora(load_model("tiny-x2"), Lora(8, 16, 0.0, EVERY_LINEAR))
    optimizer = build_optimizer(name, model, lr=1e-3)
    layout = state_layout(optimizer, model)
    ids = torch.randint(0, 384, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trained = [p for p in model.parameters() if p.requires_grad]
    planned = sum(layout.per_element * p.numel() + layout.per_tensor for p in trained) + layout.replicated
    assert planned == optimizer_state_bytes(optimizer)
    assert (layout.replicated > 0) == (name != "adamw")


def config(**values: object) -> object:
    tree = {
        "model": {"name": "tiny-x2"},
        "data": {"dataset": "gsm8k", "max_length": 128, "batch_size": 4},
        "eval": {"enabled": False},
    }
    return with_values(build_config(tree), values)


def test_largest_batch_is_the_largest_batch_that_fits() -> None:
    cfg = config()
    facts = facts_of(cfg)
    peaks = {b: plan_memory(with_values(cfg, {"data.batch_size": b}), facts).peak for b in range(1, 65)}
    assert all(peaks[b] < peaks[b + 1] for b in range(1, 64))  # activations grow with the batch
    memory = int(peaks[37] / USABLE) + 1  # room for 37, not for 38
    assert largest_batch(cfg, memory) == 37
    assert largest_batch(cfg, int(peaks[1] / USABLE) - 1) == 0


def test_check_refuses_what_does_not_fit_naming_the_keys_and_passes_when_skipped() -> None:
    cfg = config(**{"distributed.device_memory_gib": 0.01})
    with pytest.raises(ConfigError) as refused:
        check_memory([("point a", cfg), ("point b", with_values(cfg, {"data.batch_size": 1}))])
    message = str(refused.value)
    assert message.count("point a: the memory plan needs") == 1
    assert "point b" not in message  # batch 1 fits 10 MiB
    assert "data.batch_size ≤ 1" in message and "model.activation_checkpointing: true" in message
    assert "distributed.zero_stage" in message
    check_memory([("", with_values(cfg, {"distributed.memory_check": False}))])
    check_memory([("", config(**{"distributed.device_memory_gib": 1.0}))])


def test_plan_command_prints_the_terms_and_exits_2_when_a_grid_point_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "model: {name: tiny}\ndata: {dataset: gsm8k, max_length: 128, batch_size: 4}\n"
        "distributed: {device_memory_gib: 0.05}\n"
        "scale: {grid: {model.name: [tiny, tiny-x4], optimizer.name: [adamw, adafish]}}\n"
    )
    assert main(["plan", str(path)]) == 2
    out = capsys.readouterr().out
    assert "optimizer state" in out and "Fisher factors" in out and "peak" in out
    assert "activations with checkpointing" in out  # the config has it off: the other setting for comparison
    assert "tiny-x4" in out and " no " in out and " yes " in out
    assert "does not fit: model.name=tiny-x4, optimizer.name=adamw: the memory plan needs" in " ".join(out.split())
    assert main(["plan", str(path), "--set", "scale.grid={}", "--set", "model.name=tiny"]) == 0


def test_train_is_refused_before_ray_starts_or_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fisher_scale.train import launcher

    def no_ray(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launcher, "start_ray", no_ray)
    out = tmp_path / "run"
    cfg = config(**{"distributed.device_memory_gib": 0.001, "train.output_dir": str(out)})
    cfg = with_values(cfg, {"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with pytest.raises(ConfigError, match="memory plan needs"):
        launcher.run_training(cfg)
    assert sorted(tmp_path.iterdir()) == []


def test_mask_scoring_batches_are_mask_batch_size_and_the_plan_grows_with_them() -> None:
    from fisher_scale.data import default_data_dir
    from fisher_scale.train.dataset import TrainingSet

    source = str(default_data_dir() / "gsm8k")
    settings = {"mask.enabled": True, "mask.samples": 10, "eval.batch_size": 8, "data.max_train_examples": 16}
    cfg = config(**settings, **{"data.source": source})
    data = TrainingSet(cfg)
    assert [len(b["input_ids"]) for b in data.scoring_batches(range(10))] == [8, 2]  # eval.batch_size by default
    smaller = with_values(cfg, {"mask.batch_size": 3})
    assert [len(b["input_ids"]) for b in TrainingSet(smaller).scoring_batches(range(10))] == [3, 3, 3, 1]
    assert plan_memory(smaller).phases["mask scoring"] < plan_memory(cfg).phases["mask scoring"]


def test_live_tensors_count_each_storage_once_until_it_is_freed() -> None:
    from fisher_scale.train.profile import LiveTensors

    with LiveTensors() as live:
        a = torch.ones(1000, 250)  # 1,000,000 bytes
        b = a * 2  # another 1,000,000
        view = b.view(-1)[10:]  # the same storage: nothing new
        del a
        c = torch.zeros(100, dtype=torch.float64)  # 800 bytes
        assert (live.live, live.peak) == (1_000_800, 2_000_000)
        del b, view, c
        assert live.live == 0


def test_planned_peak_is_within_10_percent_of_the_traced_peak_of_a_run(tmp_path: Path) -> None:
    """The whole plan against one measured run (bench/memory_plan.py measures the grid): fp32 LoRA on tiny-x4,
    ZeRO-2 on one worker, AdaFisher, activation checkpointing, a FISH mask scored at step 1 (in eval mode, so
    not checkpointed; it used to fail there on transformers' checkpointing hook), live tensor bytes traced."""
    from fisher_scale.data import default_data_dir
    from fisher_scale.train.local import run_jobs
    from fisher_scale.train.metrics import PEAK_MEMORY, STATE_BYTES

    tree = {
        "model": {"name": "tiny-x4", "activation_checkpointing": True},
        "peft": {"target_modules": list(EVERY_LINEAR)},
        "mask": {"enabled": True, "samples": 4, "warmup_steps": 1},
        "data": {"source": str(default_data_dir() / "gsm8k"), "max_length": 128, "max_train_examples": 16},
        "train": {"steps": 2, "log_every": 2, "output_dir": str(tmp_path / "run"), "trace_memory": True},
        "eval": {"enabled": False, "batch_size": 2},
        "distributed": {"zero_stage": 2, "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1_000_000}}},
    }
    dense = {**tree, "mask": {"enabled": False}, "train": {**tree["train"], "output_dir": str(tmp_path / "dense")}}
    run_jobs(1, [("run", tree, None), ("dense", dense, None)], tmp_path)
    for name, config, phase in (("run", tree, "mask scoring"), ("dense", dense, "activations")):
        report = torch.load(tmp_path / f"{name}-reports.pt", weights_only=False)[-1]
        plan = plan_memory(build_config(config))
        assert plan.held["optimizer state"] + plan.held["Fisher factors"] == report[STATE_BYTES]
        assert abs(plan.peak / report[PEAK_MEMORY] - 1) < 0.10, (name, plan.peak, report[PEAK_MEMORY])
        assert plan.peak_phase == phase


@pytest.mark.parametrize("command", ["tune", "scale"])
def test_studies_are_refused_before_ray_starts_naming_each_point(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fisher_scale.scale.grid
    import fisher_scale.tune.study

    def no_cluster(*_: object, **__: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(fisher_scale.scale.grid, "start_cluster", no_cluster)
    monkeypatch.setattr(fisher_scale.tune.study, "start_cluster", no_cluster)
    path = tmp_path / "study.yaml"
    path.write_text(
        "model: {name: tiny-x2}\ndata: {dataset: gsm8k, max_length: 128, batch_size: 4}\neval: {enabled: false}\n"
        f"distributed: {{device_memory_gib: 0.01, storage_path: {tmp_path / 'ray'}}}\n"
        f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n"
        "tune: {num_samples: 1, space: {lr: {loguniform: [1.0e-4, 1.0e-2]}}, metric: train/loss}\n"
        "scale: {grid: {optimizer.name: [adamw, adafish]}}\n"
    )
    assert main([command, str(path)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "the memory plan needs" in out and "data.batch_size ≤" in out
    if command == "scale":
        assert "name=adamw: the memory plan" in out and "name=adafish: the memory plan" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()
    assert main([command, str(path), "--no-memory-check", "--set", "distributed.storage_path=/dev/null/x"]) == 2
    assert "memory plan" not in capsys.readouterr().out  # the check skipped: the next one (the folder) refuses


#: the published config.json values of the Qwen2.5 base models the cluster configs train (no hub access in tests)
QWEN25 = {
    "Qwen/Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-3B": (2048, 11008, 36, 16, 2, 151936, True),
    "Qwen/Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
}


def test_every_shipped_gpu_config_fits_its_gpu_by_its_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster configs against an A100 40 GB (their distributed.device_memory_gib), every study optimizer and
    scale point; the skeletons have the published parameter counts."""
    import json

    from fisher_scale import models
    from fisher_scale.config import load_config
    from fisher_scale.scale.grid import grid_points, point_config

    folders = {}
    for name, (hidden, mlp, layers, heads, kv, vocab, tied) in QWEN25.items():
        folder = tmp_path / name.split("/")[1]
        folder.mkdir()
        config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden}
        config |= {"intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads}
        config |= {"num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied}
        (folder / "config.json").write_text(json.dumps(config))
        folders[name] = folder
    original = models._pretrained_source
    monkeypatch.setattr(models, "_pretrained_source", lambda name: folders.get(name) or original(name))
    counts = {n: sum(p.numel() for p in models.model_skeleton(n).parameters()) for n in QWEN25}
    assert [round(c / 1e9, 2) for c in counts.values()] == [0.49, 1.54, 3.09, 7.62]
    shipped = Path(__file__).resolve().parents[1] / "tune_configs"
    planned = []
    for path in sorted(shipped.glob("*.yaml")):
        cfg = load_config(path)
        if not cfg.distributed.use_gpu:
            continue
        assert cfg.distributed.device_memory_gib == 39.5, path.name
        configs = [point_config(cfg, p) for p in grid_points(cfg)] if cfg.scale.grid else [cfg]
        if cfg.tune.optimizers:
            configs = [with_values(c, {"optimizer.name": o}) for c in configs for o in cfg.tune.optimizers]
        check_memory((path.name, c) for c in configs)
        planned.append(path.name)
    assert len(planned) == 4, planned
    study = load_config(shipped / "study-gsm8k-qwen2.5-7b.yaml")
    with pytest.raises(ConfigError, match=r"at its mask scoring.*mask\.batch_size ≤ 1; or eval\.batch_size ≤ 2\d;"):
        check_memory([("", with_values(study, {"mask.batch_size": None, "eval.batch_size": 32}))])
