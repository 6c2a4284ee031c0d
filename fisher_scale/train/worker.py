"""The per-worker loop that Ray Train runs (and a Tune trial actor, with ``tune.train_in_trial``): model, DeepSpeed
engine with the client optimizer, FISH mask, exact token-weighted loss, checkpoints, non-finite guards, metrics
and evaluation."""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fisher_scale.config import ExperimentConfig
from fisher_scale.errors import DamagedCheckpoint, InputError
from fisher_scale.masks import DEFAULT_HEAD, MaskSchedule, equal_budget_ratio, load_mask, save_mask
from fisher_scale.optim import FisherOptimizer, build_optimizer, optimizer_state_bytes
from fisher_scale.optim.around_step import AroundStep
from fisher_scale.optim.distributor import all_reduce_numbers, from_engine
from fisher_scale.train import checkpoint
from fisher_scale.train import metrics as metric
from fisher_scale.train.batches import StepBatches
from fisher_scale.train.card import write_model_card
from fisher_scale.train.dataset import TrainingSet, scoring_share
from fisher_scale.train.engine import deepspeed_config, init_distributed
from fisher_scale.train.guard import NonFiniteGuard
from fisher_scale.train.profile import PeakMemory, StepProfiler
from fisher_scale.train.quiet import quiet_worker
from fisher_scale.train.schedule import learning_rate
from fisher_scale.train.system import NodeMonitor


def build_model(cfg: ExperimentConfig, num_labels: int | None, zero3: dict[str, Any] | None = None) -> nn.Module:
    """The model to train: the named base model, wrapped with PEFT LoRA when ``peft.enabled``; a pretrained one
    loads partitioned when ``zero3`` (the run's DeepSpeed config at stage 3) is given."""
    from fisher_scale.models import Lora, apply_lora, load_model

    dtype = getattr(torch, cfg.model.dtype)
    model = load_model(
        cfg.model.name, task=cfg.model.task, num_labels=num_labels, seed=cfg.seed, dtype=dtype, zero3=zero3
    )
    if cfg.peft.enabled:
        lora = Lora(cfg.peft.rank, cfg.peft.alpha, cfg.peft.dropout, cfg.peft.target_modules)
        model = apply_lora(model, lora, task=cfg.model.task)
    if cfg.model.activation_checkpointing:
        # after LoRA: PEFT would add a second embedding-output hook of its own, which no handle could remove
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


#: a training loss (mean over a report's steps) this many times the first report's has diverged
DIVERGED_RATIO = 3.0


def diverged(first_loss: float, loss: float) -> bool:
    """Whether training has diverged: its loss is not finite, or ``DIVERGED_RATIO`` times the first one."""
    return not math.isfinite(loss) or loss > DIVERGED_RATIO * first_loss


#: receives the metrics of a report step, and a checkpoint directory on checkpoint steps
Reporter = Callable[[dict[str, Any], Path | None], None]


