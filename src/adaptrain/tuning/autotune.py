"""The search behind ``adaptrain tune`` and ``Trainer(auto=True)``: pure functions over a trial function.

A *point* is one configuration of the run (a dict: ``precision``, ``channels_last``, ``batch_size``,
``micro_batch_size``, ``num_workers``, ``prefetch_factor``, ``pin_memory``, ``compile``). A *trial*
(supplied by the trainer, simulated in the tests) runs a few real training steps at a point and
returns a :class:`Measurement`. :class:`Search` holds what was measured and spends the time budget;
the stages move its incumbent point one setting at a time:

1. :func:`choose` (precision, channels-last, compile, pin_memory): try each value, keep the one
   whose *effective* samples/s (one-off costs such as compilation spread over the expected run)
   beats the incumbent by ``min_gain`` and by ``z`` standard errors. A value far slower
   (under ``drop_below`` of the incumbent: fp16 on a CPU) is dropped and never tried again; a
   closer loser is tried again in the next pass, at its other settings (bf16 can lose at batch 32
   and win at 256).
2. :func:`batch_stage`: the safe/full batch-size search of :mod:`adaptrain.tuning.batch_size`,
   its probes being trials at the incumbent's other settings; then
   :func:`~adaptrain.tuning.search_stages.precision_at_largest_batch` tries each other precision at
   the largest batch that fitted (a mixed precision's gain can grow with the batch).
3. :func:`loader_stage`: only when the incumbent waits for data (``data_share`` at least
   ``data_bound_share``: with a compute-bound run more workers cannot pay, so they are not swept),
   :class:`~adaptrain.tuning.loader_tuning.LoaderTuner` drives worker and prefetch trials. A pass
   that starts waiting for data runs it first: precision and layout trials measure nothing there.
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from adaptrain.tuning.search_space import (
    Measurement,
    Search,
    Space,
    TrialRecord,
    effective_rate,
    point_key,
)
from adaptrain.tuning.search_stages import (
    batch_stage,
    choose,
    data_bound_batch,
    loader_stage,
    precision_at_largest_batch,
    rescue_stage,
)

__all__ = ["Measurement", "TrialRecord", "Space", "Search", "SearchResult", "NotTunable", "search", "choose",
           "batch_stage", "loader_stage", "rescue_stage", "effective_rate", "OPTIMISATION_KEYS", "point_key",
           "describe_change", "too_short_to_tune", "MIN_TRIALS"]

#: Settings whose change alters the optimisation (the batch size, hence the LR); the others only change speed.
OPTIMISATION_KEYS = ("batch_size", "lr")


class NotTunable(ValueError):
    """The configuration as given cannot be measured (and so cannot be tuned)."""


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


#: Trials a default budget must buy before tuning starts: the start's own and one alternative at least.
MIN_TRIALS = 2


def too_short_to_tune(budget_s: float, trial_s: float, trials: int = MIN_TRIALS) -> str | None:
    """Why ``budget_s`` cannot pay for a search whose trials cost about ``trial_s`` each, or None.

    A budget that buys only the start's trial spends itself measuring what the run would do anyway:
    the run is slower by the trial and nothing can change (measured: ``auto=True`` on a 9 s data-bound
    run spent 0.7 s, 8%, on its start and kept it). Better not to start.

    Example:
        >>> too_short_to_tune(budget_s=0.5, trial_s=0.6)
        'its budget (0.50 s) buys fewer than 2 trials of about 0.60 s'
        >>> too_short_to_tune(budget_s=3.0, trial_s=0.6) is None
        True
    """
    if budget_s >= trials * trial_s:
        return None
    return f"its budget ({budget_s:.2f} s) buys fewer than {trials} trials of about {trial_s:.2f} s"


def search(start: Mapping[str, Any], trial: Callable[[dict[str, Any]], Measurement], space: Space,
           budget_s: float | Callable[[Measurement], float]) -> SearchResult:
    """Coordinate descent over the space from ``start`` within ``budget_s`` seconds of trials (see the module doc).

    ``budget_s`` may be a function of a measurement: the trainer's budget is a share of the run, whose
    length the first measurement that ran (the start, or the micro-batch that rescued it) tells; each
    faster measurement then shrinks it to its share of the shorter run it promises, so the tuning
    stays within its share of the run as tuned, not only of the run as given.
    Raises :class:`NotTunable` when the start fails for another reason than memory, or no micro-batch fits.
    """
    state = _started(start, trial, space, budget_s)
    for _ in range(space.max_passes):
        changed = False
        waits = _waits_for_data(state)
        if waits:  # feed the device first: no precision or layout gain can show while the run waits for data
            changed |= loader_stage(state)
        if len(space.precisions) > 1:
            changed |= choose(state, "precision", space.precisions)
        if space.channels_last:
            changed |= choose(state, "channels_last", (False, True))
        if not waits:
            changed |= loader_stage(state)
        before_batch = len(state.records)
        changed |= batch_stage(state)
        changed |= precision_at_largest_batch(state, before_batch)
        waited = data_bound_batch(state, before_batch)
        if waited is not None:  # the batch search stopped where the loader ran out: feed it, then search again
            changed |= loader_stage(state, batch_size=waited)
        if not changed or not state.affordable():
            break
    if space.pin_memory and (state.point.get("num_workers") or 0) > 0:
        choose(state, "pin_memory", (False, True))
    if space.compile:
        choose(state, "compile", (False, True), hint=space.compile_cost_s)
    if state.current is None:  # settings adopted from a look-ahead point: the choice itself must be measured
        state.measure(state.point, "chosen", required=True)
    start_measurement = state._cache.get(point_key(state.start))
    speedup = state.confirm()
    confirmed = speedup is not None and point_key(state.point) != point_key(state.start)
    chosen_measurement = state.current
    if speedup is None and start_measurement is not None and start_measurement.ok:  # no budget to re-measure
        speedup = state.rate(chosen_measurement) / state.rate(start_measurement)
    return SearchResult(dict(state.start), dict(state.point), tuple(state.records), dict(state.reasons),
                        tuple(state.notes), state.spent, state.budget_s, speedup, confirmed, start_measurement,
                        chosen_measurement)


def _waits_for_data(search: Search) -> bool:
    """Whether the incumbent's last measurement waited for data at least ``data_bound_share`` of its time."""
    current = search.current
    return current is not None and (current.data_share or 0.0) >= search.space.data_bound_share


def _started(start: Mapping[str, Any], trial: Callable[[dict[str, Any]], Measurement], space: Space,
             budget_s: float | Callable[[Measurement], float]) -> Search:
    """The search with its start measured (rescued by a micro-batch if it ran out of memory) and its budget set."""
    budget_for = budget_s if callable(budget_s) else None
    state = Search(start, trial, space, 0.0 if budget_for else budget_s)
    first = state.measure(state.point, "start", required=True)
    if not first.ok:
        if not first.out_of_memory:
            raise NotTunable(f"the configuration as given could not be measured: {first.error}")
        if not rescue_stage(state):
            raise NotTunable(f"the configuration as given ran out of memory ({first.error}), and so did every "
                             "micro-batch down to 1 sample")
    if budget_for is not None:
        state.budget_s = float(budget_for(state.current))
        state.budget_for = budget_for
    return state


def describe_change(name: str, before: Any, after: Any) -> str:
    """``precision 32 -> bf16-mixed``.

    >>> describe_change("batch_size", 64, 256)
    'batch_size 64 -> 256'
    """
    return f"{name} {before} -> {after}"
