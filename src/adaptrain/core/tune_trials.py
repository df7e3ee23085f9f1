"""What ``adaptrain tune`` measures: one configuration of the run, a few real training steps, undone.

:class:`TrialRunner` turns a *point* of :mod:`adaptrain.tuning.autotune` (precision, channels-last,
batch size, micro-batch, loader workers / prefetch / pinning, compile) into a
:class:`~adaptrain.tuning.autotune.Measurement`: the trainer is set to the point
(:func:`configured`), real optimizer steps run through ``trainer.run_step`` on batches of the
user's train data set read by a measurement loader with the point's settings (its own sampler and
generator: the run's order is never touched; :func:`~adaptrain.core.loader_trials.time_trial`
times data wait and compute apart), peak memory is read
(:class:`~adaptrain.core.batch_sizing.MemoryGauge`), and then the trainer's settings and its whole
state (weights, optimizer, scheduler, scaler, RNG) are put back exactly.

A one-off cost is measured too: with ``compile`` on, the warm-up batches' time beyond steady steps
is the compilation, which the search spreads over the expected run before comparing.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from adaptrain.core.batch_sizing import MemoryGauge
from adaptrain.core.loader_trials import TooFewBatches, time_trial
from adaptrain.core.memory_format import ChannelsLast
from adaptrain.core.precision import build_precision
from adaptrain.core.step import OOM_ERRORS
from adaptrain.data.loaders import loader_batch_size, loader_settings
from adaptrain.tuning.autotune import Measurement
from adaptrain.tuning.loader_tuning import LoaderSettings

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["TrialRunner", "configured", "current_point", "set_precision", "set_compile", "set_channels_last"]

MiB = 2**20
#: A trial whose first timed round runs under this share of the best trial's samples/s stops there: the
#: search's margins are a few percent, so it cannot win (16-mixed on a CPU, 10-23x slower, cost a whole
#: short run's budget when it was timed in full).
GIVE_UP = 0.5


def current_point(trainer: Trainer, loader: Any) -> dict[str, Any]:
    """The configuration the trainer and ``loader`` run now, as a search point."""
    settings = LoaderSettings.from_dict(loader_settings(loader))
    micro = trainer.state.micro_batch_size
    if micro is None and isinstance(trainer.batch_sizing.micro, int):  # Trainer(micro_batch_size=N), before fit
        micro = trainer.batch_sizing.micro
    return {"precision": trainer.precision.name, "channels_last": trainer.channels_last,
            "batch_size": loader_batch_size(loader), "micro_batch_size": micro,
            "num_workers": settings.num_workers, "prefetch_factor": settings.prefetch_factor,
            "pin_memory": settings.pin_memory, "compile": trainer.compile}


# ---------------------------------------------------------------------- setting the trainer
def set_precision(trainer: Trainer, name: str) -> None:
    """Train in precision ``name`` from now on (a fresh plugin: a GradScaler starts at its default scale)."""
    if trainer.precision.name == name:
        return
    trainer.precision = trainer.state.precision = build_precision(name, trainer.device)
    trainer.precision_name = name


def set_compile(trainer: Trainer, on: bool) -> None:
    """``torch.compile`` the model's forward (or go back to eager)."""
    if trainer.compile == on:
        return
    trainer.compile = on
    trainer._forward_model = trainer._eval_model = trainer._compile(trainer.model)


def set_channels_last(trainer: Trainer, on: bool) -> None:
    """Weights and 4-D inputs in channels-last format (or back to contiguous)."""
    if trainer.channels_last == on:
        return
    if on:
        trainer._channels_last = ChannelsLast(trainer.model)
    else:
        trainer._channels_last.remove()
        trainer._channels_last = None


@contextlib.contextmanager
def configured(trainer: Trainer, point: Mapping[str, Any]) -> Iterator[None]:
    """The trainer set to ``point`` (precision, channels-last, compile, micro-batch) inside the block;
    the same objects as before afterwards (the precision plugin, the compiled or eager forward)."""
    state = trainer.state
    saved = (trainer.precision, trainer.precision_name, trainer._forward_model, trainer._eval_model,
             trainer.compile, state.micro_batch_size)
    layout_before = trainer.channels_last
    compiled_here = bool(point.get("compile")) and not trainer.compile
    try:
        set_precision(trainer, point["precision"])
        set_channels_last(trainer, bool(point.get("channels_last")))
        set_compile(trainer, bool(point.get("compile")))
        state.micro_batch_size = point.get("micro_batch_size")
        yield
    finally:
        set_channels_last(trainer, layout_before)
        (trainer.precision, trainer.precision_name, trainer._forward_model, trainer._eval_model,
         trainer.compile, state.micro_batch_size) = saved
        state.precision = trainer.precision
        if compiled_here:
            torch._dynamo.reset()  # the trial's compiled graphs are not the run's: free them