class Run:
    """One worker's training state; :meth:`train` is the loop.

    Ray Train runs it through :func:`train_worker`; tests run it in plain ``torch.distributed``
    processes, passing their own ``reporter`` and checkpoint to resume from.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        rank: int,
        world: int,
        *,
        reporter: Reporter,
        restored: Path | None = None,
        made_by: dict[str, str] | None = None,
    ) -> None:
        import deepspeed

        self.cfg, self.rank, self.world, self.reporter = cfg, rank, world, reporter
        #: provenance lines of the adapters' model cards
        self.made_by = {"experiment": cfg.name, **(made_by or {})}
        init_distributed(cfg.distributed.use_gpu)
        self.profiler = StepProfiler(cfg.train.profile, cuda=cfg.distributed.use_gpu)
        self.system = NodeMonitor(rank, world, use_gpu=cfg.distributed.use_gpu)
        self.profiler.install()
        torch.manual_seed(cfg.seed)
        self.data = TrainingSet(cfg)
        # from here: the model, engine, optimizer and steps (the tokenised data and the libraries are not counted)
        self.peak_memory = PeakMemory(cfg.distributed.use_gpu, trace=cfg.train.trace_memory)
        ds_config = deepspeed_config(cfg, world)
        self.model = build_model(cfg, self.data.num_labels, ds_config if cfg.distributed.zero_stage == 3 else None)
        self.start_step = 0
        if restored is not None:
            checkpoint.load_weights(restored / "adapter", self.model)
        self.optimizer = build_optimizer(cfg.optimizer.name, self.model, **cfg.optimizer.hyperparameters(cfg.lr))
        if isinstance(self.optimizer, FisherOptimizer):
            # each rank's loss is scaled by the number of ranks (DeepSpeed averages gradients), and so are its
            # output gradients: divide it out of the Fisher statistics
            self.optimizer.curvature.output_grad_scale = float(world)
            self.optimizer.curvature.nonfinite = "skip" if cfg.train.skip_nonfinite else "raise"
            curvature = self.optimizer.curvature
            self.profiler.statistics_clock = lambda: curvature.seconds
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=ds_config)
        self.device = self.engine.device
        self.parameters = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        self.distributor = from_engine(self.engine, self.model)
        self.pieces = self.distributor.pieces
        if isinstance(self.optimizer, FisherOptimizer):
            self.optimizer.distribute(self.distributor)
        self.guard = NonFiniteGuard(
            self.optimizer, self.pieces, skip=cfg.train.skip_nonfinite, loss_scaling=self.engine.fp16_enabled()
        )
        self.batches = StepBatches(
            len(self.data), cfg.data.batch_size, cfg.data.gradient_accumulation_steps, world, cfg.seed
        )
        self.mask = self._mask_schedule()
        # nested: each restores only what it changed, so the guard's skip is exact around the mask's restore
        AroundStep(self.optimizer, [self.guard, *([self.mask] if self.mask is not None else [])])
        self.history: dict[str, Any] = {"skipped_steps": 0, "train_time_s": 0.0, "eval_time_s": 0.0}
        self.replay: dict[str, float] | None = None
        if restored is not None:
            self._restore(restored)

    def _mask_schedule(self) -> MaskSchedule | None:
        mask = self.cfg.mask
        if not mask.enabled:
            return None
        share = scoring_share(mask.samples, self.rank, self.world)
        ratio = mask.ratio if mask.budget_rank is None else equal_budget_ratio(self.model, mask.budget_rank)
        return MaskSchedule(
            self.model,
            self.optimizer,
            lambda: (self._on_device(b) for b in self.data.scoring_batches(share)),
            target=mask.target,
            ratio=ratio,
            selection=mask.selection,
            seed=self.cfg.seed,
            samples=len(share),
            variant=mask.variant,
            warmup_steps=mask.warmup_steps,
            refresh_every=mask.refresh_every,
            head=DEFAULT_HEAD if mask.head is None else mask.head,
            pieces=self.pieces,
            scoring_context=self._scoring_context,
            register=False,
        )

    @contextlib.contextmanager
    def _scoring_context(self) -> Iterator[None]:
        """FISH scoring calls the model under ``torch.func``: without DeepSpeed's module hooks (the distributor)
        and, with activation checkpointing, without the hook transformers adds to mark the embeddings' output as
        needing a gradient (``requires_grad_`` inside a functorch transform is an error; scoring runs in eval
        mode, where no layer is checkpointed)."""
        with self.distributor.functional():
            if not self.cfg.model.activation_checkpointing:
                yield
                return
            self.model.disable_input_require_grads()
            try:
                yield
            finally:
                self.model.enable_input_require_grads()

    def _restore(self, directory: Path) -> None:
        """From a checkpoint already checked against its manifests (``newest_intact`` after a worker restart, the
        driver for ``train.resume_from``): the files are not hashed again on every rank."""
        state = checkpoint.read_state(directory)
        self.start_step = int(state["step"])
        self.history.update(state["history"])
        self.replay = state["metrics"]
        checkpoint.load_optimizer(directory, self.rank, self.world, self.optimizer, self.pieces)
        if self.mask is not None and (directory / "mask.safetensors").is_file():
            self.mask.restore(load_mask(directory / "mask.safetensors", self.model))

    def _lr(self, step: int) -> float:
        train = self.cfg.train
        return learning_rate(
            step, peak=self.cfg.lr, steps=train.steps, warmup=train.warmup_steps, schedule=train.lr_schedule
        )

    def _on_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    def _micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        return [
            self._on_device(self.data.collate(self.batches.indices(step, self.rank, micro)))
            for micro in range(self.cfg.data.gradient_accumulation_steps)
        ]

    def _optimizer_step(self) -> contextlib.AbstractContextManager:
        """The explicit optimizer-step boundary around the engine step that runs the client optimizer (the last
        micro-batch's), however many ``step()`` calls DeepSpeed makes inside it."""
        if isinstance(self.optimizer, FisherOptimizer) and self.engine.is_gradient_accumulation_boundary():
            return self.optimizer.one_step()
        return contextlib.nullcontext()

    def _step(self, step: int) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches, with the loss normalised by the step's
        global number of target items, so that any split over ranks and micro-batches gives the same gradient."""
        started = time.perf_counter()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = self._lr(step)
        micro_batches = self._micro_batches(step)
        (items,) = all_reduce_numbers(sum(self.data.target_count(b) for b in micro_batches))
        self.guard.begin_step(step)
        loss_sum = 0.0
        for batch in micro_batches:
            if isinstance(self.optimizer, FisherOptimizer):
                self.optimizer.curvature.token_mask = batch["attention_mask"]
            with self.profiler.phase("forward"):
                loss = self.data.loss(self.engine, batch, items / self.world)
            loss_sum += float(loss.detach()) * items / self.world
            self.guard.check_loss(loss)
            with self.profiler.phase("backward"):
                self.engine.backward(loss, scale_wrt_gas=False)
            with self.profiler.phase("optimizer"), self._optimizer_step():
                self.engine.step()
        self.profiler.step_done()
        elapsed = time.perf_counter() - started
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        loss_sum, tokens = all_reduce_numbers(loss_sum, tokens)
        self.guard.end_step(self.engine.was_step_applied(), loss_finite=math.isfinite(loss_sum))
        return {
            metric.LOSS: loss_sum / items / self.world,
            metric.LR: self._lr(step),
            metric.STEP_TIME: elapsed,
            metric.TOKENS_PER_S: tokens / elapsed,
        }

    def _metrics(self, step: int, window: list[dict[str, float]]) -> dict[str, Any]:
        metrics: dict[str, Any] = {key: statistics.fmean(m[key] for m in window) for key in window[0]}
        self.history.setdefault("first_loss", metrics[metric.LOSS])  # the mean over the first report's steps
        metrics[metric.DIVERGED] = float(diverged(self.history["first_loss"], metrics[metric.LOSS]))
        metrics[metric.LOSS] = window[-1][metric.LOSS]
        metrics[metric.STEP] = step + 1
        metrics[metric.STATE_BYTES] = optimizer_state_bytes(self.optimizer)
        metrics[metric.SKIPPED_STEPS] = self.history["skipped_steps"] + self.guard.skipped
        metrics[metric.TRAIN_TIME] = self.history["train_time_s"]
        metrics.update(self.profiler.take())
        (peak,) = all_reduce_numbers(self.peak_memory.bytes(), op="max")
        metrics[metric.PEAK_MEMORY] = int(peak)
        metrics[metric.PARAMETERS] = self.parameters
        metrics[metric.EVAL_TIME] = self.history["eval_time_s"]
        metrics.update(self.system.take())
        if isinstance(self.optimizer, FisherOptimizer):
            contrast = list(self.optimizer.curvature_contrast().values())
            if contrast:
                metrics[metric.CONTRAST_MEDIAN] = statistics.median(contrast)
                metrics[metric.CONTRAST_MAX] = max(contrast)
        if self.mask is not None and self.mask.report:
            kept = {k: v for k, v in self.mask.report.items() if not k.startswith("kept/param/")}
            metrics.update({f"{metric.MASK}{k}": v for k, v in kept.items()})
        return metrics

    def train(self) -> None:
        """Steps to ``train.steps``, reporting every ``log_every``; a resumed run first reports again what was
        reported with its checkpoint (a driver stopped as it was written may never have recorded it; the
        consumers keep one report per step)."""
        try:
            self._train()
        finally:  # also when a report stops the run (Tune stops a trial there): a reused process trains on
            self.profiler.uninstall()
            self.peak_memory.stop()

    def _train(self) -> None:
        cfg = self.cfg.train
        window: list[dict[str, float]] = []
        metrics: dict[str, Any] = dict(self.replay or {})
        if self.replay is not None:
            self.reporter(self.replay, None)
        for step in range(self.start_step, cfg.steps):
            started = time.perf_counter()
            if self.mask is not None:
                self.mask.before_step(step)
            window.append(self._step(step))
            self.history["train_time_s"] += time.perf_counter() - started
            last = step == cfg.steps - 1
            evaluate = last or (self.cfg.eval.every and (step + 1) % self.cfg.eval.every == 0)
            save = last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            if not (save or evaluate or (step + 1) % cfg.log_every == 0):
                continue
            if evaluate:
                started = time.perf_counter()
                evaluation = self.data.evaluate(self.engine.module, self.rank, self.world)
                self.history["eval_time_s"] += time.perf_counter() - started
            metrics = self._metrics(step, window)
            window = []
            if evaluate:
                metrics.update(evaluation)
            if save:
                with tempfile.TemporaryDirectory() as tmp:
                    self._save(Path(tmp), step + 1, metrics)
                    self.reporter(metrics, Path(tmp))
            else:
                self.reporter(metrics, None)
        self._save_weights(Path(self.cfg.train.output_dir), metrics)

    def _save(self, directory: Path, next_step: int, metrics: dict[str, Any]) -> None:
        history = {**self.history, "skipped_steps": self.history["skipped_steps"] + self.guard.skipped}
        self._save_weights(directory, metrics)
        with self.mask.full_state() if self.mask is not None else contextlib.nullcontext():
            checkpoint.save_optimizer(directory, self.rank, self.optimizer, self.pieces)
        if self.rank == 0:
            checkpoint.write_state(
                directory,
                {
                    "step": next_step,
                    "workers": self.world,
                    "history": history,
                    "metrics": {k: v for k, v in metrics.items() if _is_number(v)},
                },
            )
        checkpoint.write_manifest(directory, self.rank)

    def _save_weights(self, directory: Path, metrics: dict[str, Any]) -> None:
        """Rank 0 writes the trained weights with their model card (``metrics``: the last report's) and the mask;
        under ZeRO-3 only the trained ones are gathered."""
        with self.distributor.gathered([p for p in self.model.parameters() if p.requires_grad]):
            if self.rank == 0:
                checkpoint.save_weights(directory / "adapter", self.model)
                write_model_card(directory / "adapter", self.cfg, metrics, self.made_by)
                if self.mask is not None and self.mask.mask is not None:
                    save_mask(self.mask.mask, directory / "mask.safetensors")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: resumes from Ray's latest checkpoint of this run (after a worker
    failure), else from ``train.resume_from`` (an earlier run's checkpoint directory); reports to Ray."""
    import ray.train

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if directory else None)

    context = ray.train.get_context()
    reported_run(
        ExperimentConfig.model_validate(config),
        report,
        ray.train.get_checkpoint(),
        context.get_world_rank(),
        context.get_world_size(),
        {"Ray Train run": context.get_experiment_name()},
    ).train()


def train_in_trial(cfg: ExperimentConfig) -> dict[str, Any]:
    """A one-worker run inside the Tune trial's own actor (``tune.train_in_trial``), with no Ray Train worker
    group: the actor, which Tune reuses, keeps its imports and its one-rank process group from trial to trial.
    Reports and checkpoints go to Tune; a retried trial resumes from its newest intact checkpoint. Returns the
    last report."""
    from ray import tune

    use_gpu = cfg.distributed.use_gpu
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # what DeepSpeed reads
    if not torch.distributed.is_initialized():
        if use_gpu:
            torch.cuda.set_device(0)  # Ray shows the trial its own GPU only
        store = torch.distributed.HashStore()  # one rank: no rendezvous, no port
        torch.distributed.init_process_group("nccl" if use_gpu else "gloo", store=store, rank=0, world_size=1)
    torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    last: dict[str, Any] = {}

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        last.update(metrics)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory) if directory else None)

    trial = tune.get_context().get_trial_id()
    reported_run(cfg, report, tune.get_checkpoint(), 0, 1, {"Tune trial": trial}).train()
    return last


