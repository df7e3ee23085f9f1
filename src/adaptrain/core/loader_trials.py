"""What loader tuning needs from the machine and from torch.

* :func:`hardware_start`: the tuner's starting point read from this machine (the CPU cores this
  process may use, the local ranks sharing them, free RAM, CUDA).
* :class:`Timing` and :func:`trial_plan`: one trial's measurement and its warm-up/rounds plan, shared
  by the live trials of :mod:`adaptrain.core.loader_live` (``auto_num_workers``) and :func:`time_trial`.
* :func:`time_trial` (``trainer.tune`` / ``auto=True``, whose trials are undone): real training steps
  (``trainer.run_step``) on batches from a *measurement*
  loader built with the candidate settings over the same data set, in sequential order and with a
  generator of its own, so the run's sampler, its generator and its sample order are never touched.
  Data wait and compute are timed apart, as the loop does; on CUDA the clock reads synchronise the
  device, so the compute share is true (only here, at the measurement points, never in the run).
* :class:`StableDataLoader` and :func:`stable_loader`: the loader the run trains with afterwards.

Why :class:`StableDataLoader`: a fresh ``DataLoader`` iterator draws one number (its workers' base
seed) from the loader's generator, or from the global torch RNG when it has none, before the
sampler draws its shuffle; a *persistent* iterator is made once and only reset, so from the second
epoch on that draw is missing. The shuffle order then differs from a ``num_workers=0`` run from epoch
2 on, and so does every later global draw (dropout, augmentation in the main process), and a
mid-epoch resume (whose new iterator does draw) differs from the uninterrupted run. Measured on
torch 2.13: ``shuffle=True, generator=g`` gives another epoch-2 order with ``persistent_workers=True``
than with ``num_workers=0``. :class:`StableDataLoader` makes the draw a reset would skip, so persistent
workers (which the tuner keeps: respawning them costs up to 44% of a compute-bound loop) change
nothing in the run's numbers. Exact for samplers that draw lazily (on the first ``next``, as torch's
own samplers and ``BatchSampler`` do).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from adaptrain.data.loaders import LoaderSpec, loader_batch_size, loader_length, shutdown_workers
from adaptrain.tuning.loader_tuning import LoaderSettings, StartingPoint, initial_loader_settings

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["StableDataLoader", "Timing", "hardware_start", "local_world_size", "stable_loader", "time_trial",
           "measure_batch_size", "TooFewBatches", "synced_clock"]

#: Timed rounds one trial may run at most when it extends itself to ``min_seconds``.
MAX_ROUNDS = 40
#: Passes over the data set a measurement loader may read: a trial on a small data set can then time
#: its ``min_seconds`` (one pass of 1024 samples lasted 0.1-0.2 s here, too short to rank close settings).
MEASURE_PASSES = 8
#: torch warns when a loader has more workers than cores; the tuner measured that it pays, so the warning misleads.
WORKER_WARNING = "This DataLoader will create"


class StableDataLoader(DataLoader):
    """A ``DataLoader`` whose persistent workers leave every RNG as fresh workers would (see the module doc).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.arange(8))
        >>> def orders(**kw):
        ...     g = torch.Generator().manual_seed(0)
        ...     loader = stable_loader(DataLoader(data, batch_size=4, shuffle=True, generator=g), **kw)
        ...     return [[b[0].tolist() for b in loader] for _ in range(2)]
        >>> orders(num_workers=0) == orders(num_workers=1, persistent_workers=True)
        True
    """

    def __iter__(self) -> Iterator[Any]:
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            # The draw _BaseDataLoaderIter.__init__ makes and _reset does not: one int64, same generator.
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=WORKER_WARNING, category=UserWarning)
            return super().__iter__()


def stable_loader(loader: DataLoader, **changes: Any) -> DataLoader:
    """``loader`` rebuilt by :class:`~adaptrain.data.loaders.LoaderSpec` with ``changes``, as a
    :class:`StableDataLoader` (same dataset, sampler, generator, collate and worker setup)."""
    with warnings.catch_warnings():  # more workers than cores: the tuner measured that it pays
        warnings.filterwarnings("ignore", message=WORKER_WARNING, category=UserWarning)
        rebuilt = LoaderSpec.from_loader(loader).build(**changes)
    # LoaderSpec builds a plain DataLoader; the subclass adds no state (it only overrides __iter__), so
    # giving the fresh, never-iterated object the subclass is safe and keeps LoaderSpec the one builder.
    rebuilt.__class__ = StableDataLoader
    return rebuilt


def local_world_size() -> int:
    """Training processes on this machine: ``LOCAL_WORLD_SIZE`` (torchrun sets it), else 1."""
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
    except ValueError:
        return 1


def _cores() -> int:
    getter = getattr(os, "sched_getaffinity", None)  # the cores this process may run on (cgroups, taskset)
    return len(getter(0)) if getter is not None else (os.cpu_count() or 1)


def hardware_start(trainer: Trainer, loader: DataLoader) -> StartingPoint:
    """:func:`~adaptrain.tuning.loader_tuning.initial_loader_settings` from this machine and ``loader``.

    A worker's RAM is taken as this process's private memory (RSS less shared pages): the worst case,
    a worker that copies every page it inherits; the tuner then watches the real RAM after each trial.
    """
    memory = psutil.Process().memory_info()
    private = max(memory.rss - getattr(memory, "shared", 0), 1)
    batches = loader_length(loader)
    # dataset_len=batches with batch_size=1 caps the workers at the batches this rank reads per epoch
    # (a DistributedSampler's share, a drop_last remainder), which is what a worker count is bounded by.
    return initial_loader_settings(_cores(), local_world_size(), dataset_len=batches, batch_size=1,
                                   free_ram_bytes=psutil.virtual_memory().available, per_worker_ram_bytes=private,
                                   cuda=trainer.device.type == "cuda")


def measure_batch_size(loader: DataLoader) -> int:
    """The batch size trials read: the loader's, else (its own batch sampler) the mean batch of an epoch."""
    size = loader_batch_size(loader)
    if size is not None:
        return size
    batches = loader_length(loader)
    return max(round(len(loader.dataset) / batches), 1) if batches else 1


