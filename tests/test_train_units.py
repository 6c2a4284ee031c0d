"""Training building blocks that need no Ray: batch schedule, DeepSpeed config, config files, resources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from fisher_scale.config import ConfigError, build_config, load_config, with_values
from fisher_scale.train.batches import StepBatches
from fisher_scale.train.engine import deepspeed_config
from fisher_scale.train.launcher import check_resources


def _step_examples(batches: StepBatches, step: int) -> list[int]:
    return [
        i
        for micro in range(batches.accumulation)
        for rank in range(batches.world)
        for i in batches.indices(step, rank, micro)
    ]


def test_n_workers_see_what_one_worker_sees_with_n_times_the_batch() -> None:
    two = StepBatches(num_examples=23, batch_size=3, accumulation=2, world=2, seed=7)
    one = StepBatches(num_examples=23, batch_size=6, accumulation=2, world=1, seed=7)
    for step in range(10):  # crosses several epochs
        assert sorted(_step_examples(two, step)) == sorted(_step_examples(one, step))


def test_ranks_get_disjoint_examples_within_an_epoch() -> None:
    batches = StepBatches(num_examples=24, batch_size=3, accumulation=2, world=2, seed=1)
    for step in range(4):
        seen = _step_examples(batches, step)
        assert len(set(seen)) == len(seen) == 12


def test_every_example_once_per_epoch_and_reshuffled() -> None:
    batches = StepBatches(num_examples=12, batch_size=2, accumulation=1, world=2, seed=0)
    first = [i for s in range(3) for i in _step_examples(batches, s)]
    second = [i for s in range(3, 6) for i in _step_examples(batches, s)]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second


def test_deepspeed_keys_pass_through_recursively() -> None:
    cfg = build_config(
        {
            "eval": {"enabled": False},
            "distributed": {
                "zero_stage": 3,
                "num_workers": 2,
                "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}, "gradient_clipping": 0.5},
            },
        },
        ["data.batch_size=3", "data.gradient_accumulation_steps=2"],
    )
    ds = deepspeed_config(cfg, world=2)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert ds["gradient_clipping"] == 0.5 and ds["train_batch_size"] == 12


def test_config_file_errors_name_file_and_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("lr: 0.1\noptimizer:\n  dampng: 0.1\ndistributed:\n  zero_stage: 5\n")
    with pytest.raises(ConfigError) as error:
        load_config(typo, ["optimizer.name=sgd"])
    text = str(error.value)
    assert "optimizer.dampng: unknown key" in text and "distributed.zero_stage" in text and "optimizer.name" in text
    with pytest.raises(ConfigError, match=r"adafish needs peft\.enabled=true"):
        build_config({"optimizer": {"name": "adafish"}, "peft": {"enabled": False}})
    build_config({"distributed": {"zero_stage": 3, "num_workers": 2}})  # evaluation under ZeRO-3 pairs up ranks
    gpu = {"use_gpu": True, "zero_stage": 0}
    for bf16 in ({"model": {"dtype": "bfloat16"}}, {"distributed": {"deepspeed": {"bf16": {"enabled": True}}}}):
        with pytest.raises(ConfigError, match=r"bf16 at distributed\.zero_stage=0 .* use zero_stage 1, 2 or 3"):
            build_config({**bf16, "distributed": {**gpu, **bf16.get("distributed", {})}})
    build_config({"model": {"dtype": "bfloat16"}, "distributed": {**gpu, "zero_stage": 1}})
    fp16 = {"distributed": {**gpu, "zero_stage": 2, "deepspeed": {"fp16": {"enabled": True}}}}
    with pytest.raises(ConfigError, match=r"distributed\.deepspeed\.fp16 is not supported: .* model\.dtype=bfloat16"):
        build_config(fp16)
    build_config({"distributed": {**gpu, "zero_stage": 2, "deepspeed": {"fp16": {"enabled": False}}}})
    with pytest.raises(ConfigError, match="--set expects key=value"):
        build_config({}, ["lr"])


def test_workers_must_fit_the_cluster() -> None:
    cfg = build_config({"distributed": {"num_workers": 3}})
    with pytest.raises(ConfigError, match="needs 3 CPUs; the Ray cluster has 2"):
        check_resources(cfg, {"CPU": 2.0})
    check_resources(build_config({"distributed": {"num_workers": 2}}), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        check_resources(build_config({"distributed": {"num_workers": 2, "use_gpu": True}}), {"CPU": 8.0})


def test_every_shipped_config_validates() -> None:
    configs = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.name and cfg.train.steps > 0, path
        if "\ntune:" in path.read_text():  # a study config: its search space and metric are checked too
            from fisher_scale.tune.space import check_study

            try:
                check_study(cfg)
            except ConfigError as error:  # it names the bad space, metric or ASHA setting
                pytest.fail(f"{path}: {error}")


def test_paths_are_resolved_and_missing_data_is_a_config_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fisher_scale.train.launcher import resolve_paths

    with pytest.raises(ConfigError, match=r"data\.source: .*absent does not exist"):
        resolve_paths(build_config({"data": {"source": str(tmp_path / "absent")}}))
    (tmp_path / "gsm8k").mkdir()
    cfg = resolve_paths(build_config({"data": {"source": str(tmp_path / "gsm8k")}, "train": {"output_dir": "out"}}))
    assert Path(cfg.train.output_dir).is_absolute() and cfg.data.source == str(tmp_path / "gsm8k")
    hub = resolve_paths(build_config({"data": {"source": "openai/gsm8k"}}))
    assert hub.data.source == "openai/gsm8k"
    monkeypatch.chdir(tmp_path)  # a relative path under an existing folder is a missing copy, not a hub id
    with pytest.raises(ConfigError, match=r"data\.source: gsm8k/train does not exist, though the folder .*gsm8k does"):
        resolve_paths(build_config({"data": {"source": "gsm8k/train"}}))


def test_too_many_workers_fail_before_ray_starts(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fisher_scale.train import launcher

    def no_ray(cfg: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launcher, "start_ray", no_ray)
    cfg = build_config({"train": {"output_dir": str(tmp_path / "run")}, "distributed": {"num_workers": 64}})
    with pytest.raises(ConfigError, match="needs 64 CPUs"):
        launcher.run_training(cfg)


def test_profiler_counts_fisher_statistics_from_hooks_as_optimizer_time() -> None:
    """Seconds the optimizer's hooks spend on statistics move from forward/backward to the optimizer phase."""
    import torch

    from fisher_scale.optim import AdaFisher
    from fisher_scale.train.profile import StepProfiler

    from .conftest import lm_batch, tiny_lora_qwen2

    model = tiny_lora_qwen2()
    optimizer = AdaFisher(model, lr=1e-3)
    profiler = StepProfiler(True)
    profiler.statistics_clock = lambda: optimizer.curvature.seconds
    hooks = {}
    before = optimizer.curvature.seconds
    with profiler.phase("forward"):
        loss = model(**lm_batch(0)).loss
    hooks["forward"], before = optimizer.curvature.seconds - before, optimizer.curvature.seconds
    with profiler.phase("backward"):
        loss.backward()
    hooks["backward"], before = optimizer.curvature.seconds - before, optimizer.curvature.seconds
    with profiler.phase("optimizer"):
        optimizer.step()
    assert hooks["forward"] > 0 and hooks["backward"] > 0 and optimizer.curvature.seconds == before
    wall = dict(profiler.wall)
    profiler.step_done()
    metrics = profiler.take()
    assert metrics["time/forward_s"] == pytest.approx(wall["forward"] - hooks["forward"])
    assert metrics["time/backward_s"] == pytest.approx(wall["backward"] - hooks["backward"])
    assert metrics["time/optimizer_s"] == pytest.approx(wall["optimizer"] + hooks["forward"] + hooks["backward"])
    with torch.no_grad():
        model(**lm_batch(1))
    assert optimizer.curvature.seconds == before  # evaluation forwards collect nothing


