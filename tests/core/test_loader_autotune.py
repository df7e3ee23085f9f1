"""Trainer(auto_num_workers=True): the live tuning epoch, the rebuilt loaders, reproducibility, records, resume.

The tuner's decisions depend on measured speed, so tests that assert a decision feed it fixed
timings (the search's ``observe`` is given numbers from a table, the trial's batches stay real);
tests of what holds whatever the machine measures (same batches, same weights and RNGs as a run
never tuned) use real trials too. Worker processes are slow to start on 2 cores: epochs are short.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from adaptrain import Callback, ConfigError, ModelCheckpoint, Trainer
from adaptrain.core import loader_autotune
from adaptrain.core.events import CancelTrainException
from adaptrain.core.history import History
from adaptrain.core.loader_autotune import LoaderAutotune
from adaptrain.core.loader_trials import (
    MEASURE_PASSES,
    RepeatedOrder,
    StableDataLoader,
    Timing,
    TooFewBatches,
    time_trial,
    trial_plan,
)
from adaptrain.tuning.loader_tuning import LoaderSettings, LoaderTuner, StartingPoint
from tests.common import data

HAS_ADAPTATIONS = hasattr(History(), "adaptations")


def dropout_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # dropout draws from the global RNG: any extra draw changes the weights
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def make_trainer(model=None, callbacks=(), **kwargs) -> Trainer:
    model = model or dropout_mlp()
    kwargs.setdefault("progress", False)
    kwargs.setdefault("seed", 0)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
                   callbacks=list(callbacks), **kwargs)


def shuffled(dataset, batch_size: int = 8, **kwargs) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(7),
                      **kwargs)


class Batches(Callback):
    """Records every train batch's inputs, as the loop fetched them."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def before_batch(self, trainer):
        self.seen.append(trainer.state.batch[0].clone())


class Metrics(Callback):
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step):
        self.logged.append(dict(metrics))


def start_at(monkeypatch, workers: int, max_workers: int) -> LoaderSettings:
    """Make the hardware starting point a fixed one (this machine's cores must not decide the test)."""
    settings = LoaderSettings(workers, 2, persistent_workers=True)
    monkeypatch.setattr(loader_autotune, "hardware_start",
                        lambda trainer, loader: StartingPoint(settings, max_workers, f"num_workers={workers}: test"))
    return settings


def fixed_timing(settings: LoaderSettings, rate: float, data_share: float = 0.5, start_up: float = 0.01) -> Timing:
    """A trial of ``settings`` measured at ``rate`` samples/s (3 equal rounds of 16 samples) after ``start_up`` s."""
    elapsed = 48 / rate
    return Timing(settings, data_time=data_share * elapsed, compute_time=(1 - data_share) * elapsed,
                  rates=[rate] * 3, samples=48, batches=6, ram_fraction=0.2, seconds=start_up + elapsed,
                  warmup_seconds=start_up, warmup_batches=0)


def fake_trials(monkeypatch, rate_of, data_share: float = 0.5, start_up: float = 0.01) -> list[LoaderSettings]:
    """Real trial loaders and batches, fixed measurements: the search sees ``rate_of(settings)`` samples/s."""
    asked: list[LoaderSettings] = []

    class FixedSearch(loader_autotune.LoaderSearch):
        def observe(self, timing, batches_left):
            asked.append(timing.settings)
            return super().observe(fixed_timing(timing.settings, rate_of(timing.settings), data_share, start_up),
                                   batches_left)

    monkeypatch.setattr(loader_autotune, "LoaderSearch", FixedSearch)
    return asked


