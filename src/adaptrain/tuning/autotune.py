"""The search behind ``adaptrain tune`` and ``Trainer(auto=True)``: pure functions over a trial function.

A *point* is one configuration of the run (a dict: ``precision``, ``channels_last``, ``batch_size``,
``micro_batch_size``, ``num_workers``, ``prefetch_factor``, ``pin_memory``, ``compile``). A *trial*
(supplied by the trainer, simulated in the tests) runs a few real training steps at a point and
returns a :class:`Measurement`. :class:`Search` holds what was measured and spends the time budget;
the stages move its incumbent point one setting at a time:

1. :func:`choose` (precision, channels-last, compile, pin_memory): try each value, keep the one
   whose *effective* samples/s (one-off costs such as compilation spread over the expected run)
   beats the incumbent by ``min_gain`` and by ``z`` standard errors. Anything slower is dropped,
   so a precision measured slower at the first batch size is never tried again.
2. :func:`batch_stage`: the safe/full batch-size search of :mod:`adaptrain.tuning.batch_size`,
   its probes being trials at the incumbent's other settings.
3. :func:`loader_stage`: only when the incumbent waits for data (``data_share`` at least
   ``data_bound_share``: with a compute-bound run more workers cannot pay, so they are not swept),
   :class:`~adaptrain.tuning.loader_tuning.LoaderTuner` drives worker and prefetch trials.
4. :func:`rescue_stage`: when the start itself runs out of memory, the largest micro-batch that fits
   (micro-batching never changes the optimisation).

:func:`search` runs them as coordinate descent: passes over precision, channels-last, loader and
batch until a pass changes nothing (settings interact: a data-bound run shows no precision gain
until workers feed it), then compile, whose one-off cost is only worth paying once the rest is
fixed, then a side-by-side re-measurement of the start and the choice (:meth:`Search.confirm`), which
also guards against a lucky single measurement. Measurements are cached by point.

Budget: a trial is not started when the time spent plus its expected cost (the median of the
trials so far, or the stage's hint: compiling costs far more than a step) would pass the budget.

Example:
    >>> def trial(point):  # bf16 is 1.5x faster; bigger batches pay up to 256
    ...     rate = 1000 * (1.5 if point["precision"] == "bf16-mixed" else 1.0) * min(point["batch_size"], 256) / 64
    ...     return Measurement(samples_per_s=rate, seconds=1.0)
    >>> start = {"precision": "32", "batch_size": 64, "num_workers": 0}
    >>> result = search(start, trial, Space(precisions=("32", "bf16-mixed"), max_batch_size=1024), budget_s=60)
    >>> result.chosen["precision"], result.chosen["batch_size"], round(result.speedup, 1)
    ('bf16-mixed', 256, 6.0)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from adaptrain.tuning.batch_size import Probe, search_batch_size
from adaptrain.tuning.loader_tuning import LoaderSettings, LoaderTuner

__all__ = ["Measurement", "TrialRecord", "Space", "Search", "SearchResult", "search", "choose", "batch_stage",
           "loader_stage", "rescue_stage", "effective_rate", "OPTIMISATION_KEYS", "point_key", "describe_change"]

#: Settings whose change alters the optimisation (the batch size, hence the LR); the others only change speed.
OPTIMISATION_KEYS = ("batch_size", "lr")
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
    ``ram_fraction``: what the loader tuner reads.
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
        self.spent = 0.0
        self.records: list[TrialRecord] = []
        self.notes: list[str] = []  # stages skipped and why
        self.reasons: dict[str, str] = {}  # setting -> the measured reason of its change
        self.dropped: dict[str, set] = {}  # setting -> values measured slower (or failing): not tried again
        self._cache: dict[tuple, Measurement] = {}

    # ------------------------------------------------------------------ measuring
    def expected_cost(self, hint: float | None = None) -> float:
        costs = [r.measurement.seconds for r in self.records]
        typical = statistics.median(costs) if costs else 0.0
        return max(typical, hint or 0.0)

    def affordable(self, hint: float | None = None) -> bool:
        return not self.records or self.spent + self.expected_cost(hint) <= self.budget_s

    def measure(self, point: Mapping[str, Any], stage: str, hint: float | None = None,
                fresh: bool = False, required: bool = False) -> Measurement | None:
        """The point's measurement (cached unless ``fresh``); None when the budget cannot pay for it,
        unless it is ``required`` (the run cannot start without it)."""
        key = point_key(point)
        if key in self._cache and not fresh:
            return self._cache[key]
        if not required and not self.affordable(hint):
            self.note(f"{stage}: stopped, the next trial would pass the {self.budget_s:.1f} s budget "
                      f"({self.spent:.1f} s spent)")
            return None
        measured = self.trial(dict(point))
        self.spent += measured.seconds
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


# ---------------------------------------------------------------------- stages
def choose(search: Search, name: str, values: Sequence[Any], stage: str | None = None,
           hint: float | None = None) -> bool:
    """Try every value of ``name`` at the incumbent; keep the fastest when it beats the incumbent by the
    margin. The user's own value wins any close call (within the margin of the fastest): a change must
    pay for itself. Returns whether the setting changed."""
    stage = stage or name
    incumbent = search.current or search.measure(search.point, stage)
    if incumbent is None or not incumbent.ok:
        return False
    current = search.point.get(name)
    measured: dict[Any, Measurement] = {current: incumbent}
    lines = []
    dropped = search.dropped.setdefault(name, set())
    for value in values:
        if value in measured or value in dropped:
            continue
        trial = search.measure({**search.point, name: value}, stage, hint)
        if trial is None:
            break
        measured[value] = trial
        if search.beats(incumbent, trial)[0]:  # slower beyond the noise (or failed): no later pass retries it
            dropped.add(value)
        lines.append(f"{value}: {search.rate(trial):.4g} samples/s" if trial.ok else
                     f"{value}: {trial.error or 'failed'}")
    fastest = max(measured, key=lambda v: search.rate(measured[v]))
    chosen = fastest if search.beats(measured[fastest], incumbent)[0] else current
    own = search.start.get(name)
    if chosen != own and own in measured and not search.beats(measured[chosen], measured[own])[0]:
        chosen = own  # the user's value is as fast as the best within the noise: keep it
    if chosen == current:
        return False
    best = measured[chosen]
    reason = (f"{name} {current} -> {chosen}: {search.rate(best):.4g} vs {search.rate(incumbent):.4g} samples/s "
              f"({search.rate(best) / search.rate(incumbent):.2f}x; tried {'; '.join(lines) or 'none'})")
    if best.setup_seconds:
        reason += f"; one-off {best.setup_seconds:.1f} s included over {search.space.run_samples:.0f} samples"
    search.adopt({name: chosen}, reason)
    return True


def batch_stage(search: Search) -> bool:
    """The safe/full batch-size search with trials as its probes. Returns whether the batch changed."""
    space = search.space
    start = search.point.get("batch_size")
    if space.batch_mode is None or not start:
        return False
    if search.measure(search.point, "batch_size") is None:
        return False

    def probe(size: int) -> Probe:
        point = {**search.point, "batch_size": size}
        if point.get("micro_batch_size") and point["micro_batch_size"] >= size:
            point["micro_batch_size"] = None
        measured = search.measure(point, "batch_size")
        if measured is None:
            return Probe(size, False, error="budget")
        return Probe(size, measured.ok, measured.samples_per_s, measured.peak_fraction, measured.error,
                     measured.spread)

    found = search_batch_size(space.batch_mode, start, probe, space.max_batch_size,
                              max_trials=space.max_batch_trials, memory_fraction=space.memory_fraction,
                              min_gain=space.min_gain)
    if found.chosen == start:
        return False
    search.adopt({"batch_size": found.chosen}, found.reason)
    return True


def loader_stage(search: Search, batch_size: int | None = None) -> bool:
    """Worker and prefetch trials, only when the run waits for data. Returns whether they changed.

    ``batch_size``: judge the loader at this batch instead of the incumbent's (a larger batch the
    batch search found data-bound: more workers there let the next pass grow the batch); only the
    loader settings are adopted, never that batch.
    """
    space = search.space
    if space.loader is None:
        return False
    at = {**search.point, "batch_size": batch_size or search.point.get("batch_size")}
    incumbent = search.measure(at, "loader")
    if incumbent is None or not incumbent.ok:
        return False
    share = incumbent.data_share or 0.0
    if share < space.data_bound_share:
        search.note(f"loader: not swept, compute-bound (data wait {share:.0%} of step time, under "
                    f"{space.data_bound_share:.0%})")
        return False
    hardware, max_workers = space.loader
    first = _settings(at, max(hardware.num_workers, at.get("num_workers") or 0), hardware.prefetch_factor)
    tuner = LoaderTuner(first, max(max_workers, first.num_workers), min_gain=space.min_gain,
                        data_bound_share=space.data_bound_share)
    settings = first
    while True:
        measured = search.measure({**at, **_loader_keys(settings)}, "loader")
        if measured is None or not measured.ok:
            break
        decision = tuner.observe(settings, measured.data_time or 0.0, max(measured.compute_time or 0.0, 1e-9),
                                 list(measured.rates) or measured.samples_per_s, measured.ram_fraction)
        if decision.settled:
            break
        settings = decision.settings
    if tuner.best is None:
        return False
    best_point = {**at, **_loader_keys(tuner.best.settings)}
    measured = search.measure(best_point, "loader")
    better, gain, _ = search.beats(measured, incumbent) if measured is not None else (False, 0.0, 0.0)
    if not better:
        return False
    where = f" at batch {at['batch_size']}" if batch_size else ""
    reason = (f"data-bound{where} (data wait {share:.0%} of step time): {_describe_loader(at)} -> "
              f"{_describe_loader(best_point)}, {search.rate(incumbent):.4g} -> {search.rate(measured):.4g} "
              f"samples/s ({gain:+.0%})")
    search.adopt(_loader_keys(tuner.best.settings), reason)
    return True


def _loader_keys(settings: LoaderSettings) -> dict[str, Any]:
    return {"num_workers": settings.num_workers, "prefetch_factor": settings.prefetch_factor}


def _data_bound_batch(search: Search, since: int) -> int | None:
    """The largest batch the batch search ran (trials ``since`` on) that waited for data, unless it is the choice."""
    loader_now = {k: search.point.get(k) for k in LOADER_KEYS}
    waited = [r.point["batch_size"] for r in search.records[since:]
              if r.stage == "batch_size" and r.measurement.ok and (r.measurement.data_share or 0.0)
              >= search.space.data_bound_share and {k: r.point.get(k) for k in LOADER_KEYS} == loader_now]
    largest = max(waited, default=None)
    return largest if largest is not None and largest != search.point.get("batch_size") else None


def rescue_stage(search: Search) -> bool:
    """The start does not fit: the largest micro-batch (halving) that does, batch and LR unchanged."""
    incumbent = search.current or search.measure(search.point, "micro_batch_size", required=True)
    if incumbent.ok:
        return False
    batch = search.point.get("batch_size") or 1
    micro = search.point.get("micro_batch_size") or batch
    while micro > 1:
        micro = max(micro // 2, 1)
        measured = search.measure({**search.point, "micro_batch_size": micro}, "micro_batch_size", required=True)
        if measured.ok:
            search.adopt({"micro_batch_size": micro}, f"batch {batch} failed ({incumbent.error}); micro-batches "
                         f"of {micro} fit at {measured.samples_per_s:.4g} samples/s (same batch, same LR)")
            return True
    return False


# ---------------------------------------------------------------------- the whole search
@dataclass(frozen=True)
class SearchResult:
    """The choice, the start, every trial, why each setting changed, what was skipped, the time spent
    and the speedup of the choice over the start (measured side by side when the budget allowed)."""

    start: dict[str, Any]
    chosen: dict[str, Any]
    trials: tuple[TrialRecord, ...]
    reasons: dict[str, str]
    notes: tuple[str, ...]
    spent: float
    budget_s: float
    speedup: float | None
    confirmed: bool = False
    start_measurement: Measurement | None = None
    chosen_measurement: Measurement | None = None

    @property
    def changes(self) -> dict[str, tuple[Any, Any]]:
        """setting -> (start value, chosen value), for the settings that changed."""
        return {k: (self.start.get(k), v) for k, v in self.chosen.items() if self.start.get(k) != v}


def search(start: Mapping[str, Any], trial: Callable[[dict[str, Any]], Measurement], space: Space,
           budget_s: float) -> SearchResult:
    """Coordinate descent over the space from ``start`` within ``budget_s`` seconds of trials (see the module doc)."""
    state = Search(start, trial, space, budget_s)
    first = state.measure(state.point, "start", required=True)
    if not first.ok:
        if not rescue_stage(state):
            raise RuntimeError(f"the configuration as given failed ({first.error}), and so did every micro-batch "
                               "down to 1 sample")
    for _ in range(space.max_passes):
        changed = False
        if len(space.precisions) > 1:
            changed |= choose(state, "precision", space.precisions)
        if space.channels_last:
            changed |= choose(state, "channels_last", (False, True))
        changed |= loader_stage(state)
        before_batch = len(state.records)
        changed |= batch_stage(state)
        waited = _data_bound_batch(state, before_batch)
        if waited is not None:  # the batch search stopped where the loader ran out: feed it, then search again
            changed |= loader_stage(state, batch_size=waited)
        if not changed or not state.affordable():
            break
    if space.pin_memory and (state.point.get("num_workers") or 0) > 0:
        choose(state, "pin_memory", (False, True))
    if space.compile:
        choose(state, "compile", (False, True), hint=space.compile_cost_s)
    start_measurement = state._cache.get(point_key(state.start))
    speedup = state.confirm()
    confirmed = speedup is not None and point_key(state.point) != point_key(state.start)
    chosen_measurement = state.current
    if speedup is None:  # no budget left to re-measure: the search's own measurements
        speedup = state.rate(chosen_measurement) / state.rate(start_measurement) if state.rate(start_measurement) \
            else None
    return SearchResult(dict(state.start), dict(state.point), tuple(state.records), dict(state.reasons),
                        tuple(state.notes), state.spent, state.budget_s, speedup, confirmed, start_measurement,
                        chosen_measurement)


# ---------------------------------------------------------------------- helpers
def _settings(point: Mapping[str, Any], workers: int, prefetch: int | None) -> LoaderSettings:
    return replace(LoaderSettings(workers, prefetch if workers else None, bool(point.get("pin_memory"))),
                   persistent_workers=workers > 0)


def _describe_loader(point: Mapping[str, Any]) -> str:
    workers = point.get("num_workers") or 0
    return f"num_workers={workers}" + (f", prefetch_factor={point.get('prefetch_factor') or 2}" if workers else "")


def describe_change(name: str, before: Any, after: Any) -> str:
    """``precision 32 -> bf16-mixed``.

    >>> describe_change("batch_size", 64, 256)
    'batch_size 64 -> 256'
    """
    return f"{name} {before} -> {after}"

