"""Batch-size decisions: the search and its stop rule, the LR and accumulation rules, micro-batch plans.

Pure (no torch): a *probe*, a callable the trainer supplies (a few real training steps at one
batch size; simulated in the tests), turns a batch size into a :class:`Probe`; the rest is
numbers in, numbers out (the LR, accumulation and micro-batch rules live in
:mod:`adaptrain.tuning.batch_rules` and are re-exported here). :func:`search_batch_size`:

* ``"safe"`` only shrinks: the configured batch is probed once and kept if it fits; otherwise
  halve until one fits, then bisect between that fit and the smallest failure (aiming at where
  the measured peak memory, extrapolated on a line, reaches ``memory_fraction``, when it can).
* ``"full"`` grows from the start by doubling (x4 while a doubling buys >= 50% more samples/s:
  far from saturation), capped by ``limit``, and stops growing when two steps past the best are
  not faster by ``min_gain`` per doubling (the biggest batch is often not the fastest). It then
  bisects towards the memory edge if throughput still rose there, or spends up to 4 probes
  around the fastest, golden-section style on a log scale, if the peak is inside. The pick is
  the smallest batch whose samples/s is within ``tolerance`` of the fastest by more than the
  measurement noise. On 5000 random throughput curves (the tests' generator; ``benchmarks/
  batch_size.py --part simulated``) the pick gets >= 0.95 of an exhaustive sweep's best in 99.8%
  of them with noise <= 1% (98.9% with 2%), in <= 10 trials.

A batch *fits* when its probe did not run out of memory and its peak memory is at most
``memory_fraction`` of the device's. Each probe counts against ``max_trials``. Noise: throughput
is compared with margins, never exactly; a plateau that is a close call (within twice the noise
of ``min_gain``) re-measures the best once before growth stops, so one lucky measurement does
not end the search. A memory limit that moves between probes: the chosen size fitted when
probed and is smaller than every size that failed, so it may end a few samples under the edge,
never on a size seen to fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from adaptrain.tuning.batch_rules import (
    LR_RULES,
    BatchSizeError,
    accumulation_for,
    agree_batch_size,
    check_counts,
    halve_micro_batch,
    scale_lr,
    split_plan,
)

__all__ = ["Probe", "BatchSizeSearch", "BatchSizeError", "MODES", "LR_RULES", "search_batch_size",
           "scale_lr", "accumulation_for", "split_plan", "halve_micro_batch", "agree_batch_size"]

MODES = ("safe", "full")
FAST_GAIN = 0.5  # a doubling this much faster is far from saturation: the next step is x4, not x2
ALIGN = 8  # bisection and refinement midpoints prefer multiples of this while the bracket is wide
DEFAULT_SPREAD = 0.02  # relative noise of a throughput measurement when the probe does not say
PICK_Z = 1.0  # prefer a smaller batch only when it is within tolerance by more than the noise
REFINE_PROBES = 4  # at most this many probes around an inside peak: each buys a few % at most


@dataclass(frozen=True)
class Probe:
    """What one trial at ``batch_size`` measured.

    ``fits``: the steps ran without running out of memory. ``samples_per_s``: measured
    throughput (``"full"`` needs it for every probe that ran). ``peak_fraction``: peak memory
    over the device's memory (None: not measured; then only an OOM fails a probe). ``error``:
    why it failed, for the record. ``spread``: relative standard error of ``samples_per_s``
    (e.g. std of per-step rates / mean / sqrt(steps)); None: assumed 2%. It tells close calls.

    Example:
        >>> Probe(64, True, 1200.0, 0.95).accepted(memory_fraction=0.9)
        False
        >>> Probe(64, True, 1200.0, 0.95).verdict(0.9)
        'peak 95% > 90% of memory'
    """

    batch_size: int
    fits: bool
    samples_per_s: float | None = None
    peak_fraction: float | None = None
    error: str | None = None
    spread: float | None = None

    def accepted(self, memory_fraction: float) -> bool:
        """True when it ran and its peak memory (if measured) is within ``memory_fraction``."""
        return self.fits and (self.peak_fraction is None or self.peak_fraction <= memory_fraction)

    def verdict(self, memory_fraction: float) -> str:
        """One short phrase: why it failed, or what it measured."""
        if not self.fits:
            return self.error or "out of memory"
        if not self.accepted(memory_fraction):
            return f"peak {self.peak_fraction:.0%} > {memory_fraction:.0%} of memory"
        parts = [f"{self.samples_per_s:.4g} samples/s"] if self.samples_per_s is not None else []
        parts += [f"peak {self.peak_fraction:.0%}"] if self.peak_fraction is not None else []
        return ", ".join(parts) or "fits"


@dataclass(frozen=True)
class BatchSizeSearch:
    """The outcome: ``chosen`` and every probe in the order run.

    ``stop`` says why the search ended: ``"fits"`` (safe, the start fitted), ``"memory"`` (the
    edge was found), ``"plateau"`` (samples/s stopped improving), ``"limit"`` (reached ``limit``),
    ``"trials"`` (``max_trials`` spent). ``reason`` is the one line to print and record.
    """

    mode: str
    start: int
    chosen: int
    probes: tuple[Probe, ...]
    stop: str
    reason: str
    memory_fraction: float = 0.9
    limit: int | None = None

    @property
    def trials(self) -> int:
        return len(self.probes)

    @property
    def changed(self) -> bool:
        return self.chosen != self.start

    def to_dict(self) -> dict:
        """Plain JSON-able values, for the history and the run folder."""
        return {**asdict(self), "probes": [asdict(p) for p in self.probes], "trials": self.trials}


class _Trials:
    """The probes run so far (a size may be measured twice: a close call), the budget, the fit rule."""

    def __init__(self, probe: Callable[[int], Probe], max_trials: int, memory_fraction: float, full: bool) -> None:
        self._probe, self.max_trials, self.memory_fraction, self.full = probe, max_trials, memory_fraction, full
        self.records: list[Probe] = []  # in the order run
        self.by_size: dict[int, list[Probe]] = {}

    @property
    def left(self) -> int:
        return self.max_trials - len(self.records)

    def run(self, size: int, again: bool = False) -> bool | None:
        """Probe ``size`` (once, unless ``again``); True if it fits, None when the budget is spent."""
        if size in self.by_size and not again:
            return self.ok(size)
        if self.left <= 0:
            return None
        result = self._probe(size)
        if not isinstance(result, Probe) or result.batch_size != size:
            raise TypeError(f"probe({size}) returned {result!r}; expected Probe(batch_size={size}, ...)")
        if self.full and result.fits and not (result.samples_per_s or 0) > 0:
            raise ValueError(f"probe({size}) fitted but has samples_per_s={result.samples_per_s!r}; mode 'full' "
                             "compares throughput, so every probe that runs must measure it (> 0)")
        self.records.append(result)
        self.by_size.setdefault(size, []).append(result)
        return self.ok(size)

    def ok(self, size: int) -> bool:
        """Probed, and every probe of it fitted (a size that failed once is never chosen)."""
        return size in self.by_size and all(p.accepted(self.memory_fraction) for p in self.by_size[size])

    def rate(self, size: int) -> float:
        """Mean measured samples/s of ``size``."""
        rates = [p.samples_per_s for p in self.by_size[size]]
        return sum(rates) / len(rates)

    def noise(self, *sizes: int) -> float:
        """Relative standard error of a ratio of the rates of ``sizes`` (a mean of n counts 1/sqrt(n))."""
        def one(size: int) -> float:
            spreads = [DEFAULT_SPREAD if p.spread is None else p.spread for p in self.by_size[size]]
            return math.sqrt(sum(x * x for x in spreads)) / len(spreads)
        return math.sqrt(sum(one(b) ** 2 for b in sizes))

    def fitted(self) -> list[int]:
        """Sizes that fitted, below every size that failed (after a limit moved down, a fit above a
        later failure is not trusted)."""
        smallest_failure = min((b for b in self.by_size if not self.ok(b)), default=math.inf)
        return sorted(b for b in self.by_size if self.ok(b) and b < smallest_failure)

    def failure_above(self, size: int) -> int | None:
        return min((b for b in self.by_size if b > size and not self.ok(b)), default=None)

    def verdict(self, size: int) -> str:
        probes = self.by_size[size]
        bad = [p for p in probes if not p.accepted(self.memory_fraction)]
        if bad or len(probes) == 1 or not self.full:
            return (bad or probes)[0].verdict(self.memory_fraction)
        return f"{self.rate(size):.4g} samples/s (mean of {len(probes)})"


def search_batch_size(mode: str, start: int, probe: Callable[[int], Probe], limit: int | None = None, *,
                      max_trials: int = 10, memory_fraction: float = 0.9, min_gain: float = 0.05,
                      tolerance: float = 0.01) -> BatchSizeSearch:
    """Find the batch size to train with (see the module docstring for the rule).

    ``start``: the configured batch size. ``probe(batch_size) -> Probe``: a few real training steps
    (the model restored after), called at most ``max_trials`` times. ``limit``: the largest size
    ``"full"`` may choose (the data set's size, ``max_batch_size``); ``"safe"`` never grows, so it
    ignores it. ``min_gain``: growing continues while a doubling is at least this much faster.
    ``tolerance``: among batches within this share of the best measured samples/s, the smallest
    wins (less memory, the LR changes less). Raises :class:`BatchSizeError` when nothing fits.

    Example (a memory limit at 300 samples, throughput that saturates):
        >>> def probe(b):
        ...     return Probe(b, b <= 300, samples_per_s=1000 * b / (b + 20) if b <= 300 else None)
        >>> search_batch_size("safe", 512, probe).chosen
        300
        >>> found = search_batch_size("full", 16, probe)
        >>> found.chosen, found.stop, found.trials <= 10
        (288, 'memory', True)
        >>> print(found.reason)  # doctest: +ELLIPSIS
        batch size 16 -> 288 (full): memory edge (935.1 samples/s; the fastest); 304 does not fit ...
    """
    if mode not in MODES:
        raise ValueError(f'mode is {mode!r}; expected "safe" or "full"')
    check_counts(start=start, max_trials=max_trials, **({} if limit is None else {"limit": limit}))
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction is {memory_fraction!r}; expected a fraction in (0, 1]")
    if not (0 <= min_gain < 1 and 0 <= tolerance < 1):
        raise ValueError(f"min_gain ({min_gain!r}) and tolerance ({tolerance!r}) must be fractions in [0, 1)")
    trials = _Trials(probe, max_trials, memory_fraction, full=mode == "full")
    if mode == "safe":
        chosen, stop = _safe(trials, start)
    else:
        chosen, stop = _full(trials, min(start, limit or start), limit, min_gain, tolerance)
    reason = _reason(mode, start, chosen, stop, trials, min_gain)
    return BatchSizeSearch(mode, start, chosen, tuple(trials.records), stop, reason, memory_fraction, limit)


def _shrink(trials: _Trials, start: int) -> int:
    """Halve from ``start`` until a size fits; return it. Raises when none does within the budget."""
    size = start
    while not trials.run(size):
        if size == 1 or trials.left == 0:
            tried = ", ".join(f"{b}: {trials.verdict(b)}" for b in trials.by_size)
            why = "even batch size 1 does not fit" if size == 1 else f"nothing fitted in {trials.max_trials} trials"
            raise BatchSizeError(f"batch-size search from {start}: {why} ({tried})")
        size = max(1, size // 2)
    return size


def _between(lo: int, hi: int, target: float) -> int:
    """A size strictly between lo and hi near ``target``: a multiple of 8 while the gap holds one
    comfortably (kernels are often faster there), else the nearest integer."""
    rounded = int(round(target / ALIGN)) * ALIGN
    if hi - lo > 2 * ALIGN and lo < rounded < hi:
        return rounded
    return min(hi - 1, max(lo + 1, int(round(target))))


def _bisect(trials: _Trials, lo: int, hi: int, gain: float = math.inf, tolerance: float = 0.0) -> int:
    """Narrow [lo fits, hi fails] towards adjacent sizes (memory grows about linearly with the batch).

    With a finite throughput ``gain`` per doubling at ``lo`` ("full"), stop once the rest of the
    bracket could buy less than ``tolerance`` even at that rate (a probe there would not change
    the pick), or when a bigger fit is slower: the peak is below the edge, for :func:`_refine`.
    """
    guessed_wrong = False
    while hi - lo > 1 and trials.left > 0 and (1 + gain) ** math.log2(hi / lo) - 1 >= tolerance:
        guess = None if guessed_wrong else _edge_guess(trials, lo, hi)
        # a bracket wider than 2x (after a x4 step) is split at its geometric middle first: the skipped doubling
        mid = guess or _between(lo, hi, math.sqrt(lo * hi) if hi > 2 * lo else (lo + hi) / 2)
        if not trials.run(mid):
            hi, guessed_wrong = mid, guess is not None  # after a wrong guess, halve: convergence is kept
        elif math.isfinite(gain) and trials.rate(mid) < trials.rate(lo):
            return lo
        else:
            lo, guessed_wrong = mid, False
    return lo


def _edge_guess(trials: _Trials, lo: int, hi: int) -> int | None:
    """Where peak memory reaches ``memory_fraction`` on the line through the two largest fits that
    measured it (memory grows about linearly with the batch), if below hi; at or under lo (the
    line says lo is the edge): lo + 1, to confirm it."""
    points = [(b, trials.by_size[b][-1].peak_fraction) for b in trials.fitted() if b <= lo]
    points = [(b, p) for b, p in points if p is not None][-2:]
    if len(points) < 2 or points[1][1] <= points[0][1]:
        return None
    (b0, p0), (b1, p1) = points
    guess = int(b1 + (trials.memory_fraction - p1) * (b1 - b0) / (p1 - p0))
    return max(lo + 1, guess) if guess < hi else None


def _safe(trials: _Trials, start: int) -> tuple[int, str]:
    lo = _shrink(trials, start)
    if lo == start:
        return start, "fits"
    lo = _bisect(trials, lo, trials.failure_above(lo))
    return lo, "memory" if trials.failure_above(lo) == lo + 1 else "trials"


def _gain(trials: _Trials, new: int, old: int) -> float:
    """Throughput gain per doubling of the batch from ``old`` to ``new`` (a smaller step counts as one)."""
    return (trials.rate(new) / trials.rate(old)) ** (1 / max(1.0, math.log2(new / old))) - 1


def _grow(trials: _Trials, size: int, limit: int | None, min_gain: float) -> tuple[str, float | None]:
    """Double (x4 far from saturation) while meaningfully faster. Two steps past the best that are
    not make a plateau, unless re-measuring the best (once: the close call) shows it was a lucky
    measurement. Returns why it stopped and the gain per doubling that made the largest fit the
    best (None when it was not the best: the peak is inside the probed range)."""
    best, step, flat, gain, rechecked = size, 2, [], math.inf, False
    while limit is None or size < limit:
        nxt = size * step if limit is None else min(size * step, limit)
        fits = trials.run(nxt)
        if not fits:
            return ("trials" if fits is None else "memory"), (None if flat else gain)
        size, step = nxt, 2
        if _gain(trials, nxt, best) >= min_gain:
            best, flat, gain = nxt, [], _gain(trials, nxt, best)
            step = 4 if gain >= FAST_GAIN else 2
            continue
        flat.append(nxt)
        if len(flat) == 2:
            close = any(_gain(trials, b, best) >= min_gain - 2 * trials.noise(b, best) for b in flat)
            if rechecked or not close or not trials.run(best, again=True):
                return "plateau", None
            rechecked = True
            faster = [b for b in flat if _gain(trials, b, best) >= min_gain]
            if not faster:
                return "plateau", None
            best, gain, flat = faster[-1], _gain(trials, faster[-1], best), flat[flat.index(faster[-1]) + 1:]
    return "limit", (None if flat else gain)


def _refine(trials: _Trials) -> None:
    """Up to REFINE_PROBES probes around the best measured batch, golden-section style on a log
    scale: at the geometric midpoint of the wider gap to a fitted neighbour (equal gaps: towards
    the faster neighbour, where the peak leans). A gap under 20% is not worth a trial."""
    for _ in range(REFINE_PROBES):
        fitted = trials.fitted()
        i = max(range(len(fitted)), key=lambda j: trials.rate(fitted[j]))
        sides = [fitted[j] for j in (i - 1, i + 1) if 0 <= j < len(fitted)]
        sides = [b for b in sides if max(b, fitted[i]) / min(b, fitted[i]) > 1.2]
        if not sides or trials.left <= 0:
            return
        side = max(sides, key=lambda b: (round(abs(math.log2(b / fitted[i])), 2), trials.rate(b)))
        lo, hi = sorted((side, fitted[i]))
        mid = _between(lo, hi, math.sqrt(lo * hi))
        if mid in trials.by_size:
            return
        trials.run(mid)


def _full(trials: _Trials, start: int, limit: int | None, min_gain: float, tolerance: float) -> tuple[int, str]:
    lo = _shrink(trials, start)
    # the start did not fit: nothing is known about throughput there, so narrow the edge as "safe" does
    stop, gain = ("memory", math.inf) if lo < start else _grow(trials, lo, limit, min_gain)
    if stop == "memory" and gain is not None and trials.fitted():
        largest = trials.fitted()[-1]
        _bisect(trials, largest, trials.failure_above(largest), gain, tolerance)
    if stop != "trials" and trials.fitted():
        _refine(trials)
    if not trials.fitted():  # the limit moved below every fit (a re-measured best failed): shrink again
        _shrink(trials, max(1, trials.failure_above(0) // 2))
    fitted = trials.fitted()
    best = max(fitted, key=trials.rate)
    # the smallest batch within tolerance of the fastest by more than the noise of the comparison
    floor = lambda b: trials.rate(best) * (1 - tolerance + PICK_Z * trials.noise(b, best))
    return next(b for b in fitted if b == best or trials.rate(b) >= floor(b)), stop


def _reason(mode: str, start: int, chosen: int, stop: str, trials: _Trials, min_gain: float) -> str:
    """One line: old -> new, why, and the numbers that decided it."""
    head = f"batch size {start} kept ({mode})" if chosen == start else f"batch size {start} -> {chosen} ({mode})"
    at, above = trials.verdict(chosen), trials.failure_above(chosen)
    fail = f"; {above} does not fit ({trials.verdict(above)})" if above else ""
    if mode == "full":
        top = max(trials.fitted(), key=trials.rate)
        at += f"; fastest {top}: {trials.rate(top):.4g} samples/s" if top != chosen else "; the fastest"
    why = {"fits": f"fits ({at})", "limit": f"reached the limit ({at})", "trials": f"trial budget spent ({at}){fail}",
           "memory": f"{'largest that fits' if mode == 'safe' else 'memory edge'} ({at}){fail}",
           "plateau": f"samples/s stopped improving by >= {min_gain:.0%} per doubling ({at}){fail}"}[stop]
    return f"{head}: {why}; {len(trials.records)} trials"