class RepeatedOrder(Sampler[int]):
    """Indices ``0 .. size - 1`` in order, ``passes`` times over.

    Example:
        >>> list(RepeatedOrder(3, passes=2)), len(RepeatedOrder(3, passes=2))
        ([0, 1, 2, 0, 1, 2], 6)
    """

    def __init__(self, size: int, passes: int = MEASURE_PASSES) -> None:
        self.size, self.passes = size, passes

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(range(self.size) for _ in range(self.passes))

    def __len__(self) -> int:
        return self.size * self.passes


def measurement_loader(loader: DataLoader, settings: LoaderSettings, batch_size: int) -> DataLoader:
    """The same data set, collate and worker setup as ``loader``, read in order with ``settings``
    (:data:`MEASURE_PASSES` times over, for trials longer than one epoch).

    Its sampler is its own and its generator too, so reading it draws nothing from the
    run's sampler or generator; persistent workers are off (the trial's iterator owns them).
    """
    spec = dataclasses.replace(LoaderSpec.from_loader(loader), batch_size=batch_size, batch_sampler=None,
                               sampler=RepeatedOrder(len(loader.dataset)), generator=torch.Generator().manual_seed(0))
    return spec.build(**{**settings.as_dict(), "persistent_workers": False})


class TooFewBatches(Exception):
    """An epoch holds fewer batches than one trial of these settings needs."""