@pytest.mark.parametrize("guard_outside", [True, False])
def test_guard_and_mask_restore_exactly_under_the_explicit_step_boundary(guard_outside: bool) -> None:
    """Inside ``one_step`` DeepSpeed makes one ``step()`` per group: the guard skips a step whose non-finite
    gradient shows in its first call exactly (weights, moments, factors, step count; every call skipped), stops
    on one first seen in a later call, and a mask keeps its masked entries at their values over every call; nested
    (``AroundStep``), either may be the outer one."""
    import torch

    from fisher_scale.masks import MaskedUpdates
    from fisher_scale.optim import AdaFisher
    from fisher_scale.optim.around_step import AroundStep
    from fisher_scale.train.guard import NonFiniteGuard

    from .conftest import lm_batch, tiny_lora_qwen2
    from .test_adafisher import step_in_parts

    model = tiny_lora_qwen2()
    optimizer = AdaFisher(model, lr=1e-2)
    guard = NonFiniteGuard(optimizer, optimizer.pieces, skip=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5 for n, p in trainable.items()}
    wrappers = [guard, MaskedUpdates(model, optimizer, mask, register=False)]
    AroundStep(optimizer, wrappers if guard_outside else wrappers[::-1])
    group = optimizer.param_groups[0]
    parts = [group["params"][:3], group["params"][3:]]

    def step(seed: int, poison: int | None = None) -> None:
        model.zero_grad()
        loss = model(**lm_batch(seed)).loss
        guard.begin_step(seed)
        guard.check_loss(loss)
        loss.backward()
        if poison is not None:
            parts[poison][0].grad.view(-1)[0] = float("nan")
        step_in_parts(optimizer, parts)

    start = {n: p.detach().clone() for n, p in trainable.items()}
    step(0)
    for name, p in trainable.items():
        assert torch.equal(p[~mask[name]], start[name][~mask[name]]), name
    assert any(not torch.equal(p, start[n]) for n, p in trainable.items())
    after_one = {n: p.detach().clone() for n, p in trainable.items()}
    moments = {t: s["exp_avg"].clone() for t, s in optimizer.state.items()}
    factors = {n: (layer.H.clone(), layer.S.clone()) for n, layer in optimizer.curvature.layers.items()}
    step(1, poison=0)  # seen in the first call: the whole step is skipped
    assert guard.skipped == 1 and optimizer.curvature.steps == 1
    assert all(torch.equal(p, after_one[n]) for n, p in trainable.items())
    assert all(torch.equal(optimizer.state[t]["exp_avg"], m) for t, m in moments.items())
    for name, layer in optimizer.curvature.layers.items():
        assert torch.equal(layer.H, factors[name][0]) and torch.equal(layer.S, factors[name][1]), name
    step(2)
    assert optimizer.curvature.steps == 2 and guard.skipped == 1
    with pytest.raises(FloatingPointError, match=r"first seen in step\(\) call 2 of that step .* cannot be skipped"):
        step(3, poison=1)


