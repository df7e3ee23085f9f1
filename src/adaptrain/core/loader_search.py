"""The order of the loader trials (:class:`LoaderSearch`): which setting to time next, when to settle.

No torch and no trainer: it is fed one :class:`~adaptrain.core.loader_trials.Timing` at a time by
:class:`~adaptrain.core.loader_autotune.LoaderAutotune`, which measures and applies, and its
decisions are :mod:`adaptrain.tuning.loader_tuning`'s pure functions.
"""

from __future__ import annotations

from dataclasses import replace

from adaptrain.core.loader_trials import Timing
from adaptrain.tuning.loader_tuning import (
    Decision,
    LoaderSettings,
    LoaderTuner,
    StartingPoint,
    margin_needed,
    rate_and_error,
)


class LoaderSearch:
    """The order of the trials, fed one :class:`~adaptrain.core.loader_trials.Timing` at a time; no torch, no trainer.

    A loader given with ``num_workers=0`` is timed first as it is, over one round (no worker to
    start). Compute-bound there, it is kept: workers cannot pay and would cost start-up, batch
    transfers and RAM (measured on 2 cores with in-memory tensors: 2 workers 0.80x of none).
    Data-bound, the tuner searches from the hardware start. That one round does not decide alone:
    measured, a burst of other load during it made a data-bound run keep no workers at 0.54x of the
    best static. But when the search's best measured slower than it, the given loader is timed
    again (free: no worker to start, and its batches train) and kept unless the workers beat that
    second reading by the tuner's margin: a loop that only looks data-bound (an in-memory data set
    whose indexing is 10-15% of the step) ran 0.3-0.7x as fast with the workers it was moved to.

    The budget: a trial whose estimated cost (the last trial's worker start-up beyond its batches'
    steady time, scaled by the worker count) would take the tuning's cost so far past ``budget`` of
    the run (what is left of it at the best measured speed, plus what has run) is not started. The
    first trial with workers always runs: a trial without workers has no start-up to scale from.

    Args:
        given: the loader's settings as the user gave them.
        start: the hardware starting point.
        tuner: the tuner, started at ``start.settings``.
        rounds: timed rounds a trial runs at least (the given loader's first trial: one).
        budget: the most tuning may cost, as a share of the run; 0: no limit.
        later_batches: the run's batches after the tuning epoch (for the budget).
        trial_share: a trial after the first times at least this share of the run left (see
            :meth:`min_trial_seconds`), within a quarter of the epoch.

    Example:
        >>> from adaptrain.tuning.loader_tuning import StartingPoint
        >>> start = StartingPoint(LoaderSettings(2, 2, persistent_workers=True), 4, "2 cores")
        >>> search = LoaderSearch(LoaderSettings(0), start, LoaderTuner(start.settings, 4), later_batches=100)
        >>> search.first.describe(), search.first_rounds
        ('num_workers=0', 1)
        >>> given = Timing(LoaderSettings(0), data_time=0.01, compute_time=0.99, rates=[64.0], samples=64, batches=2)
        >>> decision = search.observe(given, batches_left=30)
        >>> decision.action, decision.reason.split(":")[0]
        ('settle', 'compute-bound as given (data wait 1% of step time at 64.0 samples/s, under 10%)')

    Data-bound as given, but the workers measured slower: the given loader is timed again, and kept.

        >>> search = LoaderSearch(LoaderSettings(0), start, LoaderTuner(start.settings, 2, max_trials=0))
        >>> given = Timing(LoaderSettings(0), data_time=0.2, compute_time=0.8, rates=[900.0], samples=64, batches=2)
        >>> search.observe(given, batches_left=100).settings.describe()
        'num_workers=2, prefetch_factor=2 (persistent)'
        >>> workers = Timing(start.settings, data_time=0.5, compute_time=0.5, rates=[600.0] * 3, samples=96, batches=6)
        >>> decision = search.observe(workers, batches_left=90)
        >>> decision.action, decision.settings.describe()
        ('try', 'num_workers=0')
        >>> again = Timing(LoaderSettings(0), data_time=0.2, compute_time=0.8, rates=[880.0] * 3, samples=96, batches=6)
        >>> decision = search.observe(again, batches_left=84)
        >>> decision.action, decision.settings.describe(), decision.reason.split(": keeping")[1]
        ('settle', 'num_workers=0', ' the loader as given (more workers did not pay)')
    """

    def __init__(self, given: LoaderSettings, start: StartingPoint, tuner: LoaderTuner, rounds: int = 3,
                 budget: float = 0.05, later_batches: int = 0, trial_share: float = 0.01) -> None:
        self.given, self.start, self.tuner, self.rounds, self.budget = given, start, tuner, rounds, budget
        self.later_batches, self.trial_share = later_batches, trial_share
        self.timings: list[Timing] = []
        self.baseline: Timing | None = None  # the loader as given, timed before the search
        self._timing_given = given.num_workers == 0 and given != start.settings
        self.first = given if self._timing_given else start.settings
        self.first_rounds = 1 if self._timing_given else rounds
        self._given_timed_again = False  # once at most
        # While the given loader is timed again: the search's next step, taken if that second reading loses.
        self._resume: Decision | None = None
        self._outlier: Timing | None = None  # the given loader's first reading, when its second one lost

    def observe(self, timing: Timing, batches_left: int | None) -> Decision:
        """The next step after ``timing``; ``batches_left``: the tuning epoch's batches not yet trained
        (None: unknown, a loader without a length; then no budget applies: the run's length is unknown)."""
        self.timings.append(timing)
        if self._resume is not None:
            return self._given_again(timing, batches_left)
        if self._timing_given and self.baseline is None:
            self.baseline = timing
            share = timing.data_time / max(timing.data_time + timing.compute_time, 1e-12)
            line = (f"data wait {share:.0%} of step time at {timing.median_rate:.1f} samples/s, "
                    f"{'under' if share < self.tuner.data_bound_share else 'over'} "
                    f"{self.tuner.data_bound_share:.0%}")
            if share < self.tuner.data_bound_share:
                return Decision("settle", self.given, f"compute-bound as given ({line}): workers cannot pay and "
                                                      "would cost start-up, transfers and RAM")
            return Decision("try", self.start.settings, f"data-bound as given ({line}); trying "
                                                       f"{self.start.settings.describe()}")
        decision = self.tuner.observe(timing.settings, timing.data_time, timing.compute_time, timing.rates,
                                      timing.ram_fraction)
        return self._within_budget(decision, batches_left)

    def _within_budget(self, decision: Decision, batches_left: int | None) -> Decision:
        """``decision``, unless its trial would pass the budget (then: settle on the best), or unless the given
        loader measured faster than the workers' best: then it is timed again first (see :meth:`_given_again`)."""
        over = None if decision.settled else self._over_budget(decision.settings, batches_left)
        if over:
            decision = self._settle_on_best(f"{decision.reason.rsplit('; trying', 1)[0]}; not trying "
                                            f"{decision.settings.describe()}: {over}")
        # At the end of the search, or at once when it leads by more than the tuner's margin (growing the
        # pool rarely turns a loss that large around). No budget check: a trial without workers has no
        # pool to start, and its batches train.
        if not self._given_timed_again and (self._given_looked_faster(self.tuner.min_gain)
                                            or (decision.settled and self._given_looked_faster())):
            assert self.baseline is not None
            self._given_timed_again, self._resume = True, decision
            return Decision("try", self.given, f"{decision.reason.rsplit('; trying', 1)[0]}; but the loader as "
                                               f"given measured faster ({self.baseline.median_rate:.1f} samples/s "
                                               "over one round): timing it again")
        return decision

    def _given_looked_faster(self, by: float = 0.0) -> bool:
        best = self.tuner.best
        return (self.baseline is not None and best is not None
                and self.baseline.median_rate > best.samples_per_s * (1 + by))

    def _given_again(self, timing: Timing, batches_left: int | None) -> Decision:
        """The given loader's second reading decides: the workers' best is kept only if it beats it by the
        tuner's margin (``min_gain``, or ``z`` standard errors when that is larger); then the search goes on
        where it was (its first reading was the outlier)."""
        best, resume, first = self.tuner.best, self._resume, self.baseline
        assert best is not None and resume is not None
        self._resume, self.baseline = None, timing
        rate, error = rate_and_error(timing.rates or [max(timing.median_rate, 1e-9)])
        gain = best.samples_per_s / rate - 1
        needed = margin_needed(best.std_error, rate, error, self.tuner.min_gain, self.tuner.z)
        line = (f"the loader as given, timed again: {rate:.1f} samples/s against {best.settings.describe()}'s "
                f"{best.samples_per_s:.1f} ({gain:+.1%}; workers need +{needed:.1%})")
        if gain < needed:
            return Decision("settle", self.given, f"{line}: keeping the loader as given (more workers did not pay)")
        self._outlier = first  # its fast round did not repeat: no speed to price the trials or the budget by
        if resume.settled:
            return Decision("settle", resume.settings, f"{line}; {resume.reason}")
        return self._within_budget(Decision("try", resume.settings, f"{line}; {resume.reason}"), batches_left)

    def min_trial_seconds(self, batches_left: int | None) -> float:
        """The least a trial should time: ``trial_share`` of the run left at the fastest speed measured (0
        before any measurement). Trials train, so a longer one costs only a slower setting's extra time;
        on a long run it buys a steadier measurement (close settings are 5-10% apart, one round's noise more)."""
        fastest = self._fastest()
        if fastest is None or batches_left is None or not self.trial_share:
            return 0.0
        return self.trial_share * (batches_left + self.later_batches) * fastest.seconds_per_batch

    def settle_early(self, why: str) -> Decision:
        """Settle before the tuner does, with no batches left to time anything more: on the fastest
        reading (the given loader's, when it measured faster than every worker setting, even over its one
        round), else the tuner's best, else the unmeasured hardware start."""
        if self._resume is not None or self._given_looked_faster():
            best = self.tuner.best
            assert best is not None and self.baseline is not None
            return Decision("settle", self.given, f"{why}: keeping the loader as given, measured faster "
                                                  f"({self.baseline.median_rate:.1f} samples/s) than "
                                                  f"{best.settings.describe()} ({best.samples_per_s:.1f})")
        return self._settle_on_best(why)

    def _settle_on_best(self, why: str) -> Decision:
        """Settle on the tuner's best measured setting, else the given loader if it was measured, else the
        unmeasured hardware start."""
        best = self.tuner.best
        if best is None and self.baseline is not None:
            return Decision("settle", self.given, f"{why}: keeping the loader as given, the one measured "
                                                  f"({self.baseline.median_rate:.1f} samples/s)")
        if best is None:
            return Decision("settle", self.start.settings, f"{why}: the hardware starting point, unmeasured "
                                                          f"({self.start.reason})")
        settings = replace(best.settings, persistent_workers=True)  # respawned workers never pay
        return Decision("settle", settings, f"{why}; settled on {settings.describe()} "
                                            f"({best.samples_per_s:.1f} samples/s)")

    def cost(self, settings: LoaderSettings | None = None) -> float:
        """Seconds the trials took beyond their batches at the speed of ``settings`` (default: the fastest
        measured): what tuning cost, since the trials' batches trained."""
        fastest = self._timing_of(settings) if settings is not None else self._fastest()
        if fastest is None:
            return 0.0
        per_batch = fastest.seconds_per_batch
        return sum(max(t.seconds - (t.warmup_batches + t.batches) * per_batch, 0.0) for t in self.timings)

    def _timing_of(self, settings: LoaderSettings) -> Timing | None:
        plain = replace(settings, persistent_workers=False)
        matching = [t for t in self.timings if replace(t.settings, persistent_workers=False) == plain]
        return max(matching, key=lambda t: t.median_rate) if matching else self._fastest()

    def _fastest(self) -> Timing | None:
        timings = [t for t in self.timings if t is not self._outlier]
        return max(timings, key=lambda t: t.median_rate) if timings else None

    def _over_budget(self, candidate: LoaderSettings, batches_left: int | None) -> str | None:
        """Why the next trial would take tuning past its budget, or None when it fits."""
        fastest = self._fastest()
        if not self.budget or fastest is None or batches_left is None:
            return None
        per_batch = fastest.seconds_per_batch
        left = (batches_left + self.later_batches) * per_batch
        ran = sum(t.seconds for t in self.timings)
        # the start-up to scale is a pool's: the given loader timed again (no workers) has none to go by
        last = next((t for t in reversed(self.timings) if t.settings.num_workers), self.timings[-1])
        start_up = max(last.warmup_seconds - last.warmup_batches * per_batch, 0.0)
        cost = start_up * max(candidate.num_workers, 1) / max(last.settings.num_workers, 1)
        spent = self.cost()
        if spent + cost <= self.budget * (left + ran):
            return None
        return (f"~{cost:.2f} s more would take tuning's cost ({spent:.2f} s so far) past {self.budget:.0%} of this "
                f"run (~{left:.0f} s left at the best speed)")
