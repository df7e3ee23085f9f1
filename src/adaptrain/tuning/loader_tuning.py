"""DataLoader settings: a starting point from the hardware, then tuning by measurement.

Both decisions are pure (numbers in, numbers out); the callback that measures and rebuilds the
loader lives above ``core``.

1. :func:`initial_loader_settings`: the CPU cores this process may use, divided among the local
   ranks, as workers (none with a single core: a worker would only compete with the training
   process), capped by the batches in an epoch and by half the free RAM; ``pin_memory`` on CUDA;
   ``persistent_workers`` whenever there are workers. It also gives the tuner's ceiling, twice
   the cores (workers that wait on I/O or on the main process still help: on 2 cores a data-bound
   loop ran far faster with 4 workers than with 1).
2. :class:`LoaderTuner`: a small state machine fed one measurement per trial. A start whose data
   wait is under ``data_bound_share`` of the step time is compute-bound and settles at once on
   what it has (made persistent: respawned workers cost up to 44% of throughput on a
   compute-bound loop and buy nothing). While the loader is the bottleneck it doubles the workers
   up to the ceiling, then tries once the midpoint between the best and the first doubling that
   did not pay, then doubles ``prefetch_factor``. A change is kept only when its samples/s beat
   the best so far by ``min_gain`` (5%) and by ``z`` standard errors when per-window rates are
   given; it backs off (settles on the best) when RAM passes ``ram_limit`` or the RAM trend says
   the next step would; it settles after ``max_trials`` trials at most. The result is never a
   setting measured slower than the start: only measured gains replace the best.

It does not search below the start: with the loader the bottleneck, fewer workers produce less.

Example:
    >>> start = initial_loader_settings(cpu_count=2, dataset_len=10_000, batch_size=32, cuda=False)
    >>> start.settings.as_dict(), start.max_workers
    ({'num_workers': 2, 'prefetch_factor': 2, 'pin_memory': False, 'persistent_workers': True}, 4)
    >>> tuner = LoaderTuner(start.settings, start.max_workers)
    >>> d = tuner.observe(start.settings, data_time=4.0, compute_time=6.0, samples_per_s=150.0)
    >>> d.action, d.settings.num_workers
    ('try', 4)
    >>> d = tuner.observe(d.settings, data_time=1.0, compute_time=6.0, samples_per_s=185.0)
    >>> d.action, d.settings.prefetch_factor  # 4 workers paid; next, a deeper prefetch
    ('try', 4)
    >>> d = tuner.observe(d.settings, data_time=0.9, compute_time=6.0, samples_per_s=187.0)
    >>> d.action, d.settings.as_dict()  # +1% is below the 5% margin: keep 4 workers, prefetch 2
    ('settle', {'num_workers': 4, 'prefetch_factor': 2, 'pin_memory': False, 'persistent_workers': True})
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["LoaderSettings", "StartingPoint", "Trial", "Decision", "LoaderTuner", "initial_loader_settings",
           "margin_needed", "rate_and_error"]

DEFAULT_PREFETCH = 2  # torch's own default
RAM_SHARE = 0.5  # the share of free RAM the starting point lets workers take: the rest is the model's and the OS's


@dataclass(frozen=True)
class LoaderSettings:
    """The four loader settings the tuner chooses (``Trainer.replace_train_loader`` takes them as keywords).

    Normalised as ``torch.utils.data.DataLoader`` treats them: without workers there is no
    prefetch factor and nothing to keep alive; with workers a missing prefetch factor is torch's 2.

    Example:
        >>> LoaderSettings(0, prefetch_factor=4, persistent_workers=True).as_dict()
        {'num_workers': 0, 'prefetch_factor': None, 'pin_memory': False, 'persistent_workers': False}
        >>> LoaderSettings(3).describe()
        'num_workers=3, prefetch_factor=2'
    """

    num_workers: int
    prefetch_factor: int | None = None
    pin_memory: bool = False
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers is {self.num_workers!r}; expected an int >= 0.")
        if self.prefetch_factor is not None and (not isinstance(self.prefetch_factor, int)
                                                 or self.prefetch_factor < 1):
            raise ValueError(f"prefetch_factor is {self.prefetch_factor!r}; expected an int >= 1 or None.")
        workers = self.num_workers > 0
        object.__setattr__(self, "prefetch_factor", (self.prefetch_factor or DEFAULT_PREFETCH) if workers else None)
        object.__setattr__(self, "persistent_workers", bool(self.persistent_workers) and workers)
        object.__setattr__(self, "pin_memory", bool(self.pin_memory))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoaderSettings:
        """From a mapping such as ``LoaderSpec.settings()``; keys other than the four are ignored.

        Example:
            >>> LoaderSettings.from_dict({"batch_size": 8, "num_workers": 2, "persistent_workers": False})
            LoaderSettings(num_workers=2, prefetch_factor=2, pin_memory=False, persistent_workers=False)
        """
        return cls(int(values.get("num_workers") or 0), values.get("prefetch_factor"),
                   bool(values.get("pin_memory", False)), bool(values.get("persistent_workers", False)))

    def as_dict(self) -> dict[str, Any]:
        """The settings as keywords (what ``trainer.loader_settings`` reports)."""
        return {"num_workers": self.num_workers, "prefetch_factor": self.prefetch_factor,
                "pin_memory": self.pin_memory, "persistent_workers": self.persistent_workers}

    def describe(self) -> str:
        """A short form for log lines: workers and prefetch, then pinned / persistent when set."""
        text = f"num_workers={self.num_workers}"
        if self.num_workers:
            text += f", prefetch_factor={self.prefetch_factor}"
        flags = [name for name, on in (("pinned", self.pin_memory), ("persistent", self.persistent_workers)) if on]
        return text + (f" ({', '.join(flags)})" if flags else "")


@dataclass(frozen=True)
class StartingPoint:
    """What :func:`initial_loader_settings` chose, the tuner's worker ceiling, and why."""

    settings: LoaderSettings
    max_workers: int
    reason: str


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} is {value!r}; expected an int >= {minimum}.")
    return value


