"""Loader tuning applied to the running job: ``Trainer(auto_num_workers=True)``.

The decisions are :mod:`adaptrain.tuning.loader_tuning`'s (a starting point from the hardware,
then :class:`~adaptrain.tuning.loader_tuning.LoaderTuner`), driven here by :class:`LoaderSearch`
(a given loader without workers timed first, the budget, settling early); this callback measures
and applies them.

The trials train. Worker settings change how batches are made, not which batches come, so the
first epoch that starts fresh is itself the tuning phase: its batches, in its order, are read by
one candidate setting after another (:class:`~adaptrain.core.loader_live.LiveTrialLoader`), and the
loop trains on each of them as usual. Nothing is discarded or restored; a seeded run is
bit-identical to one never tuned (for a ``__getitem__`` that draws no randomness of its own). Once
the search settles, the rest of that epoch is read with the chosen setting, and from the next epoch
on the train loader is the original rebuilt with it as a
:class:`~adaptrain.core.loader_trials.StableDataLoader` (persistent workers, same sampler and
generator). The val loader gets the same setting, once, before that epoch's validation.

What it costs: what the candidates lose against the chosen setting (each a worker start-up, a slower
one its slower batches), reported as :attr:`LoaderAutotune.seconds`. Measured before this design,
trials on a copy of the data that were then undone cost 5-7% of a 9 s data-bound run. A
compute-bound start settles after one round without starting a worker. A resumed run (or a second
``fit``) re-applies the settings kept in this callback's checkpointed state and does not tune again.

Every change is one printed line (before -> after, why, the samples/s of each trial), an entry of
``history.adaptations`` (when the history has that list) and ``loader_*`` metrics for the loggers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from adaptrain.core.callback import Callback
from adaptrain.core.loader_live import LiveTrialLoader, live_trial_loader
from adaptrain.core.loader_trials import StableDataLoader, Timing, hardware_start, rebuildable, stable_loader
from adaptrain.data.loaders import loader_length, loader_settings, shutdown_workers
from adaptrain.errors import ConfigError
from adaptrain.tuning.loader_tuning import (
    Decision,
    LoaderSettings,
    LoaderTuner,
    StartingPoint,
    margin_needed,
    rate_and_error,
)

if TYPE_CHECKING:
    from adaptrain.core.loader_live import _TrialEpoch
    from adaptrain.core.trainer import Trainer

__all__ = ["LoaderAutotune", "LoaderSearch", "StableDataLoader"]


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


class LoaderAutotune(Callback):
    """Tunes the train loader's ``num_workers`` / ``prefetch_factor`` during the first epoch and applies them.

    Added by ``Trainer(auto_num_workers=True)``; pass an instance in ``callbacks`` instead to change
    its options. Changes training only through the loaders it rebuilds (same batches, same order).

    Args:
        max_trials: settings tried after the starting point, at most (each costs a worker start-up).
        rounds: timed rounds per trial (a round: one batch per worker, at least 2); more rounds, a
            steadier measurement over more of the first epoch.
        budget: the most tuning may cost, as a share of the run (its remaining batches at the best
            measured speed, plus what has run): a trial that would pass it is not started, and the
            best setting so far is kept; 0 turns the limit off.
        tune_val: give a DataLoader val loader the train loader's chosen setting too.
        trial_share: each trial after the first times at least this share of the expected run (within a
            quarter of the epoch): longer runs get steadier trials, which cost only a slower setting's
            extra time since they train; 0: exactly ``rounds`` rounds.
        required: a train loader that cannot be tuned is a :class:`~adaptrain.ConfigError` (False: a
            line says tuning is skipped; what ``Trainer(auto=True)`` adds).

    After ``fit``: :attr:`chosen` (the settings), :attr:`timings` (one per trial), :attr:`seconds`
    (what tuning cost: the trials' time beyond their batches at the chosen speed; the chosen
    loader's own pool starts, which a static run pays too, are not counted),
    :attr:`phase_seconds` and :attr:`phase_batches` (the trials' span, all of it trained), :attr:`start`
    (the hardware starting point and its reason).

    Example:
        >>> LoaderAutotune(max_trials=2).state_dict()  # nothing chosen yet: nothing to checkpoint
        {}
    """

    order = -90  # before every other callback's before_fit/before_train: they see the loader the run trains with

    def __init__(self, max_trials: int = 4, rounds: int = 3, budget: float = 0.05, tune_val: bool = True,
                 trial_share: float = 0.01, required: bool = True) -> None:
        for name, value in (("max_trials", max_trials), ("rounds", rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LoaderAutotune({name}=...)", f"is {value!r}; expected an int >= 1.")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
            raise ConfigError("LoaderAutotune(budget=...)", f"is {budget!r}; expected a fraction in [0, 1].")
        if isinstance(trial_share, bool) or not isinstance(trial_share, (int, float)) or not 0 <= trial_share <= 1:
            raise ConfigError("LoaderAutotune(trial_share=...)", f"is {trial_share!r}; expected a fraction in [0, 1].")
        self.max_trials, self.rounds, self.budget, self.tune_val = max_trials, rounds, float(budget), bool(tune_val)
        self.required, self.trial_share = bool(required), float(trial_share)
        self.chosen: LoaderSettings | None = None
        self.val_chosen: LoaderSettings | None = None
        self.start: StartingPoint | None = None
        self.search: LoaderSearch | None = None
        self.seconds = self.phase_seconds = 0.0
        self.phase_batches = 0
        self._pending = False  # tune at the next epoch that starts fresh
        self._original: Any = None  # the train loader as given, while tuning
        self._replacement: Any = None  # the loader the run trains with once tuned

    @property
    def timings(self) -> list[Timing]:
        """One per trial (the given loader's first when it was timed)."""
        return self.search.timings if self.search is not None else []

    @property
    def tuner(self) -> LoaderTuner | None:
        return self.search.tuner if self.search is not None else None

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        if self.chosen is None:
            return {}
        return {"train": self.chosen.as_dict(), "val": self.val_chosen.as_dict() if self.val_chosen else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("train"):
            self.chosen = LoaderSettings.from_dict(state["train"])
        self.val_chosen = LoaderSettings.from_dict(state["val"]) if state.get("val") else None

    # ------------------------------------------------------------------ the events
    def check(self, trainer: Trainer) -> None:
        """Raise :class:`~adaptrain.ConfigError` when the train loader cannot be tuned (call it before any work)."""
        problem = rebuildable(trainer.state.train_loader)
        if problem is not None:
            raise ConfigError("auto_num_workers", f"is true, but the train loader is {problem}; pass a "
                              "torch.utils.data.DataLoader over a map-style data set (one with __getitem__ and "
                              "__len__), or set auto_num_workers to false and choose num_workers yourself.")

    def before_fit(self, trainer: Trainer) -> None:
        self._pending = False
        if trainer.autotune.applied:  # Trainer(auto=True) measured the workers with everything else
            return
        problem = rebuildable(trainer.state.train_loader)
        if problem is not None and not self.required:
            trainer.print(f"adaptrain: loader tuning skipped: the train loader is {problem}")
            return
        self.check(trainer)
        state = trainer.state
        if self.chosen is not None:  # a resumed run, or fit() again: the run's settings, not a new search
            self._apply(trainer, self.chosen, self.val_chosen)
            trainer.print(f"adaptrain: train loader {self.chosen.describe()} (chosen earlier in this run; "
                          "not tuned again)")
            self._log(trainer)
        elif trainer.limit_batches:
            trainer.print("adaptrain: loader tuning skipped (fast_dev_run)")
        elif trainer.strategy is not None:
            before = LoaderSettings.from_dict(loader_settings(state.train_loader))
            decision = self._ranks_start(trainer)
            val_before = self._apply(trainer, decision.settings, decision.settings if self.tune_val else None)
            self._record(trainer, before, decision, val_before)
        else:
            self._pending = True

    def before_train(self, trainer: Trainer) -> None:
        """The first epoch that starts fresh (a resumed half epoch replays its batches first) is the tuning phase."""
        state = trainer.state
        if not self._pending or state.mid_epoch:
            return
        self._pending = False
        loader = self._original = state.train_loader
        self.start = hardware_start(trainer, loader)
        later = (state.max_epochs - state.epoch - 1) * (loader_length(loader) or 0)
        self.search = LoaderSearch(LoaderSettings.from_dict(loader_settings(loader)), self.start,
                                   LoaderTuner(self.start.settings, self.start.max_workers, max_trials=self.max_trials),
                                   self.rounds, self.budget, later_batches=later, trial_share=self.trial_share)
        trainer.replace_train_loader(live_trial_loader(loader, self.search,
                                                       lambda decision, epoch: self._settled(trainer, decision, epoch),
                                                       trainer.device))

    def after_train(self, trainer: Trainer) -> None:
        """The tuning epoch's train phase is over: its trial loaders stop. A phase cancelled before the
        search settled leaves no half-tuned loader: the given one is back, and the next fresh epoch tunes."""
        state, live = trainer.state, trainer.state.train_loader
        if not isinstance(live, LiveTrialLoader) or live.epoch is None:
            return
        live.epoch._shutdown_workers()  # a cancelled phase leaves them mid-epoch; after a full one, a no-op
        if not live.settled:
            trainer.replace_train_loader(self._original)
            self._pending = state.epoch + 1 < state.max_epochs
            trainer.print("adaptrain: loader tuning interrupted (the epoch's train phase was cancelled); "
                          + ("tuning again in the next epoch" if self._pending else "the loader as given"))

    def after_fit(self, trainer: Trainer) -> None:
        self._finish(trainer)
        self._stop_workers(trainer)

    def exception(self, trainer: Trainer) -> None:
        self._finish(trainer)
        self._stop_workers(trainer)

    def _finish(self, trainer: Trainer) -> None:
        """After ``fit``: the chosen loader in place (a run that ended with the tuning epoch had it waiting for
        the next epoch), or, when ``fit`` stopped before the search settled, the loader as given."""
        state = trainer.state
        if self._replacement is not None and state.next_train_loader is self._replacement:
            trainer.replace_train_loader(self._replacement)
        elif isinstance(state.train_loader, LiveTrialLoader) and self._original is not None:
            if state.train_loader.epoch is not None:
                state.train_loader.epoch._shutdown_workers()
            trainer.replace_train_loader(self._original)
        self._original = self._replacement = None

    def _stop_workers(self, trainer: Trainer) -> None:
        """End the persistent workers of the loaders this callback built, now that ``fit`` is over.

        Left alive, they outlive ``fit`` until the loader is collected, and with the signal handler
        (whose workers ignore SIGTERM) interpreter exit waits on them for good: measured, a script
        with ModelCheckpoint and a persistent loader never exited. A later ``fit`` starts them again.
        """
        for loader in (trainer.state.train_loader, trainer.state.next_train_loader, trainer.state.val_loader):
            if isinstance(loader, StableDataLoader) and loader._iterator is not None:
                shutdown_workers(loader._iterator)
                loader._iterator = None

    # ------------------------------------------------------------------ deciding
    def _ranks_start(self, trainer: Trainer) -> Decision:
        """Several ranks: the hardware starting point (this node's cores divided among its ranks), no
        trials. Ranks timing different candidates (their measurements differ) would settle on different
        settings, and a rank that rebuilt its loader mid-epoch would fall out of step with the others."""
        self.start = hardware_start(trainer, trainer.state.train_loader)
        return Decision("settle", self.start.settings, "several ranks: the hardware starting point (cores "
                        "divided among the node's ranks), not timed: trials on each rank would desynchronise")

    def _settled(self, trainer: Trainer, decision: Decision, epoch: _TrialEpoch) -> None:
        """The live search settled (mid-epoch): the next epochs' loader, the val loader now, the record."""
        assert self.search is not None
        self.seconds = self.search.cost(decision.settings)
        self.phase_seconds, self.phase_batches = epoch.seconds, epoch.batches_trained
        given = self.search.given
        chosen = decision.settings
        # Another callback's loader already waiting for the next epoch (a new batch size) is the one rebuilt.
        pending = trainer.state.next_train_loader
        base = pending if pending is not None and rebuildable(pending) is None else self._original
        # The given loader itself only when it has no workers: a persistent one needs StableDataLoader's draw.
        keep = base is self._original and chosen == given and given.num_workers == 0
        self._replacement = base if keep else stable_loader(base, **chosen.as_dict())
        trainer.replace_train_loader(self._replacement)  # mid-epoch: from the next epoch on
        # The given loader kept: so is the val loader (its own workers, if any, are the user's choice).
        val_before = self._apply_val(trainer, chosen if self.tune_val and chosen != given else None)
        self.chosen = chosen
        self._record(trainer, given, decision, val_before)

    # ------------------------------------------------------------------ applying and recording
    def _apply(self, trainer: Trainer, train: LoaderSettings, val: LoaderSettings | None) -> LoaderSettings | None:
        """Rebuild the train loader now (and the val loader, with ``val``); returns the val loader's settings before."""
        trainer.replace_train_loader(stable_loader(trainer.state.train_loader, **train.as_dict()))
        self.chosen = train
        return self._apply_val(trainer, val)

    def _apply_val(self, trainer: Trainer, val: LoaderSettings | None) -> LoaderSettings | None:
        state = trainer.state
        val_loader = state.val_loader
        if val is None or val_loader is None or rebuildable(val_loader) is not None:
            return None
        val_before = LoaderSettings.from_dict(loader_settings(val_loader))
        state.val_loader = stable_loader(val_loader, **val.as_dict())
        self.val_chosen = val
        return val_before

    def _record(self, trainer: Trainer, before: LoaderSettings, decision: Decision,
                val_before: LoaderSettings | None) -> None:
        after = decision.settings
        trials = ", ".join(f"{t.settings.describe().split(' (')[0]}: {t.median_rate:.1f}" for t in self.timings)
        change = f"{before.describe()} -> {after.describe()}" if after != before else f"kept {after.describe()}"
        line = f"train loader {change}: {decision.reason}; measured samples/s [{trials or 'none'}]"
        if self.timings:
            line += (f"; tuned over the first {self.phase_batches} batches ({self.phase_seconds:.1f} s, all of them "
                     f"trained), costing ~{self.seconds:.2f} s over the chosen setting's speed")
        if self.val_chosen is not None and val_before is not None and val_before != self.val_chosen:
            line += f"; val loader {val_before.describe()} -> {self.val_chosen.describe()} (the same setting)"
        trainer.print(f"adaptrain: {line}")
        adaptations = getattr(trainer.state.history, "adaptations", None)
        if adaptations is not None and after != before:
            state = trainer.state
            adaptations.append({
                "kind": "loader", "before": before.as_dict(), "after": after.as_dict(), "reason": line,
                "epoch": state.epoch + 1, "step": state.global_step, "seconds": round(self.seconds, 3),
                "trials": [t.as_dict() for t in self.timings],
                "steps": [d.reason for d in self.tuner.decisions] if self.tuner is not None else [],
                "start": self.start.reason if self.start is not None else None,
                "val_after": self.val_chosen.as_dict() if self.val_chosen is not None else None})
        self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        assert self.chosen is not None
        trainer.log_metrics({"loader_num_workers": self.chosen.num_workers,
                             "loader_prefetch_factor": self.chosen.prefetch_factor or 0,
                             "loader_tuning_seconds": round(self.seconds, 3)})