@dataclass
class Timing:
    """One trial: seconds waiting for batches and computing over the timed rounds, samples/s per round,
    system RAM in use at the end (a fraction), and the trial's whole wall time (start-up included)."""

    settings: LoaderSettings
    data_time: float = 0.0
    compute_time: float = 0.0
    rates: list[float] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    ram_fraction: float | None = None
    seconds: float = 0.0
    warmup_seconds: float = 0.0  # the untimed first batches (worker start-up, compilation, first allocations)
    warmup_batches: int = 0

    def add_round(self, data_time: float, compute_time: float, samples: int, batches: int) -> None:
        """Count one timed round (its seconds waiting and computing, its samples and batches) and its rate."""
        self.data_time += data_time
        self.compute_time += compute_time
        self.samples += samples
        self.batches += batches
        self.rates.append(samples / max(data_time + compute_time, 1e-9))

    @property
    def seconds_per_batch(self) -> float:
        """Wall time of a batch in the timed rounds (data wait + compute)."""
        return (self.data_time + self.compute_time) / self.batches if self.batches else 0.0

    @property
    def median_rate(self) -> float:
        """The median of the rounds' samples/s (what the tuner compares: one slow round does not move it)."""
        return statistics.median(self.rates) if self.rates else self.samples_per_s

    @property
    def samples_per_s(self) -> float:
        """Throughput over the timed rounds."""
        elapsed = self.data_time + self.compute_time
        return self.samples / elapsed if elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for the adaptation record (checkpoint-safe)."""
        return {**self.settings.as_dict(), "samples_per_s": round(self.samples_per_s, 2),
                "median_rate": round(self.median_rate, 2),
                "data_time": round(self.data_time, 4), "compute_time": round(self.compute_time, 4),
                "ram_fraction": self.ram_fraction, "seconds": round(self.seconds, 3)}


def trial_plan(settings: LoaderSettings, batches: int | None, rounds: int) -> tuple[int, int, int]:
    """(warm-up batches, batches a round, rounds) for one trial on an epoch of ``batches``.

    A round is one batch per worker (at least 2): workers started together deliver their batches
    together, so a round is the unit of steady delivery; the first round (worker start-up, the first
    step's allocations) is run but not timed. Without workers there is no start-up: one batch warms up.

    Example:
        >>> trial_plan(LoaderSettings(4), batches=100, rounds=3), trial_plan(LoaderSettings(0), 4, 3)
        ((4, 4, 3), (1, 2, 1))
    """
    per_round = max(settings.num_workers, 2)
    warmup = per_round if settings.num_workers else 1
    if batches is not None:
        rounds = min(rounds, (batches - warmup) // per_round)
    if rounds < 1:
        raise TooFewBatches(f"an epoch of {batches} batches is too short to time {settings.describe()}")
    return warmup, per_round, rounds


def time_trial(trainer: Trainer, loader: DataLoader, settings: LoaderSettings, rounds: int = 3,
               batch_size: int | None = None, min_seconds: float = 0.0, give_up_below: float | None = None) -> Timing:
    """Real steps (``trainer.run_step``: the model changes; the caller restores it) on a measurement
    loader with ``settings`` (and ``batch_size``, default the loader's); raises :class:`TooFewBatches`
    before any work when the epoch is too short. ``min_seconds``: more rounds (as many as
    :data:`MEASURE_PASSES` epochs hold, at most :data:`MAX_ROUNDS`) until the timed part lasts that
    long, so fast steps are not timed over a few milliseconds of a busy machine. ``give_up_below``:
    stop after the first timed round when its samples/s is already under this (a candidate far
    slower than the best so far cannot win: timing it longer only spends the budget)."""
    batch_size = batch_size or measure_batch_size(loader)
    batches_per_epoch = loader_length(loader)
    if batches_per_epoch is not None and batch_size != measure_batch_size(loader):
        batches_per_epoch = len(loader.dataset) // batch_size
    warmup, per_round, rounds = trial_plan(settings, batches_per_epoch, rounds)
    cuda = trainer.device if trainer.device.type == "cuda" else None
    timing = Timing(settings)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=WORKER_WARNING, category=UserWarning)
        measure = measurement_loader(loader, settings, batch_size)
        # an epoch decides whether the data set can be timed at all; extra rounds may read further passes,
        # as many as the measurement loader itself holds (its last batch of a pass may be short)
        total = loader_length(measure)
        most = MAX_ROUNDS if total is None else min(MAX_ROUNDS, (total - warmup) // per_round)
        batches = iter(measure)
    try:
        for _ in range(warmup):
            trainer.run_step(next(batches))
        timing.warmup_seconds, timing.warmup_batches = synced_clock(cuda) - started, warmup
        while len(timing.rates) < rounds or (timing.data_time + timing.compute_time < min_seconds
                                              and len(timing.rates) < most):
            _time_round(trainer, batches, per_round, timing, cuda)
            if give_up_below is not None and timing.rates[-1] < give_up_below:
                break
        timing.ram_fraction = psutil.virtual_memory().percent / 100  # with this trial's workers alive
    finally:
        stop_workers_now(batches)
    timing.seconds = time.perf_counter() - started
    return timing


def _time_round(trainer: Trainer, batches: Iterator[Any], per_round: int, timing: Timing,
                cuda: torch.device | None) -> None:
    data_time = compute_time = 0.0
    samples = 0
    for _ in range(per_round):
        fetch_start = synced_clock(cuda)
        batch = next(batches)
        compute_start = time.perf_counter()
        trainer.run_step(batch)
        compute_end = synced_clock(cuda)
        data_time += compute_start - fetch_start
        compute_time += compute_end - compute_start
        samples += trainer.state.batch_samples
    timing.add_round(data_time, compute_time, samples, per_round)


def stop_workers_now(batches: Any) -> None:
    """End a measurement iterator's workers at once (SIGKILL), then let torch tidy up.

    A graceful shutdown waits for every worker to finish the batch it is building (measured: 0.2 s
    for 2 workers, 0.6 s for 4 on a busy 2-core machine, once per trial); nothing they would produce
    is wanted. Their pids are first taken off torch's SIGCHLD watch, which would otherwise report a
    killed worker as a crash. Falls back to the graceful shutdown if torch's internals differ.
    """
    workers = getattr(batches, "_workers", None)
    if workers:
        try:
            from torch.utils.data._utils import signal_handling

            if getattr(batches, "_worker_pids_set", False):
                signal_handling._remove_worker_pids(id(batches))
                batches._worker_pids_set = False
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
        except (AttributeError, ImportError, RuntimeError, OSError):
            pass
    shutdown_workers(batches)


def synced_clock(cuda: torch.device | None) -> float:
    if cuda is not None:
        torch.cuda.synchronize(cuda)  # the step's kernels are done: compute time is compute, not queueing
    return time.perf_counter()


def rebuildable(loader: Any) -> str | None:
    """Why ``loader`` cannot be tuned, or None when it can (a DataLoader over a map-style data set)."""
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__}, which cannot be rebuilt with other worker settings"
    if isinstance(loader.dataset, IterableDataset):
        return (f"a DataLoader over an IterableDataset ({type(loader.dataset).__name__}), whose batches depend on "
                "the worker count (each worker iterates it)")
    return None
