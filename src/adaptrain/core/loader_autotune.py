"""Loader tuning applied to the running job: ``Trainer(auto_num_workers=True)``.

The decisions are :mod:`adaptrain.tuning.loader_tuning`'s (a starting point from the hardware,
then :class:`~adaptrain.tuning.loader_tuning.LoaderTuner`), driven by
:class:`~adaptrain.core.loader_search.LoaderSearch`
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

from typing import TYPE_CHECKING, Any

from adaptrain.core.callback import Callback
from adaptrain.core.loader_live import LiveTrialLoader, live_trial_loader
from adaptrain.core.loader_search import LoaderSearch
from adaptrain.core.loader_trials import StableDataLoader, Timing, hardware_start, rebuildable, stable_loader
from adaptrain.data.loaders import loader_length, loader_settings, shutdown_workers
from adaptrain.errors import ConfigError
from adaptrain.tuning.loader_tuning import (
    Decision,
    LoaderSettings,
    LoaderTuner,
    StartingPoint,
)

if TYPE_CHECKING:
    from adaptrain.core.loader_live import _TrialEpoch
    from adaptrain.core.trainer import Trainer

__all__ = ["LoaderAutotune", "LoaderSearch", "StableDataLoader"]


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