def test_model_and_lora_targets_are_checked_before_ray_starts(tmp_path: Path) -> None:
    """On the model's meta-device skeleton: targets that name none of its modules and an unreadable model are
    config errors that name the key (and the layer names the model has); a matching config passes."""
    from fisher_scale.train.launcher import check_model

    check_model(build_config({"model": {"name": "tiny"}}))  # the default targets are Qwen2's projections
    encoder = {"model": {"name": "tiny-encoder", "task": "classification"}}
    with pytest.raises(
        ConfigError,
        match=r"peft\.target_modules: q_proj, k_proj, v_proj, o_proj name no module .*"
        r"linear layers are named classifier, dense, key, query, value",
    ):
        check_model(build_config(encoder))
    with pytest.raises(ConfigError, match=r"peft\.target_modules: o_proj name no module"):  # PEFT: silently 2 of 3
        check_model(build_config({**encoder, "peft": {"target_modules": ["query", "value", "o_proj"]}}))
    check_model(build_config({**encoder, "peft": {"target_modules": ["query", "value"]}}))
    check_model(build_config({**encoder, "peft": {"enabled": False}}))
    with pytest.raises(ConfigError, match=r"model\.name: .*absent.* cannot be loaded"):
        check_model(build_config({"model": {"name": str(tmp_path / "absent")}}))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedule_after_warm_up_is_transformers_schedule(schedule: str) -> None:
    """After warm-up, each step's lr is that of transformers' scheduler of the same name (an independent
    implementation); during warm-up it rises linearly to the peak at the last warm-up step."""
    import torch
    from transformers import get_scheduler

    from fisher_scale.train.schedule import learning_rate

    steps, warmup, peak = 40, 5, 0.3
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    ours = [learning_rate(k, peak=peak, steps=steps, warmup=warmup, schedule=schedule) for k in range(steps)]
    assert ours[:warmup] == pytest.approx([peak * (k + 1) / warmup for k in range(warmup)])
    assert ours[warmup:] == pytest.approx(expected[warmup:])
    assert ours[-1] == pytest.approx(peak if schedule == "constant" else expected[-1]) and ours[-1] > 0


