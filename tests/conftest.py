"""Tiny offline models shared by the tests (random init, no hub access)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fisher_scale.models import TinyLM, tiny_causal_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def tiny_qwen2(seed: int = 0, tie: bool = False) -> nn.Module:
    spec = TinyLM(hidden_size=32, intermediate_size=48, vocab_size=64, max_positions=64, tie_embeddings=tie)
    return tiny_causal_lm(spec, seed=seed)


def tiny_lora_qwen2(seed: int = 0, rank: int = 4) -> nn.Module:
    """A peft-LoRA Qwen2 whose B matrices are non-zero, so both A and B get gradients at step 0."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_qwen2(seed),
        LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def tiny_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).float()


def lm_batch(seed: int, batch: int = 4, length: int = 12, vocab: int = 64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def lora_model() -> nn.Module:
    return tiny_lora_qwen2()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting one costs ~4 s and ~1 GB)."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=2, include_dashboard=True, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


#: how to get PostgreSQL's server programs (``.ci/run`` does this)
POSTGRES_INSTALL = "apt-get install -y postgresql (Debian's package)"


def postgres_programs() -> Path | None:
    """The folder of PostgreSQL's ``initdb`` and ``pg_ctl``: on the PATH, or where Debian puts them."""
    found = shutil.which("initdb") or max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Callable[[str], str]]:
    """A throwaway PostgreSQL server on loopback (trust authentication, no password), started for the session;
    yields a function that creates a database and returns its URL."""
    from fisher_scale.train.local import free_port

    programs = postgres_programs()
    if programs is None:
        pytest.skip(f"needs PostgreSQL's server programs: {POSTGRES_INSTALL}")
    folder = Path(tempfile.mkdtemp(prefix="fisher-scale-postgres-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as Debian's postgres user
        shutil.chown(folder, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(program: str, *args: str) -> None:
        done = subprocess.run([*as_owner, str(programs / program), *args], capture_output=True, text=True)
        assert done.returncode == 0, f"{program}: {done.stdout}{done.stderr}"

    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-o", options, "-w", "start")
    url = f"postgresql://postgres@127.0.0.1:{port}"

    def database(name: str) -> str:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
        return f"{url}/{name}"

    yield database
    run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(folder, ignore_errors=True)
