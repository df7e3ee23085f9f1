"""Loader tuning applied to the running job: ``Trainer(auto_num_workers=True)``.

The decisions are :mod:`adaptrain.tuning.loader_tuning`'s (a starting point from the hardware,
then :class:`~adaptrain.tuning.loader_tuning.LoaderTuner`); this callback measures and applies them.

At ``before_fit`` (the batch size is final by then) it runs a short tuning phase that trains
nothing: the state is snapshotted, each candidate setting is timed on real training steps over a
measurement loader (same data set, collate and worker setup, sequential order, its own generator:
:func:`~adaptrain.core.loader_trials.time_trial`), and the snapshot is restored, so weights,
optimizer, scheduler, every RNG and the counters are exactly as before. The chosen settings then
rebuild the train loader (same dataset, sampler and generator) as a
:class:`~adaptrain.core.loader_trials.StableDataLoader`, so a seeded run yields the same batches
and the same numbers whatever the worker count (for a ``__getitem__`` that draws no randomness of
its own: randomness inside workers is seeded per worker by torch, whatever this callback does).
The val loader gets the same setting, once.

What it costs: the tuning seconds (each trial starts its workers and times ``rounds`` rounds of
one batch per worker after a warm-up round), paid once per run and reported. A compute-bound
start settles after one trial, on a setting that costs nothing later: workers are persistent, never
respawned each epoch. A resumed run (or a second ``fit``) re-applies the settings kept in this
callback's checkpointed state and does not tune again.

Every change is one printed line (before -> after, why, the samples/s of each trial), an entry of
``history.adaptations`` (when the history has that list) and ``loader_*`` metrics for the loggers.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from adaptrain.core.callback import Callback
from adaptrain.core.loader_trials import (
    StableDataLoader,
    Timing,
    TooFewBatches,
    hardware_start,
    rebuildable,
    stable_loader,
    time_trial,
)
from adaptrain.data.loaders import loader_length, loader_settings, shutdown_workers
from adaptrain.errors import ConfigError
from adaptrain.tuning.loader_tuning import Decision, LoaderSettings, LoaderTuner, StartingPoint

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["LoaderAutotune", "StableDataLoader"]


class LoaderAutotune(Callback):
    """Tunes the train loader's ``num_workers`` / ``prefetch_factor`` at the start of ``fit`` and applies them.

    Added by ``Trainer(auto_num_workers=True)``; pass an instance in ``callbacks`` instead to change
    its options. Changes training only through the loaders it rebuilds (same batches, same order).

    Args:
        max_trials: settings tried after the starting point, at most (each costs a worker start-up
            and ``rounds`` + 1 rounds of steps).
        rounds: timed rounds per trial (a round: one batch per worker, at least 2); more rounds, a
            steadier measurement, a longer tuning phase.
        budget: the most tuning may take, as a share of the run (its remaining batches at the best
            measured speed, plus the tuning): a trial that would pass it is not run, and the best
            setting so far is kept. Tuning pays back only over a long enough run; 0 turns the limit off.
            Only a data-bound loop spends past its first trial (a compute-bound one settles there), and
            there more workers usually pay, so 5% is a bet that pays on most data-bound runs.
        tune_val: give a DataLoader val loader the train loader's chosen setting too.

    After ``fit``: :attr:`chosen` (the settings), :attr:`timings` (one per trial), :attr:`seconds`
    (the tuning phase's wall time), :attr:`start` (the hardware starting point and its reason).

    Example:
        >>> LoaderAutotune(max_trials=2).state_dict()  # nothing chosen yet: nothing to checkpoint
        {}
    """

    order = -90  # before every other callback's before_fit: they see the loader the run trains with

    def __init__(self, max_trials: int = 4, rounds: int = 3, budget: float = 0.05, tune_val: bool = True) -> None:
        for name, value in (("max_trials", max_trials), ("rounds", rounds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"LoaderAutotune({name}=...)", f"is {value!r}; expected an int >= 1.")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
            raise ConfigError("LoaderAutotune(budget=...)", f"is {budget!r}; expected a fraction in [0, 1].")
        self.max_trials, self.rounds, self.budget, self.tune_val = max_trials, rounds, float(budget), bool(tune_val)
        self.chosen: LoaderSettings | None = None
        self.val_chosen: LoaderSettings | None = None
        self.start: StartingPoint | None = None
        self.tuner: LoaderTuner | None = None
        self.timings: list[Timing] = []
        self._baseline: Timing | None = None  # the loader as given, timed before the search
        self.seconds = 0.0

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        if self.chosen is None:
            return {}
        return {"train": self.chosen.as_dict(), "val": self.val_chosen.as_dict() if self.val_chosen else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("train"):
            self.chosen = LoaderSettings.from_dict(state["train"])
        self.val_chosen = LoaderSettings.from_dict(state["val"]) if state.get("val") else None

    # ------------------------------------------------------------------ the event
    def check(self, trainer: Trainer) -> None:
        """Raise :class:`~adaptrain.ConfigError` when the train loader cannot be tuned (call it before any work)."""
        problem = rebuildable(trainer.state.train_loader)
        if problem is not None:
            raise ConfigError("auto_num_workers", f"is true, but the train loader is {problem}; pass a "
                              "torch.utils.data.DataLoader over a map-style data set (one with __getitem__ and "
                              "__len__), or set auto_num_workers to false and choose num_workers yourself.")

    def before_fit(self, trainer: Trainer) -> None:
        if trainer.autotune.applied:  # Trainer(auto=True) measured the workers with everything else
            return
        self.check(trainer)
        state = trainer.state
        before = LoaderSettings.from_dict(loader_settings(state.train_loader))
        if self.chosen is not None:  # a resumed run, or fit() again: the run's settings, not a new search
            self._apply(trainer, self.chosen, self.val_chosen)
            trainer.print(f"adaptrain: train loader {self.chosen.describe()} (chosen earlier in this run; "
                          "not tuned again)")
            self._log(trainer)
            return
        if trainer.limit_batches:
            trainer.print("adaptrain: loader tuning skipped (fast_dev_run)")
            return
        started = time.perf_counter()
        decision = self.tune(trainer) if trainer.strategy is None else self._ranks_start(trainer)
        val_before = self._apply(trainer, decision.settings, decision.settings if self.tune_val else None)
        self.seconds = time.perf_counter() - started
        self._record(trainer, before, decision, val_before)

    def after_fit(self, trainer: Trainer) -> None:
        self._stop_workers(trainer)

    def exception(self, trainer: Trainer) -> None:
        self._stop_workers(trainer)

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

    # ------------------------------------------------------------------ tuning
    def _ranks_start(self, trainer: Trainer) -> Decision:
        """Several ranks: the hardware starting point (this node's cores divided among its ranks), no
        trials. Each trial step goes through DDP's collectives, and ranks timing different candidates
        (their measurements differ) would wait on each other for good."""
        self.start = hardware_start(trainer, trainer.state.train_loader)
        return Decision("settle", self.start.settings, "several ranks: the hardware starting point (cores "
                        "divided among the node's ranks), not timed: trials on each rank would desynchronise")

    def tune(self, trainer: Trainer) -> Decision:
        """Time the tuner's candidates on real, undone steps; returns the settling decision (nothing applied).

        A loader given with ``num_workers=0`` is timed first as it is, over one round (no worker to
        start: 3 steps). Compute-bound there, it is kept: workers cannot pay and would cost start-up,
        batch transfers and RAM (measured on 2 cores with in-memory tensors: 2 workers 0.80x of none).
        Data-bound, the tuner searches from the hardware start. The given loader is not a baseline
        the search must beat: measured, a burst of other load during its round made a data-bound run
        keep no workers at 0.54x of the best static; more workers than needed cost far less.
        """
        state = trainer.state
        loader = state.train_loader
        self.start = hardware_start(trainer, loader)
        self.tuner = LoaderTuner(self.start.settings, self.start.max_workers, max_trials=self.max_trials)
        self.timings, self._baseline = [], None
        given = LoaderSettings.from_dict(loader_settings(loader))
        started = time.perf_counter()
        saved = _snapshot(state)
        try:
            if given.num_workers == 0 and given != self.start.settings:
                try:
                    baseline = time_trial(trainer, loader, given, rounds=1)
                except TooFewBatches as short:
                    return self._settle_early(self.tuner, str(short))
                self.timings.append(baseline)
                self._baseline = baseline
                share = baseline.data_time / max(baseline.data_time + baseline.compute_time, 1e-12)
                if share < self.tuner.data_bound_share:
                    return Decision("settle", given, (
                        f"compute-bound as given (data wait {share:.0%} of step time at "
                        f"{baseline.median_rate:.1f} samples/s, under {self.tuner.data_bound_share:.0%}): "
                        "workers cannot pay and would cost start-up, transfers and RAM"))
            return self._search(trainer, loader, started)
        finally:
            state.restore(saved)
            state.batch = state.outputs = state.loss = None  # the last trial's tensors: free them now
            state.unpacked = (None, None, None)

    def _search(self, trainer: Trainer, loader: Any, started: float) -> Decision:
        tuner = self.tuner
        assert tuner is not None and self.start is not None
        settings = self.start.settings
        while True:
            try:
                timing = time_trial(trainer, loader, settings, self.rounds)
            except TooFewBatches as short:
                return self._settle_early(tuner, str(short))
            self.timings.append(timing)
            decision = tuner.observe(settings, timing.data_time, timing.compute_time, timing.rates,
                                     timing.ram_fraction)
            if decision.settled:
                return decision
            settings = decision.settings
            over = self._over_budget(trainer, settings, time.perf_counter() - started)
            if over:
                return self._settle_early(tuner, f"{decision.reason.rsplit('; trying', 1)[0]}; not trying "
                                                 f"{settings.describe()}: {over}")

    def _over_budget(self, trainer: Trainer, candidate: LoaderSettings, spent: float) -> str | None:
        """Why the next trial would take tuning past its budget, or None when it fits."""
        state, best = trainer.state, self.tuner.best if self.tuner is not None else None
        batches = loader_length(state.train_loader)
        if not self.budget or best is None or batches is None:
            return None
        fastest = next(t for t in self.timings if t.settings == best.settings)
        left = max((state.max_epochs - state.epoch) * batches - state.batch_idx, 0) * fastest.seconds_per_batch
        last = self.timings[-1]  # a trial's cost grows with its rounds, one batch per worker
        cost = last.seconds * max(candidate.num_workers, 2) / max(last.settings.num_workers, 2)
        if spent + cost <= self.budget * (left + spent):
            return None
        return (f"~{cost:.1f} s more would take tuning ({spent:.1f} s so far) past {self.budget:.0%} of this run "
                f"(~{left:.0f} s left at the best speed)")

    def _settle_early(self, tuner: LoaderTuner, why: str) -> Decision:
        """Settle before the tuner does: on its best measured setting, else the given loader if it was
        measured, else the unmeasured hardware start."""
        best = tuner.best
        if best is None and self._baseline is not None:
            return Decision("settle", self._baseline.settings, f"{why}: keeping the loader as given, the one measured "
                                                               f"({self._baseline.median_rate:.1f} samples/s)")
        if best is None:
            assert self.start is not None
            return Decision("settle", self.start.settings, f"{why}: the hardware starting point, unmeasured "
                                                          f"({self.start.reason})")
        settings = replace(best.settings, persistent_workers=True)  # respawned workers never pay
        return Decision("settle", settings, f"{why}; settled on {settings.describe()} "
                                            f"({best.samples_per_s:.1f} samples/s)")

    # ------------------------------------------------------------------ applying and recording
    def _apply(self, trainer: Trainer, train: LoaderSettings, val: LoaderSettings | None) -> LoaderSettings | None:
        """Rebuild the train loader (and the val loader, with ``val``); returns the val loader's settings before."""
        state = trainer.state
        trainer.replace_train_loader(stable_loader(state.train_loader, **train.as_dict()))
        self.chosen = train
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
        line = (f"train loader {change}: {decision.reason}; measured samples/s [{trials or 'none'}]; "
                f"{self.seconds:.1f} s of tuning")
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


def _snapshot(state: Any) -> dict[str, Any]:
    """``state.snapshot()``, kept on the CPU where the state supports it (no device memory for the copy)."""
    if "device" in inspect.signature(state.snapshot).parameters:
        return state.snapshot(device="cpu")
    return state.snapshot()