def reported_run(
    cfg: ExperimentConfig, report: Reporter, latest: Any, rank: int, world: int, made_by: dict[str, str]
) -> Run:
    """The run of a worker that reports to Ray, resumed from the newest intact checkpoint Ray kept from ``latest``
    on, else from ``train.resume_from``."""
    quiet_worker(use_gpu=cfg.distributed.use_gpu)
    with contextlib.ExitStack() as stack:
        directory = newest_intact(latest, stack) if latest else None
        if directory is None and cfg.train.resume_from:
            directory = Path(cfg.train.resume_from)
        return Run(cfg, rank, world, reporter=report, restored=directory, made_by=made_by)


def newest_intact(latest: Any, stack: contextlib.ExitStack) -> Path:
    """The local folder of the newest intact checkpoint of this run, from Ray's latest (``latest``) back through
    the older ones Ray kept (``train.keep_checkpoints``); a damaged one is skipped with a warning naming the file.
    Every rank checks the same files, so all ranks pick the same checkpoint."""
    import pyarrow.fs
    import ray.train

    parent = posixpath.dirname(latest.path.rstrip("/"))
    kept = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = {i.path for i in kept if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    damage = []
    for path in sorted({p for p in older if p < latest.path} | {latest.path}, reverse=True):
        directory = Path(stack.enter_context(ray.train.Checkpoint(path, filesystem=latest.filesystem).as_directory()))
        try:
            checkpoint.check_checkpoint(directory)
        except InputError as error:
            warnings.warn(f"skipping a damaged checkpoint: {error}", stacklevel=2)
            damage.append(str(error))
            continue
        return directory
    raise DamagedCheckpoint("no intact checkpoint to resume from: " + "; ".join(damage))
