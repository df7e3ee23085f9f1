"""Loader trials that train: the first epoch's own batches, read by one candidate setting after another.

Worker settings change how batches are *made*, never which batches come or in what order. So the
trials of :class:`~adaptrain.core.loader_autotune.LoaderAutotune` need not be discarded work:
:class:`LiveTrialLoader` serves the running epoch its own batches, in its own order, first through a
loader with one candidate setting, then through the next one, and the loop trains on every one of
them as it would have. What tuning costs is then only what the candidates lose against the chosen
setting (a worker start-up each, a slower setting's slower batches), not the trials themselves.

How the order is kept: the epoch's indices are drawn once from the run's own sampler, lazily, as
a plain loader draws them (``iter()`` of its sampler, its one base-seed draw, then the sampler's
draws from the first batch on), and
handed out by :class:`_Feed` to the loader of the trial running. A loader replaced mid-epoch (to
try the next setting) takes no more indices, delivers the batches its workers already fetched
(they come next, while the new loader's workers start), then ends its workers. Each trial loader
has a generator of its own, so starting one draws nothing from the run's RNGs. A seeded run is
therefore bit-identical to one that was never tuned (for a ``__getitem__`` that draws no randomness
of its own inside workers, as everywhere else).

Timing: the time spent inside ``__next__`` is data wait, the time between two calls is the loop's
compute, the split the loop itself makes. On CUDA the clock read at the start of ``__next__``
synchronises the device, during timed trials only.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

import psutil
import torch

from adaptrain.core.batching import batch_size_of, unpack_batch
from adaptrain.core.loader_trials import (
    MAX_ROUNDS,
    WORKER_WARNING,
    StableDataLoader,
    Timing,
    TooFewBatches,
    stop_workers_now,
    synced_clock,
    trial_plan,
)
from adaptrain.data.loaders import LoaderSpec, loader_length
from adaptrain.tuning.loader_tuning import Decision, LoaderSettings

if TYPE_CHECKING:
    from adaptrain.core.loader_search import LoaderSearch

__all__ = ["LiveTrialLoader", "live_trial_loader"]

_END = object()


class _Feed:
    """The epoch's indices (batches of them, or single ones), drawn from the run's sampler as needed and
    handed to one trial loader at a time, in order. ``_handed`` holds what loaders took and have not
    delivered yet; loaders deliver in the order they took (an earlier loader's batches first)."""

    def __init__(self, index_sampler: Any) -> None:
        self._source: Iterator[Any] = iter(index_sampler)
        self._handed: deque[Any] = deque()
        self._view = 0  # the view handing out now; an older view (a replaced loader's) hands out nothing

    def view(self) -> _FeedView:
        self._view += 1
        return _FeedView(self, self._view)

    @property
    def in_flight(self) -> int:
        """Items loaders took and have not delivered yet."""
        return len(self._handed)

    def delivered(self) -> Any:
        """A loader delivered the oldest undelivered item; returns it."""
        return self._handed.popleft()

    def next_item(self, view: int) -> Any:
        if view != self._view:
            return _END
        item = next(self._source, _END)
        if item is not _END:
            self._handed.append(item)
        return item


class _FeedView:
    """What one trial loader samples from: the feed, while that loader is the current one."""

    def __init__(self, feed: _Feed, view: int) -> None:
        self.feed, self.number = feed, view

    def __iter__(self) -> Iterator[Any]:
        while (item := self.feed.next_item(self.number)) is not _END:
            yield item


class LiveTrialLoader(StableDataLoader):
    """The run's train loader for one epoch of tuning: its first ``iter()`` runs the trials of
    ``search`` over the epoch's own batches (see the module doc); any later one is a plain
    :class:`~adaptrain.core.loader_trials.StableDataLoader` with the loader's own settings.

    ``on_settled(decision, epoch)`` is called once, when the search settles (at the latest when the
    epoch's batches run out; an epoch cancelled before that never settles: :attr:`settled` says so).
    """

    search: LoaderSearch
    on_settled: Callable[[Decision, _TrialEpoch], None]
    device: torch.device | None
    epoch: _TrialEpoch | None

    def __iter__(self) -> Iterator[Any]:
        if self.epoch is not None:
            return super().__iter__()
        self.epoch = _TrialEpoch(self)
        return self.epoch

    @property
    def settled(self) -> bool:
        return self.epoch is not None and self.epoch.settled is not None


def live_trial_loader(loader: Any, search: LoaderSearch, on_settled: Callable[[Decision, _TrialEpoch], None],
                      device: torch.device | None = None) -> LiveTrialLoader:
    """``loader`` rebuilt as it is (same dataset, sampler, generator, collate, settings) as a :class:`LiveTrialLoader`.

    ``device``: synchronise this CUDA device at the trials' clock reads (None: no synchronisation).
    """
    live = LoaderSpec.from_loader(loader).build()
    live.__class__ = LiveTrialLoader  # as stable_loader does: a fresh DataLoader, one overridden method
    live.search, live.on_settled, live.epoch = search, on_settled, None
    live.device = device if device is not None and device.type == "cuda" else None
    return live


class _TrialEpoch:
    """The iterator of a tuning epoch: trial loaders one after another over one :class:`_Feed`."""

    def __init__(self, loader: LiveTrialLoader) -> None:
        self.loader, self.search = loader, loader.search
        # What a fresh DataLoader iterator does, in its order: iter() of its index sampler, then one draw
        # (its workers' base seed) from the loader's generator or the global RNG. The run's RNGs move as in
        # a run never tuned. The draw seeds the trial loaders' own generator, one for all of them, so
        # each trial's workers get seeds of their own.
        self.feed = _Feed(loader._index_sampler)
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())
        self.generator = torch.Generator().manual_seed(base_seed)
        self.batches_left = self.epoch_batches = loader_length(loader)  # not yet delivered (None: no length)
        self.batches_trained = 0
        self.started = time.perf_counter()
        self.settled: Decision | None = None
        self.trial: _Trial | None = None
        self.settings: LoaderSettings | None = None
        self.batches: Iterator[Any] = iter(())
        self.draining: deque[Iterator[Any]] = deque()  # earlier loaders, delivering what they fetched
        try:
            self._start(self.search.first, timed_rounds=self.search.first_rounds)
        except BaseException:
            self._shutdown_workers()  # the loop's own clean-up never sees an iterator that failed to start
            raise

    def __iter__(self) -> _TrialEpoch:
        return self

    def __next__(self) -> Any:
        trial = self.trial
        if trial is not None:
            now = synced_clock(self.loader.device)
            trial.computed(now)
            if trial.done:
                self._decide(trial, now)
        fetch_start = time.perf_counter()
        batch = self._drained_batch()
        drained = batch is not _END
        try:
            if not drained:
                batch = next(self.batches)
        except StopIteration:
            if self.settled is None:  # the epoch ended mid-trial: settle on what was measured
                assert self.settings is not None
                self._settle(self.search.settle_early(f"the epoch ended in the trial of {self.settings.describe()}"))
            raise
        item = self.feed.delivered()
        if self.batches_left is not None:
            self.batches_left -= 1
        self.batches_trained += 1
        if self.trial is not None and drained:
            self.trial.drained += 1
        elif self.trial is not None:
            self.trial.fetched(fetch_start, time.perf_counter(), self._samples(item, batch))
        return batch

    def _samples(self, indices: Any, batch: Any) -> int:
        if self.loader._auto_collation:
            return len(indices)
        try:  # batch_size=None: the data set yields whole batches
            return batch_size_of(*unpack_batch(batch, "train_loader"))
        except Exception:  # noqa: BLE001 - a structure the loop itself will name; here it only weighs a rate
            return 1

    def _drained_batch(self) -> Any:
        """The next batch an earlier loader had fetched, else ``_END``: they come first, in order."""
        while self.draining:
            batch = next(self.draining[0], _END)
            if batch is not _END:
                return batch
            self.draining.popleft()  # delivered all it fetched (and stopped its workers itself)
        return _END

    @property
    def seconds(self) -> float:
        """Wall time since the epoch's first trial started (training included)."""
        return time.perf_counter() - self.started

    @property
    def untaken(self) -> int | None:
        """The epoch's batches no loader has taken yet (None: unknown)."""
        return None if self.batches_left is None else self.batches_left - self.feed.in_flight

    # ------------------------------------------------------------------ trials
    def _plan(self, settings: LoaderSettings, rounds: int) -> tuple[int, int, int]:
        """(warm-up, batches a round, rounds) over the batches not taken yet; :class:`TooFewBatches` if too few.

        After a switch the new loader's workers start while the replaced loader's batches are trained,
        and stock up to ``num_workers x prefetch_factor`` batches ahead. Its warm-up then covers that
        stock: timed rounds served from it would make a data-bound setting look faster than it is.
        """
        stock = settings.num_workers * (settings.prefetch_factor or 2) if self.feed.in_flight else 0
        per_round = max(settings.num_workers, 2)
        extra = max(stock - per_round, 0) if settings.num_workers else 0
        untaken = self.untaken
        warmup, per_round, rounds = trial_plan(settings, None if untaken is None else untaken - extra, rounds)
        return warmup + extra, per_round, rounds

    def _decide(self, trial: _Trial, now: float) -> None:
        timing = trial.finish(now)
        decision = self.search.observe(timing, self.batches_left)
        if not decision.settled:
            try:
                self._plan(decision.settings, self.search.rounds)
            except TooFewBatches:
                decision = self.search.settle_early(f"{decision.reason.rsplit('; trying', 1)[0]}; "
                                                    f"{self._too_few(decision.settings)}")
        if decision.settled:
            self._settle(decision)
        else:
            self._start(decision.settings, timed_rounds=self.search.rounds)

    def _start(self, settings: LoaderSettings, timed_rounds: int | None) -> None:
        """Start a trial loader with ``settings``, timed over ``timed_rounds`` rounds (None: the settled
        setting, not timed). The current loader is sampled no more; it delivers the batches its workers
        already fetched (they come next, before this trial's warm-up), then ends its workers. Killing
        them instead would throw their work away. The trial's clock starts at the switch: what the
        switch costs is the trial's."""
        started = time.perf_counter()
        plan = None
        if timed_rounds is not None:
            try:
                plan = self._plan(settings, timed_rounds)
            except TooFewBatches:
                self._settle(self.search.settle_early(self._too_few(settings)))
                return
        self.draining.append(self.batches)
        self.settings = settings
        spec = LoaderSpec.from_loader(self.loader)
        if self.loader._auto_collation:
            spec = dataclasses.replace(spec, batch_size=None, sampler=None, drop_last=False,
                                       batch_sampler=self.feed.view())
        else:
            spec = dataclasses.replace(spec, sampler=self.feed.view())
        extra = {k: v for k, v in spec.extra.items() if k != "in_order"}  # the feed needs batches in order
        spec = dataclasses.replace(spec, generator=self.generator, extra=extra)
        with warnings.catch_warnings():  # more workers than cores: the tuner measures whether it pays
            warnings.filterwarnings("ignore", message=WORKER_WARNING, category=UserWarning)
            self.batches = iter(spec.build(**{**settings.as_dict(), "persistent_workers": False}))
        if plan is not None:
            warmup, per_round, _ = plan
            self.trial = _Trial(settings, plan, started, self.search.min_trial_seconds(self.batches_left),
                                most=self._most_rounds(warmup, per_round))
        else:
            self.trial = None

    def _most_rounds(self, warmup: int, per_round: int) -> int:
        """Rounds a trial may extend to: within :data:`MAX_ROUNDS`, a quarter of the epoch, and what is left."""
        if self.batches_left is None or self.epoch_batches is None:
            return 0  # no length: the planned rounds only
        room = min(self.epoch_batches // 4, self.untaken or 0) - warmup
        return min(MAX_ROUNDS, room // per_round)

    def _too_few(self, settings: LoaderSettings) -> str:
        return f"the {self.untaken} batches left in the epoch are too few to time {settings.describe()}"

    def _settle(self, decision: Decision) -> None:
        """Apply the settling ``decision``: the rest of the epoch is read with its settings, unless so little
        is left that a new pool would cost more than it could bring (the current loader reads it)."""
        self.settled, self.trial = decision, None
        untaken = self.untaken
        few = untaken is not None and untaken < 2 * max(decision.settings.num_workers, 1)
        changed = _without_persistence(decision.settings) != _without_persistence(self.settings)
        if self.settings is None or (changed and not few):
            self._start(decision.settings, timed_rounds=None)
        self.loader.on_settled(decision, self)

    def _shutdown_workers(self) -> None:
        """Stop every trial loader's workers now (the loop calls it on an exception, the callback after a
        cancelled epoch)."""
        for batches in (*self.draining, self.batches):
            stop_workers_now(batches)
        self.draining.clear()


def _without_persistence(settings: LoaderSettings | None) -> LoaderSettings | None:
    return dataclasses.replace(settings, persistent_workers=False) if settings is not None else None


class _Trial:
    """The clock of one trial: a warm-up (worker start-up), then ``rounds`` timed rounds of ``per_round``
    batches each, as in :func:`~adaptrain.core.loader_trials.time_trial`, and more rounds (``most`` in
    all) until the timed part lasts ``min_seconds``.

    Example (a clock driven by hand: fetched at t, trained until t + 1):
        >>> trial = _Trial(LoaderSettings(0), (1, 2, 1), started=0.0, min_seconds=3.5, most=3)
        >>> for t in range(0, 20, 2):
        ...     trial.fetched(t, t, 8); trial.computed(t + 1)
        ...     if trial.done: break
        >>> len(trial.timing.rates), trial.timing.batches, trial.timing.compute_time  # 2 rounds: 4 s >= 3.5 s
        (2, 4, 4.0)
    """

    def __init__(self, settings: LoaderSettings, plan: tuple[int, int, int], started: float,
                 min_seconds: float = 0.0, most: int | None = None) -> None:
        self.timing = Timing(settings)
        self.warmup, self.per_round, self.rounds = plan
        self.min_seconds, self.most = min_seconds, max(most or self.rounds, self.rounds)
        self.started = started
        self.count = 0
        self.drained = 0  # batches an earlier loader delivered during this trial: untimed, like the warm-up
        self._pending: tuple[float, float, int] | None = None  # (fetch start, fetched, samples) of the last batch
        self._round = [0.0, 0.0, 0]  # data wait, compute, samples of the round under way

    def fetched(self, fetch_start: float, fetched: float, samples: int) -> None:
        self._pending = (fetch_start, fetched, samples)

    def computed(self, end: float) -> None:
        """The batch last fetched was trained until ``end``."""
        if self._pending is None:
            return
        fetch_start, fetched, samples = self._pending
        self._pending = None
        self.count += 1
        timing = self.timing
        if self.count <= self.warmup:
            if self.count == self.warmup:
                timing.warmup_seconds, timing.warmup_batches = end - self.started, self.warmup + self.drained
            return
        data, compute, counted = self._round
        self._round = [data + fetched - fetch_start, compute + end - fetched, counted + samples]
        if (self.count - self.warmup) % self.per_round == 0:
            timing.add_round(*self._round, self.per_round)
            self._round = [0.0, 0.0, 0]

    @property
    def done(self) -> bool:
        rounds, timing = len(self.timing.rates), self.timing
        return rounds >= self.rounds and (timing.data_time + timing.compute_time >= self.min_seconds
                                          or rounds >= self.most)

    def finish(self, now: float) -> Timing:
        self.timing.seconds = now - self.started
        self.timing.ram_fraction = psutil.virtual_memory().percent / 100  # with this trial's workers alive
        return self.timing

