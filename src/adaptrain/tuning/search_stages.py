"""The stages of the tune search: each moves the incumbent point of a :class:`~adaptrain.tuning.search_space.Search`.

* :func:`choose`: try each value of one setting, keep the fastest by the margin (the user's value wins
  close calls; a value far slower, under ``Space.drop_below`` of the incumbent, or failing, is dropped
  for later passes; a closer loser is tried again).
* :func:`batch_stage`: the safe/full batch-size search of :mod:`adaptrain.tuning.batch_size`.
* :func:`loader_stage`: workers and prefetch through :class:`~adaptrain.tuning.loader_tuning.LoaderTuner`,
  only when the run waits for data.
* :func:`rescue_stage`: the largest micro-batch that fits when the start runs out of memory.

Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from adaptrain.tuning.batch_size import Probe, search_batch_size
from adaptrain.tuning.loader_tuning import LoaderSettings, LoaderTuner
from adaptrain.tuning.search_space import LOADER_KEYS, Measurement, Search, TrialRecord

__all__ = ["choose", "batch_stage", "loader_stage", "rescue_stage", "data_bound_batch", "precision_at_largest_batch"]


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
        if not trial.ok or search.rate(trial) < search.space.drop_below * search.rate(incumbent):
            dropped.add(value)  # hopeless here (fp16 on a CPU: 0.1x): no later pass retries it
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


class _BudgetSpent(Exception):
    """A batch probe the budget cannot pay for: the search ends there (it is no failure to fit)."""


def batch_stage(search: Search) -> bool:
    """The safe/full batch-size search with trials as its probes. Returns whether the batch changed.

    When the budget ends the search early, the fastest batch measured so far is kept if it beats the
    incumbent by the margin: an unmeasured probe says nothing about memory, so it must not count as
    a size that does not fit (it did, and threw away a 1.75x batch already measured)."""
    space = search.space
    start = search.point.get("batch_size")
    if space.batch_mode is None or not start:
        return False
    incumbent = search.measure(search.point, "batch_size")
    if incumbent is None:
        return False
    probed: dict[int, Measurement] = {}

    def probe(size: int) -> Probe:
        point = {**search.point, "batch_size": size}
        if point.get("micro_batch_size") and point["micro_batch_size"] >= size:
            point["micro_batch_size"] = None
        measured = search.measure(point, "batch_size")
        if measured is None:
            raise _BudgetSpent
        probed[size] = measured
        return Probe(size, measured.ok, measured.samples_per_s, measured.peak_fraction, measured.error,
                     measured.spread)

    try:
        found = search_batch_size(space.batch_mode, start, probe, space.max_batch_size,
                                  max_trials=space.max_batch_trials, memory_fraction=space.memory_fraction,
                                  min_gain=space.min_gain)
    except _BudgetSpent:
        return _fastest_batch_so_far(search, incumbent, probed)
    if found.chosen == start:
        return False
    search.adopt({"batch_size": found.chosen}, found.reason)
    return True


def _fastest_batch_so_far(search: Search, incumbent: Measurement, probed: Mapping[int, Measurement]) -> bool:
    fits = {size: m for size, m in probed.items()
            if m.ok and (m.peak_fraction or 0.0) <= search.space.memory_fraction}
    if not fits:
        return False
    size = max(fits, key=lambda s: search.rate(fits[s]))
    if size == search.point.get("batch_size") or not search.beats(fits[size], incumbent)[0]:
        return False
    search.adopt({"batch_size": size}, f"batch size {search.point.get('batch_size')} -> {size} "
                 f"({search.space.batch_mode}, cut short by the budget): the fastest of {len(fits)} measured, "
                 f"{search.rate(fits[size]):.4g} vs {search.rate(incumbent):.4g} samples/s")
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


def _largest_batch(search: Search, since: int, keep: Callable[[TrialRecord], bool]) -> int | None:
    """The largest batch among the batch search's trials ``since`` on that ran and that ``keep`` accepts."""
    return max((r.point["batch_size"] for r in search.records[since:]
                if r.stage == "batch_size" and r.measurement.ok and keep(r)), default=None)


