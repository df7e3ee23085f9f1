"""The tune search's state: points, measurements, what may be searched, and the time budget.

A *point* is one configuration of the run (a dict: ``precision``, ``channels_last``, ``batch_size``,
``micro_batch_size``, ``num_workers``, ``prefetch_factor``, ``pin_memory``, ``compile``); a *trial*
turns a point into a :class:`Measurement`. :class:`Search` caches measurements by point, spends the
budget, and holds the incumbent point that the stages (:mod:`adaptrain.tuning.search_stages`) move.
Pure: no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adaptrain.tuning.loader_tuning import LoaderSettings

__all__ = ["Measurement", "TrialRecord", "Space", "Search", "effective_rate", "point_key", "DEFAULT_SPREAD",
           "LOADER_KEYS"]

LOADER_KEYS = ("num_workers", "prefetch_factor", "pin_memory")
DEFAULT_SPREAD = 0.02  # relative noise of a measurement that does not say


@dataclass(frozen=True)
class Measurement:
    """What one trial measured.

    ``samples_per_s``: steady throughput (None: the trial failed, ``error`` says why, e.g. out of
    memory). ``seconds``: what the trial cost, start-up included. ``setup_seconds``: a one-off cost
    the run would pay once (compilation). ``data_share``: the share of step time spent waiting for
    batches. ``peak_fraction``: peak memory over the device's; ``peak_bytes`` the same in bytes.
    ``spread``: relative standard error of ``samples_per_s``. ``data_time`` / ``compute_time`` /
    ``ram_fraction``: what the loader tuner reads. ``out_of_memory``: the failure was an OOM (a
    smaller micro-batch may fit; any other failure, say a data set too short to time, it would not cure).
    """

    samples_per_s: float | None
    seconds: float
    setup_seconds: float = 0.0
    data_share: float | None = None
    peak_fraction: float | None = None
    peak_bytes: int | None = None
    spread: float | None = None
    error: str | None = None
    data_time: float | None = None
    compute_time: float | None = None
    rates: tuple[float, ...] = ()
    ram_fraction: float | None = None
    out_of_memory: bool = False

    @property
    def ok(self) -> bool:
        return self.samples_per_s is not None and self.samples_per_s > 0


def effective_rate(measurement: Measurement, run_samples: float | None) -> float:
    """Samples/s over the whole run once one-off costs are paid: ``run / (setup + run / rate)``.

    >>> effective_rate(Measurement(200.0, 1.0, setup_seconds=10.0), run_samples=10_000)  # 50 s + 10 s
    166.66666666666666
    >>> effective_rate(Measurement(None, 1.0, error="out of memory"), 10_000)
    0.0
    """
    if not measurement.ok:
        return 0.0
    rate = float(measurement.samples_per_s)
    if not measurement.setup_seconds or not run_samples:
        return rate
    return run_samples / (measurement.setup_seconds + run_samples / rate)


def point_key(point: Mapping[str, Any]) -> tuple:
    """A hashable key of a point (its items, sorted)."""
    return tuple(sorted(point.items()))


@dataclass(frozen=True)
class TrialRecord:
    """One trial in the order run: its stage, the point, and what it measured."""

    stage: str
    point: dict[str, Any]
    measurement: Measurement


@dataclass(frozen=True)
class Space:
    """What may be searched.

    Args:
        precisions: the precisions the device runs (the trainer asks the device; never assumed faster).
        channels_last: whether channels-last applies (the model has 2-D convolutions and 4-D inputs).
        batch_mode: ``"full"`` (grow while it pays), ``"safe"`` (only shrink to fit) or None (keep the batch).
        max_batch_size: the largest batch (the data set's size caps it).
        max_batch_trials: probes the batch search may spend.
        loader: the loader start the hardware suggests and the most workers to try; None: not tunable.
        pin_memory: whether pinning can matter (a CUDA device).
        compile: whether to try ``torch.compile``; ``compile_cost_s`` a prior of its trial's cost.
        run_samples: samples the run will train (one-off costs are spread over them).
        min_gain: the least relative gain that changes a setting.
        data_bound_share: data wait share from which the loader is the bottleneck.
        z: standard errors a gain must also exceed.
        max_passes: coordinate-descent passes at most.
        drop_below: a value measured under this share of the incumbent's samples/s (or failing) is not
            tried again in later passes; a closer loser is, at the next pass's other settings (measured:
            bf16-mixed at 0.84x of fp32 at batch 32 was 1.15x at 128 and 1.6x at 256 on this CPU).
    """

    precisions: Sequence[str] = ("32",)
    channels_last: bool = False
    batch_mode: str | None = "full"
    max_batch_size: int | None = None
    max_batch_trials: int = 8
    memory_fraction: float = 0.9
    loader: tuple[LoaderSettings, int] | None = None
    pin_memory: bool = False
    compile: bool = False
    compile_cost_s: float = 30.0
    run_samples: float | None = None
    min_gain: float = 0.03
    data_bound_share: float = 0.10
    z: float = 2.0
    max_passes: int = 2
    drop_below: float = 0.5


class Search:
    """The incumbent point, every measurement (cached by point) and the budget.

    ``measure`` returns None (and notes why) when the trial would not fit in the budget.
    """

    def __init__(self, start: Mapping[str, Any], trial: Callable[[dict[str, Any]], Measurement], space: Space,
                 budget_s: float) -> None:
        if not (isinstance(budget_s, (int, float)) and budget_s >= 0 and math.isfinite(budget_s)):
            raise ValueError(f"budget is {budget_s!r}; expected seconds >= 0.")
        self.start, self.point = dict(start), dict(start)
        self.trial, self.space, self.budget_s = trial, space, float(budget_s)
        # budget_s as a function of a measurement (a share of the run at that speed): each faster
        # configuration measured shrinks the budget to its share of the shorter run it promises
        self.budget_for: Callable[[Measurement], float] | None = None
        self.spent = 0.0
        self.records: list[TrialRecord] = []
        self.notes: list[str] = []  # stages skipped and why
        self.reasons: dict[str, str] = {}  # setting -> the measured reason of its change
        self.dropped: dict[str, set] = {}  # setting -> values measured far slower (or failing): not tried again
        self._cache: dict[tuple, Measurement] = {}

    # ------------------------------------------------------------------ measuring
    def expected_cost(self, hint: float | None = None, point: Mapping[str, Any] | None = None) -> float:
        """What the next trial should cost: the median trial so far, the stage's hint, and what this very
        point cost when it was measured before (a compiled point re-measured pays its compilation again)."""
        costs = [r.measurement.seconds for r in self.records]
        known = self._cache.get(point_key(point)) if point is not None else None
        return max(statistics.median(costs) if costs else 0.0, hint or 0.0, known.seconds if known else 0.0)

    def affordable(self, hint: float | None = None, point: Mapping[str, Any] | None = None) -> bool:
        return not self.records or self.spent + self.expected_cost(hint, point) <= self.budget_s

    def measure(self, point: Mapping[str, Any], stage: str, hint: float | None = None,
                fresh: bool = False, required: bool = False) -> Measurement | None:
        """The point's measurement (cached unless ``fresh``); None when the budget cannot pay for it,
        unless it is ``required`` (the run cannot start without it)."""
        key = point_key(point)
        if key in self._cache and not fresh:
            return self._cache[key]
        if not required and not self.affordable(hint, point):
            self.note(f"{stage}: stopped, the next trial would pass the {self.budget_s:.1f} s budget "
                      f"({self.spent:.1f} s spent)")
            return None
        measured = self.trial(dict(point))
        self.spent += measured.seconds
        if self.budget_for is not None and measured.ok:
            self.budget_s = min(self.budget_s, float(self.budget_for(measured)))
        self.records.append(TrialRecord(stage, dict(point), measured))
        if key not in self._cache or not fresh:
            self._cache[key] = measured
        return measured

    def note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)

    @property
    def current(self) -> Measurement | None:
        return self._cache.get(point_key(self.point))

    def rate(self, measurement: Measurement | None) -> float:
        return effective_rate(measurement, self.space.run_samples) if measurement is not None else 0.0

    def beats(self, candidate: Measurement, incumbent: Measurement | None) -> tuple[bool, float, float]:
        """(better by the margin, the gain, the margin needed)."""
        new, old = self.rate(candidate), self.rate(incumbent)
        if old <= 0:
            return new > 0, math.inf, 0.0
        gain = new / old - 1
        noise = math.hypot(candidate.spread or DEFAULT_SPREAD, (incumbent.spread if incumbent else None)
                           or DEFAULT_SPREAD)
        needed = max(self.space.min_gain, self.space.z * noise)
        return gain >= needed, gain, needed

    def adopt(self, changes: Mapping[str, Any], reason: str) -> None:
        before = {k: self.point.get(k) for k in changes}
        self.point.update(changes)
        for name, value in changes.items():
            if before[name] != value:  # a setting changed again in a later pass keeps its whole story
                self.reasons[name] = f"{self.reasons[name]}; then {reason}" if name in self.reasons else reason

    # ------------------------------------------------------------------ the end
    def confirm(self, rounds: int = 2) -> float | None:
        """Re-measure the start and the choice side by side (alternating); keep the start when the
        choice is not faster after all. Returns the measured speedup of the choice (None: no budget)."""
        if point_key(self.point) == point_key(self.start):
            return 1.0
        start = self._cache.get(point_key(self.start))
        if start is None or not start.ok:
            return None  # the start does not run (out of memory): there is no side-by-side to take
        pairs: list[tuple[float, float]] = []
        for _ in range(rounds):
            original = self.measure(self.start, "confirm", fresh=True)
            chosen = self.measure(self.point, "confirm", fresh=True) if original is not None else None
            if original is None or chosen is None:
                break
            pairs.append((self.rate(original), self.rate(chosen)))
        if not pairs:
            return None
        ratios = [c / o if o > 0 else math.inf for o, c in pairs]
        speedup = statistics.median(ratios)
        if speedup < 1.0:
            self.note(f"confirm: the choice measured {speedup:.2f}x the start side by side; keeping the start")
            self.point, self.reasons = dict(self.start), {}
            return 1.0
        return speedup