def test_scoring_examples_split_over_ranks_cover_every_sample_once() -> None:
    """FISH scoring's ``mask.samples`` over the ranks: contiguous shares, sizes within one, every example once
    (the old ``samples // world`` per rank scored 1023 of 1024 on 3 ranks)."""
    from fisher_scale.train.dataset import scoring_share

    for samples, world in ((1024, 3), (256, 1), (7, 4), (5, 5)):
        shares = [scoring_share(samples, rank, world) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(samples))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(scoring_share(1024, rank, 3)) for rank in range(3)] == [341, 341, 342]
    with pytest.raises(ConfigError, match=r"mask\.samples=2 is below distributed\.num_workers=3"):
        build_config({"mask": {"enabled": True, "samples": 2}, "distributed": {"num_workers": 3}})


def test_the_dataset_is_checked_before_ray_starts() -> None:
    """An unknown dataset (before: trained as GSM8K), an unknown GLUE task and GSM8K under a classifier are config
    errors that name the key, raised by the pre-Ray path check."""
    from fisher_scale.train.launcher import resolve_paths

    for dataset, message in [
        ("sst2", r"data\.dataset must be gsm8k or glue/<task> .*got 'sst2'"),
        ("glue/sst3", r"unknown GLUE task 'sst3'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve_paths(build_config({"data": {"dataset": dataset}}))
    with pytest.raises(ConfigError, match=r"data\.dataset=gsm8k needs model\.task=causal_lm"):
        resolve_paths(build_config({"model": {"name": "tiny-encoder", "task": "classification"}}))


def test_each_task_names_its_evaluation_metrics_and_head() -> None:
    """The names are the ones the evaluation loops write (``fisher_scale.eval``), per task and model kind."""
    from fisher_scale.tasks import is_eval_metric, task_of

    classifier = build_config({"model": {"task": "classification"}, "data": {"dataset": "glue/mnli"}})
    mnli = task_of("glue/mnli")
    assert mnli.eval_split == "dev_matched" and mnli.num_labels(classifier) == 3
    assert mnli.eval_metric_names(classifier) == {
        "glue/mnli_m/accuracy",
        "glue/mnli_m/loss",
        "glue/mnli_m/majority_share",
    }
    stsb = task_of("glue/STS-B")
    assert stsb.num_labels(classifier) == 1 and "glue/stsb/majority_share" not in stsb.eval_metric_names(classifier)
    lm = build_config({})
    assert task_of("glue/sst2").num_labels(lm) is None and task_of("gsm8k").eval_metric_names(lm) == {
        "gsm8k/accuracy",
        "gsm8k/loss",
    }
    assert is_eval_metric("glue/sst2/accuracy") and not is_eval_metric("train/loss") and not is_eval_metric("gsm8k")


@pytest.mark.parametrize(
    "tree",
    [
        {
            "model": {"name": "tiny-encoder", "task": "classification"},
            "peft": {"target_modules": ["query", "value"]},
            "data": {"dataset": "glue/mrpc"},
        },
        {"model": {"name": "tiny"}, "data": {"dataset": "glue/stsb"}},
    ],
)
def test_a_task_reports_the_metric_names_it_declares(tree: dict) -> None:
    """A real (4-example) evaluation of the task writes exactly the names the sweeps check their metric against."""
    from fisher_scale.models import load_tokenizer
    from fisher_scale.tasks import task_of
    from fisher_scale.train.worker import build_model

    cfg = build_config({**tree, "eval": {"max_examples": 4, "batch_size": 4}})
    task = task_of(cfg.data.dataset)
    model = build_model(cfg, task.num_labels(cfg)).eval()
    with torch.no_grad():
        metrics = task.evaluate(cfg, model, load_tokenizer(cfg.model.name))
    assert set(metrics) == task.eval_metric_names(cfg)


def _gsm8k_copy(folder: Path, train_lines: list[str]) -> Path:
    folder.mkdir()
    record = json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"})
    (folder / "train.jsonl").write_text("".join(f"{line}\n" for line in train_lines))
    (folder / "test.jsonl").write_text(record + "\n")
    return folder


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "1 + 1?", "answer": "2\\n#### 2"}', "{not json"], r"data: .*train\.jsonl:2: not JSON"),
        (['{"question": "1 + 1?"}'], r"data: .*train\.jsonl:1: "),
        ([], r"data\.source: .* holds no training examples of gsm8k"),
    ],
)
def test_data_is_parsed_whole_on_the_driver(tmp_path: Path, lines: list[str], message: str) -> None:
    """Before Ray starts (before: a worker error 20-75 s later, or "the training set is empty" naming no file)."""
    from fisher_scale.train.launcher import check_inputs, resolve_paths

    cfg = resolve_paths(build_config({"data": {"source": str(_gsm8k_copy(tmp_path / "gsm8k", lines))}}))
    with pytest.raises(ConfigError, match=message):
        check_inputs(cfg)


