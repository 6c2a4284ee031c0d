"""Where a training step's time goes: forward, backward, optimizer and communication, for scaling
studies (``train.profile``).

Communication is the time spent inside ``torch.distributed`` collectives (DeepSpeed's included: its
backend calls them through the module, and its captured all-gather / reduce-scatter functions are
wrapped too). It is subtracted from the phase it happened in. Only the call is timed: a collective
launched with ``async_op=True`` (ZeRO-3's parameter all-gathers) counts its launch as communication and
its wait as computation, so ZeRO-3's communication is undercounted. On GPUs each timed call is bracketed
by CUDA synchronisation, which removes the overlap of communication with computation: the split
attributes time rather than measuring an overlapped schedule. Fisher statistics computed in the forward
and output-gradient hooks (``statistics_clock``: the optimizer's cumulative hook seconds) are moved from
forward/backward to the optimizer, which also holds their reduction over ranks, the EMA and the update.
On GPUs the hook seconds are host time (kernel launches), since only the phase edges synchronise.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fisher_scale.train.metrics import phase_time

#: torch.distributed collectives that are timed
COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "barrier",
)
PHASES = ("forward", "backward", "optimizer")


class StepProfiler:
    """Per-phase wall time and collective time, accumulated until :meth:`take`; a no-op when disabled."""

    def __init__(self, enabled: bool, cuda: bool = False) -> None:
        self.enabled, self.cuda = enabled, cuda
        self.wall: dict[str, float] = defaultdict(float)
        self.comm: dict[str, float] = defaultdict(float)
        self.statistics: dict[str, float] = defaultdict(float)
        #: cumulative seconds of Fisher statistics computed in hooks (set once the optimizer exists)
        self.statistics_clock: Callable[[], float] | None = None
        self.steps = 0
        self._phase = "other"
        self._restore: list[tuple[Any, str, Any]] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _timed(self, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._sync()
                self.comm[self._phase] += time.perf_counter() - started

        return timed

    def install(self) -> None:
        """Wrap the collectives (call after the process group and DeepSpeed's backend exist)."""
        if not self.enabled or self._restore:
            return
        targets: list[tuple[Any, str]] = [(torch.distributed, name) for name in COLLECTIVES]
        try:
            from deepspeed.comm import comm as ds_comm

            if ds_comm.cdb is not None:
                targets += [(ds_comm.cdb, "all_gather_function"), (ds_comm.cdb, "reduce_scatter_function")]
        except ImportError:
            pass
        for owner, name in targets:
            original = getattr(owner, name, None)
            if callable(original):
                self._restore.append((owner, name, original))
                setattr(owner, name, self._timed(original))

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        clock = self.statistics_clock
        counted = clock() if clock else 0.0
        started, self._phase = time.perf_counter(), name
        try:
            yield
        finally:
            self._sync()
            self.wall[name] += time.perf_counter() - started
            if clock:
                self.statistics[name] += clock() - counted
            self._phase = "other"

    def step_done(self) -> None:
        self.steps += self.enabled

    def take(self) -> dict[str, float]:
        """Mean seconds per optimizer step since the last call: ``time/<phase>_s`` (communication
        excluded) and ``time/comm_s`` (the collectives inside those phases; bookkeeping reductions
        and evaluation outside them are not counted); then starts over."""
        if not self.enabled or not self.steps:
            return {}
        moved = sum(self.statistics[p] for p in PHASES if p != "optimizer")
        seconds = {p: self.wall[p] - self.comm[p] - self.statistics[p] for p in PHASES if p != "optimizer"}
        seconds["optimizer"] = self.wall["optimizer"] - self.comm["optimizer"] + moved
        metrics = {phase_time(p): seconds[p] / self.steps for p in PHASES}
        metrics[phase_time("comm")] = sum(self.comm[p] for p in PHASES) / self.steps
        self.wall.clear()
        self.comm.clear()
        self.statistics.clear()
        self.steps = 0
        return metrics


class LiveTensors(TorchDispatchMode):
    """The bytes of the host's tensor storages alive while it is active, and their peak: each storage an operation
    returns counts until it is freed (a weak reference to it: torch keeps a storage's Python object as long as
    the storage lives). The host's counterpart of the CUDA allocator's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """This rank's peak memory since the run began (what a memory plan is checked against): on GPUs the CUDA
    allocator's peak; on the host the live tensors' peak when ``trace`` (:class:`LiveTensors`, from here until
    :meth:`stop`), else the growth of the resident set to its high-water mark, which counts the libraries' lazy
    loading and, as glibc keeps freed memory for reuse, little of a process's later runs."""

    def __init__(self, cuda: bool, trace: bool = False) -> None:
        self.cuda, self.tracer = cuda, None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        elif trace:
            self.tracer = LiveTensors()
            self.tracer.__enter__()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark starts again from here
            self.start = self._resident("VmRSS")

    def bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        if self.tracer is not None:
            return self.tracer.peak
        return self._resident("VmHWM") - self.start

    def stop(self) -> None:
        if self.tracer is not None:
            self.tracer.__exit__(None, None, None)
            self.tracer = None

    @staticmethod
    def _resident(field: str) -> int:
        """A /proc/self/status figure (kB) in bytes."""
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field} line")