def data_bound_batch(search: Search, since: int) -> int | None:
    """The largest batch the batch search ran (trials ``since`` on) that waited for data, unless it is the choice."""
    loader_now = {k: search.point.get(k) for k in LOADER_KEYS}
    largest = _largest_batch(search, since, lambda r: (r.measurement.data_share or 0.0) >= search.space.data_bound_share
                             and {k: r.point.get(k) for k in LOADER_KEYS} == loader_now)
    return largest if largest is not None and largest != search.point.get("batch_size") else None


def precision_at_largest_batch(search: Search, since: int) -> bool:
    """Each other precision still in play at the largest batch the batch search ran (trials ``since``
    on) that fitted; adopt the pair when it beats the incumbent by the margin.

    A precision's gain can grow with the batch while the incumbent's does not (bf16 on this CPU:
    0.84x fp32 at batch 32, +2.5% at 112, 1.6x at 256), so neither one setting at a time nor the batch
    search at the incumbent's precision sees the best pair. One trial per precision checks it.
    """
    if search.space.batch_mode is None or len(search.space.precisions) < 2:
        return False
    incumbent, precision_now = search.current, search.point.get("precision")
    largest = _largest_batch(search, since, lambda r: r.point.get("precision") == precision_now
                             and (r.measurement.peak_fraction or 0.0) <= search.space.memory_fraction)
    if incumbent is None or not incumbent.ok or largest is None or largest <= search.point.get("batch_size", 0):
        return False
    dropped = search.dropped.get("precision", set())
    best, best_point = incumbent, None
    for precision in search.space.precisions:
        if precision == precision_now or precision in dropped:
            continue
        point = {**search.point, "precision": precision, "batch_size": largest}
        measured = search.measure(point, "precision")
        if measured is None:
            break
        if measured.ok and search.beats(measured, best)[0]:
            best, best_point = measured, point
    if best_point is None:
        return False
    search.adopt({"precision": best_point["precision"], "batch_size": largest},
                 f"precision {precision_now} -> {best_point['precision']} at batch {largest}, the "
                 f"largest that fitted: {search.rate(best):.4g} vs {search.rate(incumbent):.4g} samples/s "
                 f"({search.rate(best) / search.rate(incumbent):.2f}x; its gain grows with the batch)")
    return True


def rescue_stage(search: Search) -> bool:
    """The start does not fit: the largest micro-batch (halving) that does, batch and LR unchanged."""
    incumbent = search.current or search.measure(search.point, "micro_batch_size", required=True)
    if incumbent.ok or not incumbent.out_of_memory:
        return False
    batch = search.point.get("batch_size") or 1
    micro = search.point.get("micro_batch_size") or batch
    while micro > 1:
        micro = max(micro // 2, 1)
        measured = search.measure({**search.point, "micro_batch_size": micro}, "micro_batch_size", required=True)
        if measured.ok:
            search.adopt({"micro_batch_size": micro}, f"batch {batch} failed ({incumbent.error}); micro-batches "
                         f"of {micro} fit at {measured.samples_per_s:.4g} samples/s (same batch, same LR; "
                         "BatchNorm layers normalise over each micro-batch)")
            return True
    return False


def _settings(point: Mapping[str, Any], workers: int, prefetch: int | None) -> LoaderSettings:
    return replace(LoaderSettings(workers, prefetch if workers else None, bool(point.get("pin_memory"))),
                   persistent_workers=workers > 0)


def _describe_loader(point: Mapping[str, Any]) -> str:
    workers = point.get("num_workers") or 0
    return f"num_workers={workers}" + (f", prefetch_factor={point.get('prefetch_factor') or 2}" if workers else "")