def no_trials(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a tuning epoch was set up")

    monkeypatch.setattr(loader_autotune, "live_trial_loader", refuse)


# ---------------------------------------------------------------- reproducibility (real workers)
def test_tuned_run_with_two_workers_is_bit_identical_to_a_run_without_workers(monkeypatch):
    """Real trials; whatever they measure, the tuner can only pick 2 workers here. 2 epochs and a val
    loader without a generator: persistent workers that skipped an RNG draw would change epoch 2."""
    train_set, val_set = data.classification(96), data.classification(32, seed=1)

    reference_batches = Batches()
    reference = make_trainer(callbacks=[reference_batches], max_epochs=2)
    reference.fit(shuffled(train_set), DataLoader(val_set, batch_size=16, shuffle=True))

    start_at(monkeypatch, workers=2, max_workers=2)
    tuned_batches, tune = Batches(), LoaderAutotune(max_trials=1)
    original = shuffled(train_set, num_workers=1)  # given with workers: no num_workers=0 baseline to keep
    tuned = make_trainer(callbacks=[tuned_batches, tune], max_epochs=2, auto_num_workers=True)
    tuned.fit(original, DataLoader(val_set, batch_size=16, shuffle=True))

    assert tune.timings and tune.timings[0].samples > 0  # real steps were timed
    assert tuned.state.train_loader is not original and isinstance(tuned.state.train_loader, StableDataLoader)
    assert original.num_workers == 1 and tuned.loader_settings["num_workers"] == 2
    assert tuned.loader_settings["persistent_workers"] is True
    assert tuned.state.val_loader.num_workers == 2
    assert len(tuned_batches.seen) == len(reference_batches.seen) == 24
    assert all(torch.equal(a, b) for a, b in zip(tuned_batches.seen, reference_batches.seen))
    for ours, theirs in zip(tuned.model.parameters(), reference.model.parameters()):
        assert torch.equal(ours, theirs)
    assert tuned.state.history["train_loss"] == reference.state.history["train_loss"]
    assert tuned.state.history["val_loss"] == reference.state.history["val_loss"]


def test_stable_loader_with_persistent_workers_draws_like_a_loader_without_workers():
    dataset = TensorDataset(torch.arange(12))

    def orders(loader):
        torch.manual_seed(3)  # no generator: shuffle and base seed draw from the global RNG
        epochs = [[b[0].tolist() for b in loader] for _ in range(3)]
        return epochs, torch.rand(2)

    plain = DataLoader(dataset, batch_size=4, shuffle=True)
    stable = loader_autotune.stable_loader(plain, num_workers=1, persistent_workers=True)
    (plain_epochs, plain_next), (stable_epochs, stable_next) = orders(plain), orders(stable)
    assert stable.persistent_workers and stable.num_workers == 1 and stable.sampler is plain.sampler
    assert stable_epochs == plain_epochs
    assert torch.equal(stable_next, plain_next)


# ---------------------------------------------------------------- the tuning epoch trains the run's own batches
class Snapshot(Callback):
    """Copies what training depends on, at after_fit."""

    def after_fit(self, trainer):
        state = trainer.state
        self.taken = {
            "params": [p.detach().clone() for p in trainer.model.parameters()],
            "optimizer": copy.deepcopy(state.optimizer.state_dict()),
            "scheduler": copy.deepcopy(state.scheduler.state_dict()) if state.scheduler is not None else None,
            "torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].copy(), "python": random.getstate(),
            "counters": state.counters(), "lr": state.lr,
        }


def same(a, b) -> bool:
    """Equal, tensors compared exactly, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def one_cycle(opt, total_steps):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=total_steps)


def test_a_tuning_epoch_that_switches_loaders_trains_exactly_the_batches_of_a_run_never_tuned(monkeypatch):
    """Given no workers, then 1, then 2, then back to 1 (fixed measurements decide, batches are real):
    every switch replaces a loader whose workers had fetched ahead, and their batches must come next,
    once. No generator anywhere: the shuffle and the base-seed draws use the global RNG, which dropout
    uses too, so a draw too many or too few would change the weights."""
    train_set = data.classification(320)

    def fit(tuned: bool):
        batches, snapshot = Batches(), Snapshot()
        callbacks = [batches, snapshot] + ([LoaderAutotune(rounds=1, budget=0, trial_share=0)] if tuned else [])
        trainer = make_trainer(callbacks=callbacks, max_epochs=2, scheduler=one_cycle,
                               auto_num_workers=tuned)
        trainer.fit(DataLoader(train_set, batch_size=8, shuffle=True))
        return trainer, batches.seen, snapshot.taken

    reference, reference_batches, a = fit(tuned=False)
    start_at(monkeypatch, workers=1, max_workers=2)
    rates = {(0, None): 50.0, (1, 2): 100.0, (2, 2): 101.0, (1, 4): 100.5}
    asked = fake_trials(monkeypatch, lambda s: rates[s.num_workers, s.prefetch_factor])
    tuned, tuned_batches, b = fit(tuned=True)

    assert [(s.num_workers, s.prefetch_factor) for s in asked] == [(0, None), (1, 2), (2, 2), (1, 4)]
    assert tuned.loader_settings == {"num_workers": 1, "prefetch_factor": 2, "pin_memory": False,
                                     "persistent_workers": True}
    assert len(tuned_batches) == len(reference_batches) == 80
    assert all(torch.equal(x, y) for x, y in zip(tuned_batches, reference_batches))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert same(a["optimizer"], b["optimizer"]) and a["optimizer"]["state"]  # momentum, equal
    assert a["scheduler"] == b["scheduler"] and a["lr"] == b["lr"]
    assert torch.equal(a["torch"], b["torch"]) and (a["numpy"] == b["numpy"]).all() and a["python"] == b["python"]
    assert a["counters"] == b["counters"]
    assert tuned.state.history["train_loss"] == reference.state.history["train_loss"]


def test_tuning_without_workers_trains_the_first_steps_and_the_run_is_unchanged(monkeypatch):
    """Real measurements (no worker processes): the first epoch's first steps are the trial, and trained."""
    start_at(monkeypatch, workers=0, max_workers=0)
    runs = []
    for callbacks in ([], [LoaderAutotune()]):
        snapshot = Snapshot()
        trainer = make_trainer(callbacks=[snapshot, *callbacks], auto_num_workers=bool(callbacks), max_epochs=1,
                               scheduler=one_cycle)
        trainer.fit(shuffled(data.classification(96)))
        runs.append((trainer, snapshot.taken, callbacks))
    (_, a, _), (tuned, b, (tune,)) = runs
    assert tune.timings and tune.timings[0].batches == 6  # 3 timed rounds of 2 real steps
    assert tune.phase_batches >= 7 and tune.seconds >= 0  # the warm-up batch and the timed ones, all trained
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert same(a["optimizer"], b["optimizer"]) and a["scheduler"] == b["scheduler"]
    assert torch.equal(a["torch"], b["torch"]) and a["counters"] == b["counters"]
    assert tuned.state.train_loader.num_workers == 0


def test_a_trial_times_real_steps_without_touching_the_run_loader():
    trainer = make_trainer()
    loader = shuffled(data.classification(64))
    generator_state = loader.generator.get_state()
    timing = time_trial(trainer, loader, LoaderSettings(0), rounds=3)
    assert timing.batches == 6 and timing.samples == 48 and len(timing.rates) == 3
    assert timing.data_time > 0 and timing.compute_time > 0 and timing.samples_per_s > 0
    assert trainer.state.global_step == 7  # the warm-up step counts too: the caller restores
    assert torch.equal(loader.generator.get_state(), generator_state)


def test_a_trial_that_wants_more_time_than_an_epoch_holds_reads_the_data_set_again_in_order():
    trainer = make_trainer()
    loader = shuffled(data.classification(64))  # 8 batches of 8: one epoch is 1 warm-up + 3 rounds of 2
    timing = time_trial(trainer, loader, LoaderSettings(0), rounds=3, min_seconds=float("inf"))
    most = (8 * MEASURE_PASSES - 1) // 2  # the rounds MEASURE_PASSES epochs hold (no clock decides this)
    assert len(timing.rates) == most and timing.batches == 2 * most > 8 and timing.samples == 16 * most
    assert list(RepeatedOrder(3, passes=2)) == [0, 1, 2, 0, 1, 2]


def test_a_data_set_whose_last_batch_is_short_times_only_the_batches_its_passes_hold():
    trainer = make_trainer()
    loader = DataLoader(data.classification(140), batch_size=16)  # 9 batches a pass, the last of 12 samples
    timing = time_trial(trainer, loader, LoaderSettings(0), rounds=3, min_seconds=float("inf"))
    total = -(-140 * MEASURE_PASSES // 16)  # 70 batches in 8 passes read as one stream, not 9 x 8 = 72
    assert timing.batches == 2 * ((total - 1) // 2)  # no round ran past the end


def test_trial_plan_needs_a_warm_up_round_and_one_timed_round():
    assert trial_plan(LoaderSettings(3), batches=20, rounds=3) == (3, 3, 3)
    assert trial_plan(LoaderSettings(3), batches=8, rounds=3) == (3, 3, 1)
    assert trial_plan(LoaderSettings(0), batches=20, rounds=3) == (1, 2, 3)  # no workers: one warm-up batch
    with pytest.raises(TooFewBatches, match="5 batches is too short to time num_workers=3"):
        trial_plan(LoaderSettings(3), batches=5, rounds=3)


class EagerBatches:
    """A batch sampler that draws its whole order in ``__iter__`` (not lazily), with no ``__len__``."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __iter__(self):
        order = torch.randperm(self.n).tolist()  # the global RNG, at iter() time
        return iter([order[i:i + self.size] for i in range(0, self.n, self.size)])


class WholeBatches(torch.utils.data.Dataset):
    """A data set whose items are whole batches (a loader with ``batch_size=None``)."""

    def __init__(self, batches: int = 12, size: int = 8) -> None:
        data_set = data.classification(batches * size)
        self.items = [(data_set.tensors[0][i * size:(i + 1) * size], data_set.tensors[1][i * size:(i + 1) * size])
                      for i in range(batches)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.mark.parametrize("make_loader", [
    lambda: DataLoader(data.classification(96), batch_sampler=EagerBatches(96, 8)),
    lambda: DataLoader(WholeBatches(), batch_size=None, shuffle=True),
], ids=["eager batch sampler without len", "batch_size=None"])
def test_loaders_of_other_shapes_train_as_a_run_never_tuned(monkeypatch, make_loader):
    """A sampler that draws at iter() (torch calls iter() of the sampler before its base-seed draw) and a
    loader that does not batch: the same batches and RNG state as without tuning, real measurements."""
    start_at(monkeypatch, workers=0, max_workers=0)
    runs = []
    for tuned in (False, True):
        batches, snapshot = Batches(), Snapshot()
        callbacks = [batches, snapshot] + ([LoaderAutotune()] if tuned else [])
        trainer = make_trainer(callbacks=callbacks, max_epochs=2, auto_num_workers=tuned)
        trainer.fit(make_loader())
        runs.append((batches.seen, snapshot.taken, callbacks[2:]))
    (seen_a, a, _), (seen_b, b, tune) = runs
    assert len(seen_a) == len(seen_b) == 24 and all(torch.equal(x, y) for x, y in zip(seen_a, seen_b))
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])) and torch.equal(a["torch"], b["torch"])
    timing = tune[0].timings[0]
    assert timing.samples == 8 * timing.batches  # samples, not batches, also when the data set batches


def test_a_train_phase_cancelled_mid_trial_gives_the_loader_back_and_the_next_epoch_tunes(monkeypatch, capsys):
    start_at(monkeypatch, workers=0, max_workers=0)

    class CancelFirstEpoch(Callback):
        def after_batch(self, trainer):
            if trainer.state.epoch == 0 and trainer.state.batch_idx == 2:  # inside the first trial (7 batches)
                raise CancelTrainException()

    original = shuffled(data.classification(96))
    tune = LoaderAutotune()
    trainer = make_trainer(callbacks=[tune, CancelFirstEpoch()], auto_num_workers=True, max_epochs=2)
    trainer.fit(original)
    out = capsys.readouterr().out
    assert "loader tuning interrupted (the epoch's train phase was cancelled); tuning again in the next epoch" in out
    assert tune.chosen is not None and "kept num_workers=0" in out  # tuned in epoch 2
    assert trainer.state.train_loader is original


# ---------------------------------------------------------------- the search's decisions (pure)
def search_from(given: LoaderSettings, start_workers: int = 2, max_workers: int = 4, **options):
    start = StartingPoint(LoaderSettings(start_workers, 2, persistent_workers=True), max_workers, "test")
    return loader_autotune.LoaderSearch(given, start, LoaderTuner(start.settings, max_workers), **options)


def test_the_search_times_a_given_loader_without_workers_first_and_keeps_it_when_compute_bound():
    search = search_from(LoaderSettings(0))
    assert search.first == LoaderSettings(0) and search.first_rounds == 1
    decision = search.observe(fixed_timing(LoaderSettings(0), 100.0, data_share=0.02), batches_left=50)
    assert decision.settled and decision.settings == LoaderSettings(0)
    assert decision.reason.startswith("compute-bound as given (data wait 2% of step time")


def test_the_search_starts_at_the_hardware_start_when_the_loader_comes_with_workers():
    search = search_from(LoaderSettings(1, 2))
    assert search.first == search.start.settings and search.first_rounds == 3


def run_search(search, rates: dict, given_rates: list[float]) -> tuple:
    """Feed ``search`` fixed measurements until it settles: worker settings at ``rates[workers, prefetch]``,
    the given loader (no workers) at the next of ``given_rates`` each time it is timed."""
    given = iter(given_rates)
    decision = search.observe(fixed_timing(LoaderSettings(0), next(given)), batches_left=100)
    while not decision.settled:
        settings = decision.settings
        rate = next(given) if settings.num_workers == 0 else rates[settings.num_workers, settings.prefetch_factor]
        decision = search.observe(fixed_timing(settings, rate), 100)
    return decision, [(t.settings.num_workers, t.settings.prefetch_factor) for t in search.timings]


def test_a_given_loader_that_measures_faster_than_the_workers_twice_is_kept():
    """A loop that only looks data-bound (in-memory data, indexing 10-15% of the step) ran 0.3-0.7x as fast
    with workers: the given loader, ahead of the first worker trial by more than the margin, is timed
    again at once, and kept when the second reading agrees."""
    rates = {(2, 2): 100.0, (4, 2): 120.0, (4, 4): 121.0}
    decision, timed = run_search(search_from(LoaderSettings(0), budget=0), rates, given_rates=[150.0, 148.0])
    assert decision.settings == LoaderSettings(0) and timed == [(0, None), (2, 2), (0, None)]
    assert "timed again: 148.0 samples/s against num_workers=2, prefetch_factor=2 (persistent)'s 100.0" \
        in decision.reason and decision.reason.endswith("keeping the loader as given (more workers did not pay)")


def test_a_given_loaders_fast_round_that_does_not_repeat_lets_the_search_go_on():
    """One round without workers is a rough measurement (other load can halve a worker trial, or a burst
    inflate nothing else): when its second reading loses to the workers, the search resumes where it was."""
    rates = {(2, 2): 100.0, (4, 2): 120.0, (4, 4): 121.0}
    decision, timed = run_search(search_from(LoaderSettings(0), budget=0), rates, given_rates=[150.0, 60.0])
    assert decision.settings == LoaderSettings(4, 2, persistent_workers=True)
    assert timed == [(0, None), (2, 2), (0, None), (4, 2), (4, 4)]  # timed again once, not after every trial


def test_a_given_loader_ahead_by_less_than_the_margin_is_timed_again_when_the_search_ends():
    search = loader_autotune.LoaderSearch(
        LoaderSettings(0), StartingPoint(LoaderSettings(2, 2, persistent_workers=True), 4, "test"),
        LoaderTuner(LoaderSettings(2, 2, persistent_workers=True), 4, max_trials=1), budget=0)
    decision, timed = run_search(search, {(2, 2): 100.0, (4, 2): 101.0}, given_rates=[104.0, 103.0])
    assert timed == [(0, None), (2, 2), (4, 2), (0, None)] and decision.settings == LoaderSettings(0)
    # the workers win when they beat the second reading by the margin: 100 vs 90 is +11%
    search = loader_autotune.LoaderSearch(
        LoaderSettings(0), StartingPoint(LoaderSettings(2, 2, persistent_workers=True), 4, "test"),
        LoaderTuner(LoaderSettings(2, 2, persistent_workers=True), 4, max_trials=1), budget=0)
    decision, _ = run_search(search, {(2, 2): 100.0, (4, 2): 101.0}, given_rates=[104.0, 90.0])
    assert decision.settings == LoaderSettings(2, 2, persistent_workers=True)


def test_an_epoch_that_ends_while_the_given_loader_is_timed_again_keeps_it():
    search = search_from(LoaderSettings(0), budget=0)
    search.observe(fixed_timing(LoaderSettings(0), 150.0), batches_left=100)
    decision = search.observe(fixed_timing(search.start.settings, 100.0), batches_left=90)
    assert decision.settings == LoaderSettings(0) and not decision.settled  # timing it again
    decision = search.settle_early("the epoch ended")
    assert decision.settings == LoaderSettings(0) and "measured faster (150.0 samples/s)" in decision.reason


def test_after_the_given_loader_is_timed_again_the_budget_still_prices_the_next_pool_by_the_last_one():
    # 1 s to start 2 workers, so ~2 s for 4; the given loader's second reading (no pool, 0 s) must not make
    # them look free. 1225 later batches at 0.04 s: a budget of ~2.6 s, 1.56 s spent; 1.56 + 2 passes it.
    search = search_from(LoaderSettings(0), later_batches=1225)
    search.observe(fixed_timing(LoaderSettings(0), 300.0), batches_left=40)
    decision = search.observe(fixed_timing(search.start.settings, 200.0, start_up=1.0), batches_left=30)
    assert decision.settings == LoaderSettings(0) and not decision.settled  # timed again at once
    decision = search.observe(fixed_timing(LoaderSettings(0), 60.0, start_up=0.0), batches_left=24)
    assert decision.settled and decision.settings == search.start.settings  # the workers won the second reading
    assert "not trying num_workers=4" in decision.reason and "past 5% of this run" in decision.reason
    # the first, fast reading did not repeat: trials are priced at the workers' speed, not at it
    assert search.cost() == pytest.approx((1.24 - 6 * 0.04) + (0.8 - 6 * 0.04))


def test_the_budget_stops_a_trial_whose_start_up_the_rest_of_the_run_cannot_repay():
    # 1 s to start 2 workers, 20 batches left at 0.04 s: 4 workers (~2 s to start) would pass 5%
    search = search_from(LoaderSettings(0), later_batches=0)
    search.observe(fixed_timing(LoaderSettings(0), 60.0), batches_left=30)
    decision = search.observe(fixed_timing(search.start.settings, 200.0, start_up=1.0), batches_left=20)
    assert decision.settled and decision.settings == search.start.settings
    assert "not trying num_workers=4" in decision.reason and "past 5% of this run" in decision.reason
    # a long run repays it: the same trials, 10,000 batches (~400 s) still to come
    search = search_from(LoaderSettings(0), later_batches=10_000)
    search.observe(fixed_timing(LoaderSettings(0), 60.0), batches_left=30)
    decision = search.observe(fixed_timing(search.start.settings, 200.0, start_up=1.0), batches_left=20)
    assert not decision.settled and decision.settings.num_workers == 4


def test_a_trial_times_a_share_of_the_run_left_once_a_speed_is_known():
    search = search_from(LoaderSettings(0), later_batches=900, trial_share=0.01)
    assert search.min_trial_seconds(100) == 0.0  # nothing measured yet: the planned rounds only
    search.observe(fixed_timing(LoaderSettings(0), 80.0), batches_left=100)  # 0.1 s a batch
    assert search.min_trial_seconds(100) == pytest.approx(0.01 * 1000 * 0.1)
    assert search_from(LoaderSettings(0), trial_share=0).min_trial_seconds(100) == 0.0


def test_tuning_cost_is_the_trials_time_beyond_their_batches_at_the_chosen_speed():
    search = search_from(LoaderSettings(0))
    slow = fixed_timing(LoaderSettings(0), 50.0, start_up=0.0)  # 6 batches in 0.96 s
    fast = fixed_timing(search.start.settings, 100.0, start_up=0.3)  # 6 batches in 0.48 s after 0.3 s
    search.observe(slow, 100)
    search.observe(fast, 100)
    assert search.cost(search.start.settings) == pytest.approx((0.96 - 0.48) + 0.3)
    assert search.cost(LoaderSettings(0)) == pytest.approx(0.0)  # at the slow speed, nothing was lost


# ---------------------------------------------------------------- decisions, applied and recorded
def tuned_fit(loader, val_loader=None, max_epochs: int = 1, **options):
    tune, metrics = LoaderAutotune(**options), Metrics()
    trainer = make_trainer(callbacks=[tune, metrics], auto_num_workers=True, max_epochs=max_epochs)
    trainer.fit(loader, val_loader)
    return trainer, tune, metrics


def test_a_data_bound_loader_gets_more_workers_and_every_change_is_recorded(monkeypatch, capsys):
    start_at(monkeypatch, workers=2, max_workers=4)
    rates = {(0, None): 60.0, (2, 2): 100.0, (4, 2): 180.0, (4, 4): 182.0}
    asked = fake_trials(monkeypatch, lambda s: rates[s.num_workers, s.prefetch_factor])
    val = DataLoader(data.classification(32), batch_size=16)
    trainer, tune, metrics = tuned_fit(shuffled(data.classification(640)), val, max_epochs=2, budget=0, rounds=1,
                                       trial_share=0)

    # the loader as given first (no workers to start), then the tuner from the hardware start
    assert [(s.num_workers, s.prefetch_factor) for s in asked] == [(0, None), (2, 2), (4, 2), (4, 4)]
    chosen = {"num_workers": 4, "prefetch_factor": 2, "pin_memory": False, "persistent_workers": True}
    assert trainer.loader_settings == chosen and tune.chosen.as_dict() == chosen
    assert isinstance(trainer.state.train_loader, StableDataLoader)
    assert trainer.state.train_loader.sampler.generator is not None  # the run's own sampler, kept
    assert trainer.state.val_loader.num_workers == 4 and trainer.state.val_loader.persistent_workers
    line = capsys.readouterr().out
    assert "train loader num_workers=0 -> num_workers=4, prefetch_factor=2 (persistent)" in line
    assert "prefetch_factor 2 -> 4 did not pay: 180.0 -> 182.0 samples/s" in line  # the settling verdict
    assert "[num_workers=0: 60.0, num_workers=2, prefetch_factor=2: 100.0, num_workers=4, prefetch_factor=2: 180.0" \
        in line
    assert f"tuned over the first {tune.phase_batches} batches" in line and "all of them trained" in line
    assert "val loader num_workers=0 -> num_workers=4" in line
    assert metrics.logged[0] == {"loader_num_workers": 4, "loader_prefetch_factor": 2,
                                 "loader_tuning_seconds": round(tune.seconds, 3)}
    if HAS_ADAPTATIONS:
        (entry,) = trainer.state.history.adaptations
        assert entry["kind"] == "loader" and entry["after"] == chosen and entry["before"]["num_workers"] == 0
        # Decided in epoch 1 after its trials: the given loader's 3 batches; 2 workers: 2 warm-up + 2 timed;
        # 4 workers: first the 2 x 2 batches the replaced loader had in flight (a loader keeps workers x
        # prefetch batches requested), then a warm-up as deep as its own stock (4 x 2), then 4 timed;
        # prefetch 4: the 4 x 2 in flight, a warm-up of 4 x 4, 4 timed.
        assert entry["epoch"] == 1 and entry["step"] == tune.phase_batches == 3 + 4 + (4 + 8 + 4) + (8 + 16 + 4)
        assert [t["seconds"] > 0 for t in entry["trials"]] == [True] * 4
        assert len(entry["trials"]) == 4 and entry["reason"] in line
        assert "num_workers 2 -> 4 paid: 100.0 -> 180.0 samples/s" in entry["steps"][1]  # the tuner's verdicts


def test_a_loop_that_only_looks_data_bound_keeps_the_loader_it_was_given(monkeypatch, capsys):
    """Real trial loaders and batches, fixed measurements: data wait 50% of the step, yet no workers is
    faster (an in-memory data set on 2 cores). The run keeps the loader object it was given."""
    start_at(monkeypatch, workers=2, max_workers=4)
    rates = {(0, None): 300.0, (2, 2): 100.0}
    asked = fake_trials(monkeypatch, lambda s: rates[s.num_workers, s.prefetch_factor])
    original = shuffled(data.classification(320))
    val = DataLoader(data.classification(32), batch_size=16, num_workers=1)  # the user's own val workers
    trainer, tune, _ = tuned_fit(original, val, max_epochs=2, budget=0, rounds=1, trial_share=0)
    assert [(s.num_workers, s.prefetch_factor) for s in asked] == [(0, None), (2, 2), (0, None)]
    assert trainer.state.train_loader is original and trainer.loader_settings["num_workers"] == 0
    assert trainer.state.val_loader is val  # kept as given too: nothing was chosen over it
    out = capsys.readouterr().out
    assert "train loader kept num_workers=0: the loader as given, timed again: 300.0 samples/s" in out


def test_a_compute_bound_loop_without_workers_keeps_them_off_after_one_round(monkeypatch, capsys):
    start_at(monkeypatch, workers=2, max_workers=4)
    asked = fake_trials(monkeypatch, lambda s: 100.0, data_share=0.02)
    original = shuffled(data.classification(96))
    trainer, tune, _ = tuned_fit(original, max_epochs=2)
    assert asked == [LoaderSettings(0)]  # no worker was started to find that out
    assert trainer.state.train_loader is original  # kept as it is, not rebuilt
    assert "kept num_workers=0: compute-bound as given (data wait 2% of step time" in capsys.readouterr().out


def test_a_compute_bound_loop_with_workers_settles_after_one_trial_on_persistent_ones(monkeypatch, capsys):
    start = start_at(monkeypatch, workers=2, max_workers=4)
    asked = fake_trials(monkeypatch, lambda s: 100.0, data_share=0.02)
    trainer, tune, _ = tuned_fit(shuffled(data.classification(96), num_workers=1))
    assert asked == [start]
    assert trainer.loader_settings == start.as_dict() and trainer.loader_settings["persistent_workers"]
    assert "compute-bound (data wait 2% of step time" in capsys.readouterr().out


def test_an_epoch_too_short_to_time_gets_the_unmeasured_starting_point(monkeypatch, capsys):
    start_at(monkeypatch, workers=2, max_workers=2)
    trainer, tune, _ = tuned_fit(DataLoader(data.classification(16), batch_size=8))  # 2 batches
    assert trainer.loader_settings["num_workers"] == 2 and tune.timings == []
    assert ("the 2 batches left in the epoch are too few to time num_workers=0: the hardware starting point, "
            "unmeasured") in capsys.readouterr().out


def test_an_epoch_too_short_for_workers_keeps_the_loader_as_given_when_it_was_timed(monkeypatch):
    """3 batches: enough to time the given loader (real steps), too few for 2 workers. Compute-bound
    or not (the machine decides), what was measured is kept: never an unmeasured change over it."""
    start_at(monkeypatch, workers=2, max_workers=2)
    trainer, tune, _ = tuned_fit(DataLoader(data.classification(24), batch_size=8))
    assert trainer.loader_settings["num_workers"] == 0 and len(tune.timings) == 1


def test_a_fit_stopped_before_the_search_settled_leaves_the_loader_as_given(monkeypatch):
    start_at(monkeypatch, workers=0, max_workers=0)

    class StopEarly(Callback):
        def after_batch(self, trainer):
            if trainer.state.batch_idx == 2:
                trainer.state.should_stop = True
                raise CancelTrainException()

    original = shuffled(data.classification(96))
    tune = LoaderAutotune()
    trainer = make_trainer(callbacks=[tune, StopEarly()], auto_num_workers=True, max_epochs=2)
    trainer.fit(original)
    assert trainer.state.train_loader is original and tune.chosen is None and tune.state_dict() == {}


@pytest.mark.parametrize("loader, named", [
    ([(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))], "a list, which cannot be rebuilt"),
    (DataLoader(type("Stream", (IterableDataset,), {"__iter__": lambda self: iter([])})(), batch_size=4),
     "an IterableDataset (Stream), whose batches depend on the worker count"),
])
def test_a_loader_that_cannot_be_tuned_is_named_before_any_step(monkeypatch, loader, named):
    no_trials(monkeypatch)
    trainer = make_trainer(auto_num_workers=True)
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ConfigError, match="auto_num_workers is true, but the train loader is ") as error:
        trainer.fit(loader)
    assert named in str(error.value) and "set auto_num_workers to false" in str(error.value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, w) for p, w in zip(trainer.model.parameters(), weights))


def test_fast_dev_run_does_not_tune(monkeypatch, capsys):
    no_trials(monkeypatch)
    trainer = make_trainer(auto_num_workers=True, fast_dev_run=2)
    trainer.fit(shuffled(data.classification(96)))
    assert trainer.loader_settings["num_workers"] == 0
    assert "loader tuning skipped (fast_dev_run)" in capsys.readouterr().out


def test_options_are_checked():
    with pytest.raises(ConfigError, match=r"LoaderAutotune\(rounds=...\) is 0; expected an int >= 1"):
        LoaderAutotune(rounds=0)
    with pytest.raises(ConfigError, match=r"LoaderAutotune\(budget=...\) is 2; expected a fraction"):
        LoaderAutotune(budget=2)
    with pytest.raises(ConfigError, match=r"LoaderAutotune\(trial_share=...\) is -1; expected a fraction"):
        LoaderAutotune(trial_share=-1)


# ---------------------------------------------------------------- resume (one real worker)
class Workers(Callback):
    def __init__(self) -> None:
        self.seen: list = []

    def after_epoch(self, trainer):
        iterator = trainer.state.train_loader._iterator  # None in the tuning epoch (its trial loaders are its own)
        self.seen.extend(iterator._workers if iterator is not None else [])


def test_a_resumed_run_reapplies_the_chosen_settings_without_tuning(monkeypatch, tmp_path, capsys):
    start_at(monkeypatch, workers=1, max_workers=2)
    fake_trials(monkeypatch, lambda s: 100.0)  # nothing pays: 1 worker, persistent
    workers = Workers()
    first = make_trainer(callbacks=[ModelCheckpoint(tmp_path), workers], auto_num_workers=True, max_epochs=2)
    first.fit(shuffled(data.classification(96)))
    chosen = first.loader_settings
    assert chosen["num_workers"] == 1 and chosen["persistent_workers"]
    # Stopped at the end of fit: with ModelCheckpoint's signal handling they ignore SIGTERM, and left
    # alive they kept the interpreter from exiting.
    assert len(workers.seen) == 1 and not workers.seen[0].is_alive() and first.state.train_loader._iterator is None

    no_trials(monkeypatch)
    capsys.readouterr()
    resumed = make_trainer(callbacks=[ModelCheckpoint(tmp_path)], auto_num_workers=True, max_epochs=3)
    resumed.fit(shuffled(data.classification(96)), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.loader_settings == chosen
    assert "num_workers=1, prefetch_factor=2 (persistent) (chosen earlier in this run; not tuned again)" in \
        capsys.readouterr().out
    assert len(resumed.state.history.records) == 3