def initial_loader_settings(cpu_count: int, local_world_size: int = 1, dataset_len: int | None = None,
                            batch_size: int = 1, free_ram_bytes: int | None = None,
                            per_worker_ram_bytes: int | None = None, cuda: bool = False) -> StartingPoint:
    """Loader settings from the hardware, before anything is measured.

    Args:
        cpu_count: the cores this process may use (``len(os.sched_getaffinity(0))``; the caller reads it).
        local_world_size: the training processes on this machine, which share those cores.
        dataset_len: samples in the data set (None for an iterable one): no more workers than batches.
        batch_size: samples per batch.
        free_ram_bytes, per_worker_ram_bytes: available RAM and what one worker takes (its own
            memory beyond what fork shares); workers may take at most half the free RAM. Either None: no cap.
        cuda: the model trains on a CUDA device: pin host memory for faster, asynchronous copies.

    Example:
        >>> s = initial_loader_settings(cpu_count=16, local_world_size=4, dataset_len=100, batch_size=64,
        ...                             cuda=True)
        >>> s.settings.describe(), s.max_workers
        ('num_workers=2, prefetch_factor=2 (pinned, persistent)', 2)
        >>> s.reason  # doctest: +ELLIPSIS
        'num_workers=2: 4 CPU cores per process (16 cores / 4 local ranks); capped at 2 by the 2 batches an epoch; ...'
    """
    _positive_int("cpu_count", cpu_count)
    _positive_int("local_world_size", local_world_size)
    _positive_int("batch_size", batch_size)
    cores = max(cpu_count // local_world_size, 1)
    reason = f"{cores} CPU core{'s' if cores > 1 else ''} per process"
    reason += f" ({cpu_count} cores / {local_world_size} local ranks)" if local_world_size > 1 else ""
    workers = cores if cores >= 2 else 0
    if not workers:
        reason += ": loading in the main process (a worker would compete with training for the core)"
    ceiling = 2 * cores
    caps = []
    if dataset_len is not None:
        caps.append((math.ceil(_positive_int("dataset_len", dataset_len, 0) / batch_size),
                     "the {} batches an epoch"))
    if free_ram_bytes is not None and per_worker_ram_bytes is not None:
        _positive_int("free_ram_bytes", free_ram_bytes, 0)
        _positive_int("per_worker_ram_bytes", per_worker_ram_bytes)
        caps.append((int(RAM_SHARE * free_ram_bytes // per_worker_ram_bytes),
                     f"half the free RAM ({free_ram_bytes / 2**30:.1f} GiB, "
                     f"{per_worker_ram_bytes / 2**20:.0f} MiB a worker: {{}} workers)"))
    for cap, why in caps:
        if cap < workers:
            reason += f"; capped at {cap} by {why.format(cap)}"
        workers, ceiling = min(workers, cap), min(ceiling, cap)
    if cuda:
        reason += "; pin_memory (CUDA)"
    settings = LoaderSettings(workers, DEFAULT_PREFETCH, pin_memory=cuda, persistent_workers=True)
    return StartingPoint(settings, max(ceiling, workers), f"num_workers={workers}: {reason}")


@dataclass(frozen=True)
class Trial:
    """One measured setting: its samples/s (the median of the rates given), that rate's standard error,
    the share of step time spent waiting for data, and the system RAM in use (a fraction, or None)."""

    settings: LoaderSettings
    samples_per_s: float
    std_error: float
    data_share: float
    ram_fraction: float | None


@dataclass(frozen=True)
class Decision:
    """What to do next: ``"try"`` these settings and report back, or ``"settle"`` on them; ``reason`` is one line."""

    action: Literal["try", "settle"]
    settings: LoaderSettings
    reason: str

    @property
    def settled(self) -> bool:
        """The tuning is over: apply ``settings`` and keep them."""
        return self.action == "settle"


def rate_and_error(samples_per_s: float | Sequence[float]) -> tuple[float, float]:
    """The median of the rates and its standard error (from the MAD: one slow window does not move it)."""
    rates = [float(samples_per_s)] if isinstance(samples_per_s, (int, float)) else [float(r) for r in samples_per_s]
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"samples_per_s is {samples_per_s!r}; expected a rate > 0 or a non-empty list of them.")
    median = statistics.median(rates)
    if len(rates) < 3:
        return median, 0.0
    mad = statistics.median(abs(r - median) for r in rates)
    return median, 1.2533 * 1.4826 * mad / math.sqrt(len(rates))  # sd of a median of normal samples


def margin_needed(new_error: float, old_rate: float, old_error: float, min_gain: float, z: float) -> float:
    """The relative gain over ``old_rate`` a new rate needs to count as real: ``min_gain``, or ``z``
    standard errors of the difference when the rates' noise is larger.

    Example:
        >>> margin_needed(0.0, 100.0, 0.0, min_gain=0.05, z=2.0)
        0.05
        >>> round(margin_needed(3.0, 100.0, 4.0, min_gain=0.05, z=2.0), 3)  # noisy rates: 2 x 5 = 10 samples/s
        0.1
    """
    return max(min_gain, z * math.hypot(new_error, old_error) / old_rate)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


class LoaderTuner:
    """Tunes ``num_workers`` and ``prefetch_factor`` from measurements, within a bounded number of trials.

    Feed :meth:`observe` a measurement of the settings the last :class:`Decision` asked for (the
    first one: ``start``), taken after the new loader's first batches (worker start-up is not
    throughput) and over enough batches to average out their variation; pass per-window rates as
    a list to have the noise widen the margin. ``trials`` and ``decisions`` keep the whole story
    for the log and the monitor's summary.

    Args:
        start: the settings running now (usually :func:`initial_loader_settings`'s).
        max_workers: the most workers to try.
        max_trials: settings tried after the start, at most.
        min_gain: the least relative samples/s gain that keeps a change.
        data_bound_share: data wait, as a share of data wait + compute, from which the loader is the bottleneck.
        ram_limit: system RAM in use (a fraction) above which a setting is refused and no larger one is tried.
        max_prefetch: the largest ``prefetch_factor`` to try.
        z: standard errors of the difference a gain must also exceed, when rates come as lists.
    """

    def __init__(self, start: LoaderSettings, max_workers: int, *, max_trials: int = 5, min_gain: float = 0.05,
                 data_bound_share: float = 0.10, ram_limit: float = 0.85, max_prefetch: int = 8,
                 z: float = 2.0) -> None:
        _positive_int("max_workers", max_workers, 0)
        _positive_int("max_trials", max_trials, 0)
        _positive_int("max_prefetch", max_prefetch)
        for name, value in (("min_gain", min_gain), ("data_bound_share", data_bound_share),
                            ("ram_limit", ram_limit)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} is {value!r}; expected a fraction in [0, 1].")
        self.start, self.max_workers, self.max_trials = start, max_workers, max_trials
        self.min_gain, self.data_bound_share, self.ram_limit = min_gain, data_bound_share, ram_limit
        self.max_prefetch, self.z = max_prefetch, z
        self.trials: list[Trial] = []
        self.decisions: list[Decision] = []
        self._pending: LoaderSettings = start
        self._best: Trial | None = None
        self._stage = "grow"  # grow -> refine -> prefetch -> done
        self._failed_workers = 0  # the first doubling that did not pay: the refine step tries halfway to it
        self._note = ""  # why the search stopped early, for the settle line

    @property
    def result(self) -> Decision | None:
        """The settling decision, once there is one."""
        return self.decisions[-1] if self.decisions and self.decisions[-1].settled else None

    @property
    def best(self) -> Trial | None:
        """The fastest trial kept so far (the start until a change pays)."""
        return self._best

    def observe(self, settings: LoaderSettings, data_time: float, compute_time: float,
                samples_per_s: float | Sequence[float], ram_fraction: float | None = None) -> Decision:
        """Record a measurement of ``settings`` and decide the next step.

        Args:
            settings: what was measured: the start first, then each decision's settings.
            data_time, compute_time: seconds spent waiting for batches and computing, over the window.
            samples_per_s: the throughput of the window, or one rate per sub-window (noise estimate).
            ram_fraction: system RAM in use at the end of the window, in [0, 1]; None: unknown.
        """
        if self.result is not None:
            raise RuntimeError(f"LoaderTuner already settled on {self.result.settings.describe()}; "
                               "make a new tuner to tune again.")
        if settings != self._pending:
            raise ValueError(f"observed {settings.describe()}, but the tuner asked for "
                             f"{self._pending.describe()}; measure the settings of the last decision.")
        for name, value in (("data_time", data_time), ("compute_time", compute_time)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} is {value!r}; expected seconds >= 0.")
        if data_time + compute_time <= 0:
            raise ValueError("data_time + compute_time is 0; measure over at least one batch.")
        if ram_fraction is not None and not 0 <= ram_fraction <= 1:
            raise ValueError(f"ram_fraction is {ram_fraction!r}; expected a fraction in [0, 1] or None.")
        rate, error = rate_and_error(samples_per_s)
        trial = Trial(settings, rate, error, data_time / (data_time + compute_time), ram_fraction)
        self.trials.append(trial)
        line = self._first_verdict(trial) if self._best is None else self._verdict(trial)
        decision = self._next(line)
        self.decisions.append(decision)
        return decision

    # ------------------------------------------------------------------ the steps
    def _over_ram(self, trial: Trial) -> bool:
        return trial.ram_fraction is not None and trial.ram_fraction > self.ram_limit

    def _first_verdict(self, trial: Trial) -> str:
        self._best = trial
        numbers = f"data wait {_pct(trial.data_share)} of step time at {trial.samples_per_s:.1f} samples/s"
        if self._over_ram(trial):
            self._stage = "done"
            return f"RAM at {_pct(trial.ram_fraction)} (limit {_pct(self.ram_limit)}): adding no workers; {numbers}"
        if trial.data_share < self.data_bound_share:
            self._stage = "done"
            return (f"compute-bound ({numbers}, under {_pct(self.data_bound_share)}): more workers cannot pay")
        return f"data-bound ({numbers})"

    def _verdict(self, trial: Trial) -> str:
        best = self._best
        assert best is not None
        stage = self._stage
        change = _change(best.settings, trial.settings)
        gain = trial.samples_per_s / best.samples_per_s - 1
        needed = margin_needed(trial.std_error, best.samples_per_s, best.std_error, self.min_gain, self.z)
        numbers = f"{best.samples_per_s:.1f} -> {trial.samples_per_s:.1f} samples/s ({gain:+.1%}, needs +{needed:.1%})"
        if self._over_ram(trial):
            self._stage = "done"
            return (f"{change}: RAM at {_pct(trial.ram_fraction)} (limit {_pct(self.ram_limit)}), "
                    f"backing off to {best.settings.describe()}")
        if gain >= needed:
            self._best = trial
            self._stage = {"refine": "prefetch"}.get(stage, stage)
            return (f"{change} paid: {numbers}; data wait {_pct(best.data_share)} -> {_pct(trial.data_share)}")
        if stage == "grow":
            self._stage, self._failed_workers = "refine", trial.settings.num_workers
        else:
            self._stage = {"refine": "prefetch", "prefetch": "done"}[stage]
        return f"{change} did not pay: {numbers}; keeping {best.settings.describe()}"

    def _next(self, line: str) -> Decision:
        best = self._best
        assert best is not None
        trials_left = self.max_trials - (len(self.trials) - 1)
        candidate = None
        if trials_left <= 0:
            self._note = f"the {self.max_trials}-trial budget is spent"
        elif best.data_share < self.data_bound_share and self._stage != "done":
            self._note = f"the loader is no longer the bottleneck: data wait {_pct(best.data_share)}"
        else:
            candidate = self._candidate(best.settings)
        if candidate is not None:
            self._pending = candidate
            return Decision("try", candidate, f"{line}; trying {_change(best.settings, candidate)}")
        final = replace(best.settings, persistent_workers=True)  # respawning workers each epoch costs, never pays
        start = self.trials[0]
        summary = f"settled on {final.describe()}"
        if len(self.trials) > 1:
            summary += (f" after {len(self.trials) - 1} trial{'s' if len(self.trials) > 2 else ''}: "
                        f"{best.samples_per_s:.1f} samples/s, {best.samples_per_s / start.samples_per_s:.2f}x "
                        f"the start's {start.samples_per_s:.1f}")
        note = f" ({self._note})" if self._note else ""
        return Decision("settle", final, f"{line}; {summary}{note}")

    def _candidate(self, best: LoaderSettings) -> LoaderSettings | None:
        if self._stage == "grow":
            target = min(max(2 * best.num_workers, 1), self.max_workers)
            if target > best.num_workers and not self._ram_forbids(best.num_workers, target):
                return replace(best, num_workers=target, persistent_workers=True)
            self._stage = "prefetch" if target <= best.num_workers else "done"
        if self._stage == "refine":
            self._stage = "prefetch"
            middle = (best.num_workers + self._failed_workers) // 2
            if best.num_workers < middle < self._failed_workers and not self._ram_forbids(best.num_workers, middle):
                self._stage = "refine"
                return replace(best, num_workers=middle, persistent_workers=True)
        if self._stage == "prefetch" and best.num_workers > 0:
            factor = 2 * (best.prefetch_factor or DEFAULT_PREFETCH)
            if factor <= self.max_prefetch:
                return replace(best, prefetch_factor=factor, persistent_workers=True)
        self._stage = "done"
        return None

    def _ram_forbids(self, workers: int, target: int) -> bool:
        """Whether RAM, extrapolated linearly in the worker count from the trials so far, would pass the limit."""
        known = sorted((t.settings.num_workers, t.ram_fraction) for t in self.trials if t.ram_fraction is not None)
        if len(known) < 2 or known[-1][0] == known[0][0] or self._best is None or self._best.ram_fraction is None:
            return False
        slope = max((known[-1][1] - known[0][1]) / (known[-1][0] - known[0][0]), 0.0)
        predicted = self._best.ram_fraction + slope * (target - workers)
        if predicted <= self.ram_limit:
            return False
        self._note = (f"num_workers={target} would take RAM to about {_pct(predicted)} "
                      f"(limit {_pct(self.ram_limit)})")
        return True


def _change(before: LoaderSettings, after: LoaderSettings) -> str:
    """``num_workers 2 -> 4`` (or the prefetch factor), naming what differs."""
    parts = []
    if before.num_workers != after.num_workers:
        parts.append(f"num_workers {before.num_workers} -> {after.num_workers}")
    if before.num_workers and after.num_workers and before.prefetch_factor != after.prefetch_factor:
        parts.append(f"prefetch_factor {before.prefetch_factor} -> {after.prefetch_factor}")
    return ", ".join(parts) or after.describe()