def test_output_folders_and_cluster_address_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    from fisher_scale.cli import main
    from fisher_scale.train.launcher import check_inputs, check_writable, resolve_paths

    good = build_config(
        {"data": {"source": str(_gsm8k_copy(tmp_path / "gsm8k", ['{"question": "q", "answer": "a\\n#### 1"}']))}}
    )
    check_inputs(resolve_paths(good))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"distributed\.storage_path: .*file/ray cannot be created: .* is a file"):
        check_inputs(resolve_paths(with_values(good, {"distributed.storage_path": str(tmp_path / "file" / "ray")})))
    with pytest.raises(ConfigError, match=r"train\.output_dir: .* is a file"):
        check_writable("train.output_dir", tmp_path / "file" / "run")
    for address, message in [("127.0.0.1:1", "nothing answers at 127.0.0.1:1"), ("head", "is not host:port")]:
        with pytest.raises(ConfigError, match=f"distributed\\.address: .*{message}"):
            check_inputs(resolve_paths(with_values(good, {"distributed.address": address})))
    # a study with an unreachable cluster stops before its MLflow parent run and study.json exist
    config = tmp_path / "study.yaml"
    study = {
        "data": {"source": str(tmp_path / "gsm8k")},
        "distributed": {"address": "127.0.0.1:1", "storage_path": str(tmp_path / "ray")},
        "tune": {"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "space": {"lr": {"loguniform": [1e-4, 1e-2]}}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    config.write_text(yaml.safe_dump(study))
    assert main(["tune", str(config)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "gsm8k", "study.yaml"]


def test_examples_whose_prompt_fills_max_length_are_left_out_and_none_left_is_an_error(tmp_path: Path) -> None:
    """Before: the run failed at the first step whose examples all lost their targets (step 25 on defaults)."""
    from fisher_scale.train.dataset import TrainingSet
    from fisher_scale.train.launcher import check_inputs, resolve_paths

    short = json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"})
    long = json.dumps({"question": "Is it? " * 40, "answer": "yes\n#### 1"})
    mixed = build_config({"data": {"source": str(_gsm8k_copy(tmp_path / "mixed", [short, long])), "max_length": 96}})
    data = TrainingSet(mixed)
    assert len(data) == 1 and data.dropped == 1
    assert (data.collate([0])["labels"][0, 1:] != -100).any()
    with pytest.warns(UserWarning, match=r"data\.max_length=96 leaves 1 of 2 training examples .* left out"):
        check_inputs(resolve_paths(mixed))
    only_long = with_values(mixed, {"data.source": str(_gsm8k_copy(tmp_path / "long", [long]))})
    with pytest.raises(ConfigError, match=r"leaves 1 of 1 .*nothing to train on; raise data\.max_length"):
        check_inputs(resolve_paths(only_long))


def test_a_local_ray_instance_is_exported_for_rays_own_helpers_and_listens_on_loopback_only() -> None:
    """In a fresh process (the suite's own Ray is left alone): after ``start_ray`` ``$RAY_ADDRESS`` names the instance
    it started, so helpers spawned from the driver join it even when the machine runs a second one; and no process
    of that instance (GCS, raylet, a worker, the agents) listens on an interface other than loopback."""
    import ipaddress
    import json
    import subprocess
    import sys

    probe = (
        "import json, os, time, psutil, ray\n"
        "from fisher_scale.config import build_config\n"
        "from fisher_scale.train.launcher import start_ray\n"
        "os.environ.pop('RAY_ADDRESS', None)\n"
        "start_ray(build_config({}), log_to_driver=False)\n"
        "assert ray.get(ray.remote(lambda: 1).remote()) == 1\n"  # a worker process, listening too
        "time.sleep(2)\n"
        "ray_processes = psutil.Process().children(recursive=True)\n"
        "listening = [c.laddr.ip for p in ray_processes for c in p.net_connections('inet') if c.status == 'LISTEN']\n"
        "print(os.environ['RAY_ADDRESS'] == ray.get_runtime_context().gcs_address, os.environ['RAY_ADDRESS'])\n"
        "print(json.dumps(listening))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env, timeout=300
    )
    *_, exported, sockets = out.stdout.strip().splitlines()
    same, address = exported.split()
    assert same == "True" and address.count(":") == 1, out.stdout
    listening = [ipaddress.ip_address(ip) for ip in json.loads(sockets)]
    loopback = [getattr(ip, "ipv4_mapped", None) or ip for ip in listening]
    assert len(listening) >= 4 and all(ip.is_loopback for ip in loopback), listening


def test_a_saved_adapter_carries_a_model_card_and_names_its_base_model(tmp_path: Path) -> None:
    """PEFT's empty template is replaced by a card naming the base model, task, optimizer, mask, metrics and the
    run that made it; ``adapter_config.json`` names the base model, and PEFT still loads the adapter from it."""
    import json

    from peft import PeftModel

    from fisher_scale.train.card import add_provenance, write_model_card
    from fisher_scale.train.checkpoint import save_weights
    from fisher_scale.train.worker import build_model

    cfg = build_config(
        {
            "name": "card-test",
            "lr": 0.02,
            "optimizer": {"name": "adafish", "damping": 0.1},
            "mask": {"enabled": True, "budget_rank": 4},
            "peft": {"rank": 8},
        }
    )
    model = build_model(cfg, None)
    save_weights(tmp_path / "adapter", model)
    metrics = {"step": 40, "train/loss": 1.23456, "gsm8k/accuracy": 0.125, "time/train_s": 9.0}
    write_model_card(tmp_path / "adapter", cfg, metrics, {"experiment": "card-test", "Ray Train run": "t-1"})
    add_provenance(tmp_path / "adapter", {"MLflow run": "abc123"})
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny\nlibrary_name: peft\ntags: [fisher-scale, adafish, lora]\n---\n")
    assert "| optimizer | adafish (lr=0.02, beta=0.9," in card and "damping=0.1," in card
    assert "| FISH mask | fisher selection keeping the rank-4 count |" in card
    assert "## Metrics at step 40" in card and "| gsm8k/accuracy | 0.125 |" in card and "| train/loss | 1.235 |" in card
    assert "time/train_s" not in card
    assert card.endswith("- experiment: card-test\n- Ray Train run: t-1\n- MLflow run: abc123\n")
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == "tiny"
    loaded = PeftModel.from_pretrained(
        build_model(cfg.model_copy(update={"peft": cfg.peft.model_copy(update={"enabled": False})}), None),
        tmp_path / "adapter",
    )
    assert loaded.peft_config["default"].r == 8


def test_node_monitor_puts_each_nodes_figures_in_its_own_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three ranks on two nodes (Ray may place unequal numbers per node): only each node's first local rank
    measures its machine, every rank adds its GPU's memory to its node; summed, every node gets its own figures."""
    from fisher_scale.train import system

    contributions: list[list[float]] = []

    def collect(*values: float, op: str = "sum") -> list[float]:
        if op == "max":
            return [2.0]  # two nodes
        contributions.append(list(values))
        return list(values)

    monkeypatch.setattr(system, "all_reduce_numbers", collect)
    monkeypatch.setattr(system.torch.cuda, "memory_reserved", lambda: 4e6)
    monitors = []
    for rank, (node, local) in enumerate([(0, 0), (0, 1), (1, 0)]):
        monkeypatch.setenv("NODE_RANK", str(node))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monitors.append(system.NodeMonitor(rank, 3, use_gpu=True))
    taken = [monitor.take() for monitor in monitors]
    width = len(system.CPU_NAMES) + 1
    assert [len(c) for c in contributions] == [2 * width] * 3
    node0, node0_second, node1 = contributions
    assert node0_second[: width - 1] == [0.0] * (width - 1) and node0_second[width - 1] == 4.0  # its GPU only
    assert node0[width:] == [0.0] * width and node1[:width] == [0.0] * width
    summed = [sum(column) for column in zip(*contributions, strict=True)]
    assert summed[width - 1] == 8.0 and summed[-1] == 4.0  # two GPUs on node 0, one on node 1
    assert 0 <= taken[0][system.node_metric(0, "cpu_utilization_percentage")] <= 100
    assert taken[2][system.node_metric(1, "system_memory_usage_megabytes")] > 0
    assert set(taken[0]) == {system.node_metric(n, name) for n in (0, 1) for name in monitors[0].names}
