"""Config sections: defaults, validation errors that name the key, and the optimizer they build."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fisher_scale.config import ConfigError, MaskConfig, OptimizerConfig, load_config
from fisher_scale.hyperparameters import markdown_table
from fisher_scale.optim import AdaFish, AdaFisher, build_optimizer

from .conftest import tiny_lora_qwen2


@pytest.mark.parametrize(
    "section,values,key",
    [
        (MaskConfig, {"ratio": 0.0}, "ratio"),
        (MaskConfig, {"ratio": 1.2}, "ratio"),
        (MaskConfig, {"samples": 0}, "samples"),
        (MaskConfig, {"variant": "fisher"}, "variant"),
        (MaskConfig, {"target": "adapters"}, "target"),
        (MaskConfig, {"warmup_steps": -1}, "warmup_steps"),
        (MaskConfig, {"ratoi": 0.1}, "ratoi"),
        (OptimizerConfig, {"damping": -1e-3}, "damping"),
        (OptimizerConfig, {"ema_decay": 1.0}, "ema_decay"),
        (OptimizerConfig, {"name": "sgd"}, "name"),
        (OptimizerConfig, {"curvature_interval": 0}, "curvature_interval"),
    ],
)
def test_invalid_values_and_unknown_keys_name_the_key(section, values: dict, key: str) -> None:
    with pytest.raises(ValidationError) as error:
        section(**values)
    assert [e["loc"] for e in error.value.errors()] == [(key,)]


def test_optimizer_section_builds_the_named_optimizer() -> None:
    model = tiny_lora_qwen2()
    optimizer = build_optimizer("adafisher", model, **OptimizerConfig(damping=0.01).hyperparameters(lr=0.1))
    assert isinstance(optimizer, AdaFisher) and optimizer.damping == 0.01
    assert optimizer.param_groups[0]["lr"] == 0.1
    adafish = build_optimizer("adafish", model, **OptimizerConfig(name="adafish", max_full_dim=8).hyperparameters(1.0))
    assert isinstance(adafish, AdaFish)
    adamw = build_optimizer("adamw", model, **OptimizerConfig(name="adamw", beta=0.8, eps=1e-5).hyperparameters(1e-3))
    assert adamw.param_groups[0]["betas"] == (0.8, 0.999) and adamw.param_groups[0]["eps"] == 1e-5
    with pytest.raises(ValueError, match=r"adamw does not take \['damping'\]"):
        build_optimizer("adamw", model, lr=1e-3, damping=1e-3)


def test_each_optimizer_receives_only_its_own_keys_and_its_own_defaults() -> None:
    section = OptimizerConfig(damping=0.05, max_full_dim=8)
    assert set(section.model_copy(update={"name": "adamw"}).hyperparameters(0.1)) == {
        "lr",
        "beta",
        "eps",
        "weight_decay",
    }
    assert "max_full_dim" not in section.hyperparameters(0.1)  # adafisher keeps every side diagonal
    model = tiny_lora_qwen2()
    full = {cls: [n for n, layer in cls(model).curvature.layers.items() if layer.full_in or layer.full_out]
            for cls in (AdaFisher, AdaFish)}  # fmt: skip
    assert not full[AdaFisher] and full[AdaFish] and all("lora_" in name for name in full[AdaFish])
    with pytest.raises(TypeError, match="max_full_dim"):
        AdaFisher(model, max_full_dim=8)


def test_a_value_valid_for_one_optimizer_only_is_refused_for_the_other(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  name: adafish\n  ema_mode: official\n")
    with pytest.raises(ConfigError, match=r"optimizer: .*ema_mode must be 'convex', got 'official' for adafish"):
        load_config(bad)
    assert load_config(bad, ["optimizer.name=adafisher"]).optimizer.ema_mode == "official"


def test_the_readme_optimizer_table_is_the_hyperparameter_classes() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "paste fisher_scale.hyperparameters.markdown_table() into the README:\n" + (
        markdown_table()
    )


def test_a_run_logs_only_the_optimizer_keys_its_optimizer_used() -> None:
    from fisher_scale.config import build_config
    from fisher_scale.tracking import run_params

    adamw = run_params(build_config({"optimizer": {"name": "adamw", "beta": 0.8}}))
    assert adamw["optimizer.name"] == "adamw" and adamw["optimizer.beta"] == 0.8
    assert not {"optimizer.damping", "optimizer.ema_decay", "optimizer.max_full_dim"} & set(adamw)
    adafisher = run_params(build_config({}))
    assert adafisher["optimizer.damping"] == 1e-3 and "optimizer.max_full_dim" not in adafisher
    assert "tune.space" not in adafisher and "lr" in adafisher
    assert "train.output_dir" not in adafisher and "train.steps" in adafisher


def test_params_are_logged_as_a_reader_compares_them(tmp_path) -> None:
    """Floats to 6 significant digits (not 16), other values as text."""
    from fisher_scale import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run = client.create_run(tracking.experiment_id(client, "params", uri))
    tracking.log_params(client, run.info.run_id, {"lr": 0.0012345678912345, "peft.rank": 8, "mask.enabled": False})
    params = client.get_run(run.info.run_id).data.params
    assert params == {"lr": "0.00123457", "peft.rank": "8", "mask.enabled": "False"}


def test_a_run_log_logs_each_step_once_at_its_step_and_constants_when_they_change(tmp_path) -> None:
    """``step`` is MLflow's step, not a metric; a replayed step is not logged twice (also after the run is reopened
    by a resumed job); an unchanging metric gets a point only when its value changes; tags only when theirs does;
    nothing is written before the log is sent (or ended)."""
    from fisher_scale import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = client.create_run(tracking.experiment_id(client, "log", uri)).info.run_id
    settings = {"step": "step", "unchanging": ("model/", "mask/")}
    log = tracking.RunLog(client, run_id, **settings)
    reports = [(2, 3.0, 0.5), (2, 3.0, 0.5), (4, 2.5, 0.5), (6, 2.0, 0.25)]
    logged = [log.log({"step": s, "train/loss": x, "model/parameters": 10, "mask/kept/all": k}) for s, x, k in reports]
    assert logged == [True, False, True, True]
    log.tag("outcome", "trained")
    log.tag("outcome", "trained")
    assert client.get_metric_history(run_id, "train/loss") == [] and "outcome" not in client.get_run(run_id).data.tags
    log.send()  # everything kept so far in one request
    reopened = tracking.RunLog.reopened(client, run_id, progress="train/loss", **settings)
    assert reopened.logged_step == 6 and client.get_run(run_id).info.status == "RUNNING"
    assert not reopened.log({"step": 6, "train/loss": 2.0}) and reopened.log({"step": 8, "train/loss": 1.5})
    reopened.end("FINISHED")

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"train/loss", "model/parameters", "mask/kept/all"}  # no "step"
    assert history("train/loss") == [(2, 3.0), (4, 2.5), (6, 2.0), (8, 1.5)]
    assert history("model/parameters") == [(2, 10.0)] and history("mask/kept/all") == [(2, 0.5), (6, 0.25)]
    assert run.data.tags["outcome"] == "trained" and run.info.status == "FINISHED"


def test_the_writer_runs_calls_in_order_in_another_process_and_flush_raises_their_errors(tmp_path: Path) -> None:
    """... and after each batch of calls it found queued, ``send`` (one send per batch, not per call)."""
    import os
    import time

    from fisher_scale import tracking
    from tests.writes import Recorder

    recorder = Recorder(tmp_path / "calls")
    writer = tracking.Writer(recorder)
    started = time.perf_counter()
    for number in range(20):
        writer.submit("record", number, 0.05)
    assert time.perf_counter() - started < 0.5  # the caller waits neither for the calls nor for the process
    writer.flush()
    lines = recorder.lines()
    assert [int(what) for _, what, *_ in lines if what != "sent"] == list(range(20)) and lines[-1][1] == "sent"
    assert sum(what == "sent" for _, what, *_ in lines) <= 3  # the calls queued while one ran were taken together
    assert {pid for pid, *_ in lines} == {str(writer._process.pid)} != {str(os.getpid())}
    niceness = os.getpriority(os.PRIO_PROCESS, writer._process.pid) - os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness == min(tracking.NICENESS, 19 - os.getpriority(os.PRIO_PROCESS, 0))  # the trials go first
    writer.submit("fail")
    writer.submit("record", 20)
    with pytest.raises(ZeroDivisionError, match="planted"):
        writer.flush()
    assert [what for _, what, *_ in recorder.lines()[-2:]] == ["20", "sent"]  # a failed call stops none after it
    writer.flush()  # the error was raised once
    writer.close()
    assert not writer._process


def test_the_writer_takes_its_queue_at_most_once_every_every_s_and_a_flush_at_once(tmp_path: Path) -> None:
    import itertools
    import time

    from fisher_scale import tracking
    from tests.writes import Recorder

    recorder = Recorder(tmp_path / "calls")
    writer = tracking.Writer(recorder, every_s=0.5)
    for number in range(3):
        writer.submit("record", number)
        while len(recorder.lines()) < 2 * (number + 1):
            time.sleep(0.01)
    sent = [float(line[2]) for line in recorder.lines() if line[1] == "sent"]
    assert len(sent) == 3 and all(b - a >= 0.49 for a, b in itertools.pairwise(sent))
    slow = tracking.Writer(Recorder(tmp_path / "slow"), every_s=30)
    slow.submit("record", 0)
    slow.flush()
    began = time.monotonic()
    slow.submit("record", 1)
    slow.flush()  # what a flush waits for goes at once
    assert time.monotonic() - began < 5
    writer.close()
    slow.close()


def test_the_writer_process_ignores_ctrl_c_ends_with_its_parent_and_its_death_is_an_error(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from fisher_scale import tracking
    from fisher_scale.errors import RunFailed
    from tests.writes import Recorder

    recorder = Recorder(tmp_path / "calls")
    writer = tracking.Writer(recorder)
    writer.submit("record", 0)
    writer.flush()
    os.kill(writer._process.pid, signal.SIGINT)  # Ctrl+C in a terminal reaches the whole process group
    writer.submit("record", 1)
    writer.flush()
    assert [what for _, what, *_ in recorder.lines()] == ["0", "sent", "1", "sent"]
    os.kill(writer._process.pid, signal.SIGKILL)
    writer.submit("record", 2)
    with pytest.raises(RunFailed, match=r"MLflow writer process ended \(exit code -9\)"):
        writer.flush()
    writer.submit("record", 3)  # in a new writer process
    writer.flush()
    assert [what for _, what, *_ in recorder.lines()[-2:]] == ["3", "sent"]
    writer.close()
    orphan = (
        "import os, sys; from pathlib import Path; from fisher_scale import tracking\n"
        "from tests.writes import Recorder\n"
        "writer = tracking.Writer(Recorder(Path(sys.argv[1])))\n"
        "writer.submit('record', 0); writer.flush(); print(writer._process.pid, flush=True); os._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", orphan, str(tmp_path / "orphan")], capture_output=True, text=True, check=True
    )
    stat = Path(f"/proc/{int(done.stdout)}/stat")
    running = lambda: stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in "ZX"  # noqa: E731
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and running():
        time.sleep(0.1)
    assert not running()  # the writer process did not outlive its parent
