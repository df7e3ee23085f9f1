"""Adaptive batch size and micro-batching: the thin layer that measures and applies.

The decisions are pure and live in :mod:`adaptrain.tuning.batch_size` (the search and its stop
rule, the LR and accumulation rules, the OOM back-off). This module supplies what they need from
the hardware and carries their results out:

* :class:`StepProbe` runs real training steps (forward, backward, optimizer step, through
  :meth:`Trainer.run_step <adaptrain.Trainer.run_step>`) on real samples of the train data set at
  one batch size, measures samples/s and peak memory (:class:`MemoryGauge`), and undoes them
  (``state.snapshot()`` / ``restore()``, kept on the CPU so the copy takes no device memory).
* :class:`BatchSizing` runs the search once at the start of ``fit``, rebuilds the train loader with
  the chosen size, rescales the LR and a per-step schedule, picks ``micro_batch_size="auto"``, and
  mid-run halves the micro-batch after an out-of-memory error (the loop then redoes the same step).
  Every change is recorded (:func:`record_adaptation`): one printed line, ``history.adaptations``
  (checkpointed; ``adaptations.json`` in the run folder) and the loggers.

The accumulation rule: with ``accumulate_grad_batches > 1`` the user asked for an effective batch
(``accumulate x batch``), which is kept: the accumulation becomes ``ceil(effective / new batch)``
and the LR follows the effective batch (unchanged when it divides). Without accumulation the batch
itself changes and the LR follows it (``lr_scaling``). Micro-batching never changes the
optimisation (same batch, same LR), except that BatchNorm normalises over each micro-batch.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset

from adaptrain.core.batch_options import AdaptiveBatchSize
from adaptrain.core.batching import batch_size_of, unpack_batch
from adaptrain.core.loader_trials import stable_loader
from adaptrain.core.scheduling import check_rescalable, rescale_schedule
from adaptrain.core.step import OOM_ERRORS
from adaptrain.data.loaders import LoaderSpec, is_default_batching, loader_batch_size
from adaptrain.distributed import env as distributed
from adaptrain.errors import ConfigError
from adaptrain.tuning.batch_size import (
    BatchSizeError,
    BatchSizeSearch,
    Probe,
    accumulation_for,
    agree_batch_size,
    halve_micro_batch,
    scale_lr,
    search_batch_size,
)

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["BatchSizing", "MemoryGauge", "StepProbe", "record_adaptation", "adapted_params",
           "agree_across_ranks", "apply_batch_size", "first_batch"]


# ---------------------------------------------------------------------- measuring
class MemoryGauge:
    """Peak memory of a span of work, as a share of what the device can give this process.

    CUDA: ``max_memory_allocated`` over free + already reserved memory at the start. CPU: the
    growth of the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``, after
    ``malloc_trim`` hands freed heap memory back, so reused memory counts; elsewhere the RSS after the
    span, a lower bound) over the RAM available at the start (psutil).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(device)
            self.capacity = free + torch.cuda.memory_reserved(device)
        else:
            self.capacity = psutil.virtual_memory().available
        self._baseline = 0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _trim_heap()  # memory freed by an earlier probe but kept by malloc would hide this probe's growth
        self._baseline = psutil.Process().memory_info().rss
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    def peak_fraction(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / self.capacity
        return max(0, _peak_rss() - self._baseline) / self.capacity


def _trim_heap() -> None:
    """Return the C heap's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class StepProbe:
    """``probe(batch_size) -> Probe``: real training steps at one size, undone afterwards.

    ``split=False``: a batch of ``batch_size`` samples, micro-batched as configured (the batch
    search). ``split=True``: the train loader's own first batch cut into micro-batches of
    ``batch_size`` (the ``micro_batch_size="auto"`` search). Use it as a context manager: the state
    is snapshotted on entry and restored after every probe and on exit.
    """

    def __init__(self, trainer: Trainer, batches: Any, steps: int, timed: bool, split: bool = False) -> None:
        self.trainer, self.batches, self.steps, self.timed, self.split = trainer, batches, steps, timed, split
        self.gauge = MemoryGauge(trainer.device)
        self.seconds = 0.0

    def __enter__(self) -> StepProbe:
        state = self.trainer.state
        self._saved = state.snapshot(device="cpu")
        self._micro = state.micro_batch_size
        self._started = time.perf_counter()
        self.trainer.batch_sizing.probing = True  # an OOM in a probe is a result, not something to recover from
        return self

    def __exit__(self, *_: Any) -> None:
        self.trainer.batch_sizing.probing = False
        self._undo()
        self.seconds = time.perf_counter() - self._started

    def _undo(self) -> None:
        state = self.trainer.state
        state.restore(self._saved)
        state.micro_batch_size = self._micro
        if self.gauge.cuda:
            torch.cuda.empty_cache()

    def __call__(self, size: int) -> Probe:
        state = self.trainer.state
        batch = self.batches(None if self.split else size)
        if self.split:
            state.micro_batch_size = size
        self.gauge.reset()
        rates: list[float] = []
        try:
            for step in range(self.steps + 1 if self.timed else 1):
                started = self._clock()
                self.trainer.run_step(batch)
                if step:  # the first step warms up (allocator, kernels, optimizer state)
                    rates.append(state.batch_samples / (self._clock() - started))
        except OOM_ERRORS as error:
            failed: BaseException | None = error
        else:
            failed = None
        peak = self.gauge.peak_fraction()
        self._undo()
        if failed is not None:
            traceback.clear_frames(failed.__traceback__)  # its frames hold the failed step's tensors
            return Probe(size, False, peak_fraction=peak, error=f"out of memory ({type(failed).__name__})")
        rate = statistics.fmean(rates) if rates else None
        spread = statistics.stdev(rates) / rate / math.sqrt(len(rates)) if len(rates) > 1 else None
        return Probe(size, True, samples_per_s=rate, peak_fraction=peak, spread=spread)

    def _clock(self) -> float:
        if self.gauge.cuda:
            torch.cuda.synchronize(self.trainer.device)  # only here, at the measurement points
        return time.perf_counter()



def first_batch(loader: Any, size: int | None) -> Any:
    """A batch of ``size`` samples from the start of the train data set, drawn without touching the
    loader's sampler or generator (no workers); ``size=None``: the loader's own first batch."""
    if size is None or not isinstance(loader, DataLoader):
        return next(iter(loader))
    dataset = loader.dataset
    probe_loader = DataLoader(dataset, batch_size=size, collate_fn=loader.collate_fn)
    return next(iter(probe_loader))


# ---------------------------------------------------------------------- applying
def record_adaptation(trainer: Trainer, kind: str, before: Any, after: Any, reason: str, **numbers: Any) -> None:
    """Say what the trainer changed by itself: a printed line, ``history.adaptations``, the loggers."""
    state = trainer.state
    entry = {"kind": kind, "before": before, "after": after, "reason": reason, "epoch": state.epoch + 1,
             "step": state.global_step, **numbers}
    state.history.adaptations.append(entry)
    trainer.print(f"adaptrain: {reason}")
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        trainer.log_metrics({kind: after})


class BatchSizing:
    """The trainer's batch-size feature: search at ``fit`` start, OOM back-off mid-run."""

    def __init__(self, adaptive_batch_size: Any = None, micro_batch_size: Any = None) -> None:
        self.options = AdaptiveBatchSize.parse(adaptive_batch_size)
        self.micro = micro_batch_size  # checked by the rule table (core/settings.py) in Trainer(...)
        self.probing = False
        self.searched = False  # set when auto tuning settled the batch already: no second search
        self.last_search: BatchSizeSearch | None = None

    @property
    def recovers_oom(self) -> bool:
        """Whether an OOM mid-run halves the micro-batch (any adaptive setting) or is raised (none)."""
        return (self.options is not None or self.micro is not None) and not self.probing

    def check(self, trainer: Trainer) -> None:
        """Before any work: the train loader can be rebuilt, and the schedule rescaled, if the batch may change."""
        if self.options is None:
            return
        loader = trainer.state.train_loader
        if not is_default_batching(loader):
            what = type(loader).__name__ if not isinstance(loader, DataLoader) else \
                f"DataLoader with its own {type(loader.batch_sampler).__name__}"
            raise ConfigError("adaptive_batch_size", f'is "{self.options.mode}", but the train loader is a {what}, '
                              "which cannot be rebuilt with another batch size; pass DataLoader(dataset, "
                              "batch_size=...), or keep the batch and use micro_batch_size=\"auto\" to fit memory.")
        spec = trainer._schedule.spec
        check_rescalable(spec["scheduler"], spec["interval"])

    def prepare(self, trainer: Trainer, resumed: Mapping[str, Any] | None) -> None:
        """At ``fit`` start: search (a fresh run), or re-apply the sizes the run already chose (a resume
        from ``resumed``, the checkpoint's contents, or ``fit`` called again): never a second search."""
        state = trainer.state
        self.check(trainer)
        configured = loader_batch_size(state.train_loader)
        chosen = resumed["counters"].get("batch_size") if resumed is not None else state.batch_size
        state.batch_size = configured
        if resumed is not None or state.global_step > 0:  # micro_batch_size comes back with the counters
            if self.options is None or chosen is None or configured is None or chosen == configured:
                return
            if resumed is not None:  # as the interrupted run did; the checkpoint then puts back its exact LR
                self.apply(trainer, configured, chosen)
            else:  # fit() called again: LR, schedule and accumulation are already the adapted ones
                trainer._install_train_loader(LoaderSpec.from_loader(state.train_loader).build(batch_size=chosen))
                state.batch_size = chosen
            return
        if isinstance(self.micro, int) and not self.searched:  # auto measured from it and chose already
            state.micro_batch_size = self.micro
        if trainer.limit_batches and (self.options is not None or self.micro == "auto"):
            trainer.print("adaptrain: batch-size search skipped (fast_dev_run)")
            return
        if self.options is not None and not self.searched:
            self.search(trainer)
        if self.micro == "auto":
            self.choose_micro_batch(trainer)

    def search(self, trainer: Trainer) -> BatchSizeSearch:
        """Probe, choose (agreed across ranks), apply and record the train batch size."""
        state, options = trainer.state, self.options
        loader = state.train_loader
        start = loader_batch_size(loader)
        limit = options.max_batch_size
        if not isinstance(loader.dataset, IterableDataset):
            limit = min(limit or len(loader.dataset), len(loader.dataset))
        with StepProbe(trainer, lambda size: first_batch(loader, size), options.steps_per_trial,
                       timed=options.mode == "full") as probe:
            found = search_batch_size(options.mode, start, probe, limit, max_trials=options.max_trials,
                                      memory_fraction=options.memory_fraction, min_gain=options.min_gain)
        self.last_search = found
        chosen = agree_across_ranks(found.chosen)
        numbers = {"trials": found.trials, "seconds": round(probe.seconds, 3), "search": found.to_dict()}
        if chosen != start:
            self.apply(trainer, start, chosen)
        reason = found.reason + f"; {probe.seconds:.1f} s" + (f"; {chosen} agreed across ranks"
                                                            if chosen != found.chosen else "")
        lr = f"; lr {state.lr:.4g}" if chosen != start else ""
        record_adaptation(trainer, "batch_size", start, chosen, reason + lr, **numbers)
        return found

    def apply(self, trainer: Trainer, old: int, new: int) -> None:
        """Train with batch ``new`` instead of ``old``: rebuilt loader, accumulation, LR and schedule."""
        apply_batch_size(trainer, old, new, self.options.lr_scaling)

    def choose_micro_batch(self, trainer: Trainer) -> None:
        """``micro_batch_size="auto"``: the largest micro-batch of the train loader's batch that fits."""
        state = trainer.state
        with StepProbe(trainer, lambda _: batch, steps=1, timed=False, split=True) as probe:
            batch = first_batch(state.train_loader, None)  # inside: the snapshot puts the loader's RNG back
            size = batch_size_of(*unpack_batch(batch, "train_loader"))
            memory = self.options.memory_fraction if self.options else AdaptiveBatchSize().memory_fraction
            found = search_batch_size("safe", size, probe, max_trials=12, memory_fraction=memory)
        micro = None if found.chosen >= size else agree_across_ranks(found.chosen)
        state.micro_batch_size = micro
        found_text = found.reason.replace(" (safe)", "").replace("batch size", "micro-batch", 1)
        split = "unsplit" if micro is None else f"{micro} of {size} samples"
        reason = f"micro_batch_size auto: {found_text} ({split}); {probe.seconds:.1f} s"
        record_adaptation(trainer, "micro_batch_size", None, micro, reason, trials=found.trials,
                          search=found.to_dict())

    def on_out_of_memory(self, trainer: Trainer, error: BaseException) -> None:
        """Mid-run OOM: halve the micro-batch (the loop redoes the step), or re-raise."""
        if not self.recovers_oom:
            raise error
        state = trainer.state
        batch = max((samples for *_, samples in state.window.batches), default=state.batch_samples)
        before = state.micro_batch_size
        try:
            state.micro_batch_size = halve_micro_batch(before, batch)
        except BatchSizeError as exhausted:
            raise exhausted from error
        record_adaptation(trainer, "micro_batch_size", before, state.micro_batch_size,
                          f"out of memory ({type(error).__name__}) at epoch {state.epoch + 1}, step "
                          f"{state.global_step + 1}: micro-batch {before or batch} -> {state.micro_batch_size} "
                          "samples; the same step is redone", batch_size=batch)


def apply_batch_size(trainer: Trainer, old: int, new: int, lr_scaling: str | None) -> None:
    """Train with batch ``new`` instead of ``old``: the loader rebuilt (everything else kept), the
    accumulation (the effective batch kept when there is one), every group's LR and the schedule rescaled."""
    state = trainer.state
    accumulate = state.accumulate_grad_batches
    new_accumulate = accumulation_for(accumulate * old, new) if accumulate > 1 else 1
    lr_factor = scale_lr(1.0, accumulate * old, new_accumulate * new, lr_scaling)
    loader = stable_loader(state.train_loader, batch_size=new)  # persistent workers stay exact (loader_trials)
    old_steps, new_steps = len(state.train_loader) / accumulate, len(loader) / new_accumulate
    schedule = trainer._schedule
    scheduler = state.scheduler if state.scheduler is not None else schedule.spec["scheduler"]
    rescale_schedule(scheduler, state.optimizer, lr_factor, new_steps / old_steps, schedule.spec["interval"])
    state.accumulate_grad_batches = new_accumulate
    trainer._install_train_loader(loader)
    state.batch_size = new


def agree_across_ranks(size: int) -> int:
    """The batch size every rank can run (the minimum of each rank's choice); ``size`` alone on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or distributed.world_size() < 2:
        return size
    sizes: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(sizes, int(size))
    return agree_batch_size(sizes)


def adapted_params(trainer: Trainer) -> dict[str, Any]:
    """What the adaptations decided, as run parameters for the loggers ({} when nothing adapted)."""
    state = trainer.state
    if all(a["before"] == a["after"] for a in state.history.adaptations):  # a decision to change nothing
        return {}
    return {"adapted.batch_size": state.batch_size, "adapted.micro_batch_size": state.micro_batch_size,
            "adapted.accumulate_grad_batches": state.accumulate_grad_batches, "adapted.lr": state.lr}