# ---------------------------------------------------------------------- one trial
class TrialRunner:
    """``runner(point) -> Measurement``: real steps at ``point`` on ``loader``'s data, then everything undone.

    ``snapshot`` is the state to come back to after each trial (``state.snapshot(device="cpu")``).
    """

    def __init__(self, trainer: Trainer, loader: Any, snapshot: dict[str, Any], rounds: int = 5,
                 min_seconds: float = 0.5) -> None:
        self.trainer, self.loader, self.snapshot, self.rounds = trainer, loader, snapshot, rounds
        self.min_seconds = min_seconds
        self.best_rate = 0.0  # the fastest trial so far: a trial under GIVE_UP of it stops after one round

    def warm_up(self, point: dict[str, Any]) -> Measurement:
        """A short trial of one round at ``point`` (the process's first steps, which pay one-off costs),
        undone like any other. Its reading is rough: the caller may use it to size the run, not to rank."""
        rounds, seconds = self.rounds, self.min_seconds
        self.rounds, self.min_seconds = 1, 0.0
        try:
            return self(point)
        finally:
            self.rounds, self.min_seconds = rounds, seconds

    def __call__(self, point: dict[str, Any]) -> Measurement:
        trainer = self.trainer
        started = time.perf_counter()
        gauge = MemoryGauge(trainer.device)
        settings = LoaderSettings(point["num_workers"], point.get("prefetch_factor"), bool(point.get("pin_memory")))
        compiles_here = bool(point.get("compile")) and not trainer.compile  # only then is a failure a result
        timing, failed, oom = None, None, False
        trainer.batch_sizing.probing = True  # an OOM in a trial is a result, not something to recover from
        try:
            with configured(trainer, point):
                gauge.reset()
                try:
                    timing = time_trial(trainer, self.loader, settings, self.rounds, batch_size=point["batch_size"],
                                        min_seconds=self.min_seconds,
                                        give_up_below=GIVE_UP * self.best_rate if self.best_rate else None)
                except OOM_ERRORS as error:
                    failed, oom = f"out of memory ({type(error).__name__})", True
                    traceback.clear_frames(error.__traceback__)  # its frames hold the failed step's tensors
                except TooFewBatches as error:
                    failed = str(error)
                except Exception as error:  # a compile failure is a result; anything else is the user's bug
                    if not compiles_here:
                        raise
                    failed = f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                peak = gauge.peak_fraction()
        finally:
            trainer.batch_sizing.probing = False
            trainer.state.restore(self.snapshot)  # with the run's own precision plugin back (its scaler state)
        if gauge.cuda:
            torch.cuda.empty_cache()
        seconds = time.perf_counter() - started
        if timing is None:
            return Measurement(None, seconds, peak_fraction=peak, error=failed, out_of_memory=oom)
        measured = _measurement(timing, seconds, peak, gauge.capacity, bool(point.get("compile")))
        self.best_rate = max(self.best_rate, measured.samples_per_s or 0.0)
        return measured


def _measurement(timing: Any, seconds: float, peak: float, capacity: float, compiled: bool) -> Measurement:
    rates = list(timing.rates)
    rate = statistics.median(rates) if rates else timing.samples_per_s
    spread = statistics.stdev(rates) / rate / math.sqrt(len(rates)) if len(rates) > 1 and rate > 0 else None
    elapsed = timing.data_time + timing.compute_time
    setup = 0.0
    if compiled and timing.batches:
        steady = elapsed / timing.batches
        setup = max(timing.warmup_seconds - timing.warmup_batches * steady, 0.0)
    return Measurement(rate, seconds, setup_seconds=setup,
                       data_share=timing.data_time / elapsed if elapsed > 0 else None,
                       peak_fraction=peak, peak_bytes=int(peak * capacity), spread=spread,
                       data_time=timing.data_time, compute_time=timing.compute_time, rates=tuple(rates),
                       ram_fraction=timing.ram_fraction)
