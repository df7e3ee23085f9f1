"""The tune search on simulated spaces: a model of a run's throughput, with noise, instead of hardware."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from adaptrain.tuning.autotune import (
    MIN_TRIALS,
    Measurement,
    NotTunable,
    Space,
    effective_rate,
    search,
    too_short_to_tune,
)
from adaptrain.tuning.loader_tuning import LoaderSettings

START = {"precision": "32", "channels_last": False, "batch_size": 32, "micro_batch_size": None, "num_workers": 0,
         "prefetch_factor": None, "pin_memory": False, "compile": False}


class SimulatedRun:
    """Samples/s of a run as a function of its settings: compute (precision, batch, layout, compile) and a
    data pipeline (per-worker rate) in series; memory grows with the batch; multiplicative noise."""

    def __init__(self, precision=None, batch_knee=256, memory_limit=None, per_worker=None, main_process=None,
                 channels_last=1.0, compile_speedup=1.0, compile_setup=0.0, noise=0.0, seed=0, trial_seconds=1.0,
                 max_useful_workers=4):
        self.precision = precision or {"32": 1.0, "bf16-mixed": 1.4, "16-mixed": 0.08}
        self.batch_knee, self.memory_limit = batch_knee, memory_limit
        self.per_worker, self.main_process = per_worker, main_process
        self.channels_last, self.compile_speedup, self.compile_setup = channels_last, compile_speedup, compile_setup
        self.noise, self.random, self.trial_seconds = noise, random.Random(seed), trial_seconds
        self.max_useful_workers = max_useful_workers
        self.calls = []

    def compute_rate(self, point):
        batch = point["batch_size"]
        rate = 1000.0 * self.precision[point["precision"]] * (batch / (batch + self.batch_knee)) * 2
        if point["channels_last"]:
            rate *= self.channels_last
        if point["compile"]:
            rate *= self.compile_speedup
        if point["micro_batch_size"]:
            rate *= 0.9 * point["micro_batch_size"] / (point["micro_batch_size"] + 8)
        return rate

    def data_rate(self, point):
        if self.per_worker is None:
            return math.inf
        workers = point["num_workers"]
        if workers == 0:
            return self.main_process
        useful = min(workers, self.max_useful_workers)
        return self.per_worker * useful * (1.1 if (point["prefetch_factor"] or 2) > 2 else 1.0)

    def true_rate(self, point):
        compute, data = self.compute_rate(point), self.data_rate(point)
        if point["num_workers"] == 0 and data != math.inf:
            return 1 / (1 / compute + 1 / data)  # loading in the main process adds to each step
        return min(compute, data)

    def __call__(self, point):
        self.calls.append(dict(point))
        if self.memory_limit is not None and (point["micro_batch_size"] or point["batch_size"]) > self.memory_limit:
            return Measurement(None, self.trial_seconds, error="out of memory", peak_fraction=1.0, out_of_memory=True)
        rate = self.true_rate(point) * math.exp(self.random.gauss(0, self.noise)) if self.noise else \
            self.true_rate(point)
        compute = self.compute_rate(point)
        data_share = max(0.0, 1 - rate / compute) if compute > rate else 0.0
        batches = 20
        elapsed = batches * point["batch_size"] / rate
        rates = tuple(rate * math.exp(self.random.gauss(0, self.noise)) for _ in range(5)) if self.noise else ()
        fraction = (point["micro_batch_size"] or point["batch_size"]) / (self.memory_limit or 10**6)
        return Measurement(rate, self.trial_seconds, setup_seconds=self.compile_setup if point["compile"] else 0.0,
                           data_share=data_share, peak_fraction=min(fraction, 1.0), spread=self.noise or None,
                           data_time=elapsed * data_share, compute_time=elapsed * (1 - data_share), rates=rates)


def space(**options):
    defaults = dict(precisions=("32", "bf16-mixed", "16-mixed"), max_batch_size=2048, run_samples=1e6,
                    loader=(LoaderSettings(2, 2, persistent_workers=True), 8))
    return Space(**{**defaults, **options})


def grid_best(run, space_, run_samples=1e6):
    """The exhaustive sweep's best effective rate over the same space (batch sizes on a doubling grid)."""
    batches = [b for b in (32 * 2**k for k in range(8)) if b <= (space_.max_batch_size or 10**9)]
    best = 0.0
    for precision, batch, workers, prefetch, layout, compiled in itertools.product(
            space_.precisions, batches, (0, 1, 2, 4, 8), (2, 4), (False, True) if space_.channels_last else (False,),
            (False, True) if space_.compile else (False,)):
        point = {**START, "precision": precision, "batch_size": batch, "num_workers": workers,
                 "prefetch_factor": prefetch if workers else None, "channels_last": layout, "compile": compiled}
        if run.memory_limit is not None and batch > run.memory_limit:
            continue
        rate = run.true_rate(point)
        setup = run.compile_setup if compiled else 0.0
        best = max(best, run_samples / (setup + run_samples / rate))
    return best


def chosen_rate(run, result, run_samples=1e6):
    rate = run.true_rate(result.chosen)
    setup = run.compile_setup if result.chosen["compile"] else 0.0
    return run_samples / (setup + run_samples / rate)


def test_noiseless_compute_bound_space_finds_the_sweeps_best():
    run = SimulatedRun()
    result = search(START, run, space(), budget_s=60)
    assert result.chosen["precision"] == "bf16-mixed"
    assert chosen_rate(run, result) >= 0.95 * grid_best(run, space())
    assert result.speedup > 1.5 and result.changes["batch_size"][1] > 32


def test_noisy_spaces_land_within_five_percent_of_the_best_nearly_always():
    ratios = []
    for seed in range(40):
        rng = random.Random(seed)
        run = SimulatedRun(precision={"32": 1.0, "bf16-mixed": rng.uniform(0.4, 1.8), "16-mixed": rng.uniform(0.05, 1.2)},
                           batch_knee=rng.choice([16, 64, 256, 1024]), noise=0.02, seed=seed,
                           per_worker=rng.choice([None, 300.0, 2000.0]), main_process=rng.uniform(200, 2000),
                           memory_limit=rng.choice([None, 300, 1000]))
        sp = space()
        result = search(START, run, sp, budget_s=80)
        ratios.append(chosen_rate(run, result) / grid_best(run, sp))
    assert min(ratios) >= 0.8, sorted(ratios)[:5]
    assert sum(r >= 0.95 for r in ratios) >= 0.85 * len(ratios), sorted(ratios)[:8]


def test_the_budget_is_never_passed_and_cuts_the_search_short():
    run = SimulatedRun(trial_seconds=2.0)
    result = search(START, run, space(), budget_s=9)
    assert result.spent <= 9
    assert len(run.calls) == 4
    assert any("budget" in note for note in result.notes)


def test_a_compute_bound_run_sweeps_no_workers():
    run = SimulatedRun(per_worker=None)  # no data cost at all: data wait 0%
    result = search(START, run, space(), budget_s=60)
    assert all(call["num_workers"] == 0 for call in run.calls)
    assert any("compute-bound" in note for note in result.notes)


def test_a_data_bound_run_gets_workers_and_then_the_precision_that_only_pays_with_them():
    # Main-process loading caps the run at ~300 samples/s: precision looks useless until workers feed it.
    run = SimulatedRun(per_worker=1500.0, main_process=300.0, batch_knee=32)
    result = search(START, run, space(), budget_s=120)
    assert result.chosen["num_workers"] >= 2
    assert result.chosen["precision"] == "bf16-mixed"
    assert chosen_rate(run, result) >= 0.95 * grid_best(run, space())


def test_a_precision_far_slower_at_the_first_batch_size_is_not_tried_again():
    run = SimulatedRun()  # 16-mixed at 0.08x (a CPU): under drop_below of the incumbent
    search(START, run, space(), budget_s=60)
    tried_16 = [i for i, call in enumerate(run.calls) if call["precision"] == "16-mixed"]
    assert len(tried_16) == 1 and run.calls[tried_16[0]]["batch_size"] == 32


class PrecisionByBatch(SimulatedRun):
    """A run whose precisions' speed depends on the batch: ``bf16(batch)`` is bf16's factor over fp32,
    ``fp32(batch)`` fp32's own factor (1: the simulated run's batch curve as it is); fp16 0.08x."""

    def __init__(self, bf16, fp32=lambda batch: 1.0, **options):
        super().__init__(**options)
        self.bf16, self.fp32 = bf16, fp32

    def compute_rate(self, point):
        batch = point["batch_size"]
        rate = super().compute_rate({**point, "precision": "32"}) * self.fp32(batch)
        return rate * {"32": 1.0, "bf16-mixed": self.bf16(batch), "16-mixed": 0.08}[point["precision"]]


def precision_pays_at_large_batches(**options):
    """bf16's per-op autocast cost dominates small batches: 0.8x fp32 at 32, 1.14x at 128, 1.6x at 256
    (the shape measured by benchmarks/tune.py on this CPU: 0.84x, 1.15x, 1.6x)."""
    return PrecisionByBatch(lambda batch: min(0.68 + batch / 256 * 0.92, 1.6), **options)


def test_a_precision_slower_only_at_the_first_batch_size_is_tried_again_at_the_next_batch():
    run = precision_pays_at_large_batches(batch_knee=64)
    result = search(START, run, space(max_batch_size=256), budget_s=120)
    assert run.true_rate({**START, "precision": "bf16-mixed"}) < run.true_rate(START)  # slower where it starts
    assert result.chosen["precision"] == "bf16-mixed" and result.chosen["batch_size"] >= 128
    assert chosen_rate(run, result) >= 0.95 * grid_best(run, space(max_batch_size=256))
    assert sum(call["precision"] == "16-mixed" for call in run.calls) == 1  # the hopeless one, once


def test_compile_is_chosen_only_when_its_one_off_cost_pays_over_the_run():
    pays = SimulatedRun(compile_speedup=1.5, compile_setup=20.0)
    assert search(START, pays, space(compile=True, compile_cost_s=1), budget_s=60).chosen["compile"] is True
    costly = SimulatedRun(compile_speedup=1.05, compile_setup=500.0)
    assert search(START, costly, space(compile=True, compile_cost_s=1, run_samples=1e5),
                  budget_s=60).chosen["compile"] is False


def test_compile_is_not_tried_when_its_expected_cost_does_not_fit_the_budget_left():
    run = SimulatedRun(compile_speedup=2.0)
    result = search(START, run, space(compile=True, compile_cost_s=100), budget_s=30)
    assert not any(call["compile"] for call in run.calls)
    assert any(note.startswith("compile") for note in result.notes)


def test_keep_batch_size_never_changes_the_batch():
    run = SimulatedRun()
    result = search(START, run, space(batch_mode=None), budget_s=60)
    assert result.chosen["batch_size"] == 32 and all(call["batch_size"] == 32 for call in run.calls)


def test_a_start_that_does_not_fit_gets_the_largest_micro_batch_that_does():
    run = SimulatedRun(memory_limit=12)
    result = search(START, run, space(batch_mode=None, precisions=("32",)), budget_s=60)
    assert result.chosen["batch_size"] == 32 and result.chosen["micro_batch_size"] == 8
    assert "same batch" in result.reasons["micro_batch_size"]
    assert result.speedup is None  # the start never ran: there is nothing to compare with
    assert sum(call == START for call in run.calls) == 1  # and it is not re-measured to confirm


def test_a_budget_given_as_a_share_of_the_run_is_set_from_the_first_configuration_that_ran():
    run = SimulatedRun(memory_limit=12, trial_seconds=1.0)
    seen = []

    def budget(measurement):
        seen.append(measurement)
        return 5.0

    result = search(START, run, space(batch_mode=None), budget_s=budget)
    # set from the rescue's measurement (the first that ran), then asked again by each later one
    assert seen[0].ok and len(seen) == sum(r.measurement.ok for r in result.trials) and result.budget_s == 5.0
    assert result.spent <= 5.0 + 3  # the 3 trials the rescue needed are paid whatever the budget


def test_a_start_that_fails_for_another_reason_than_memory_is_not_tunable():
    def too_short(point):
        return Measurement(None, 0.1, error="an epoch of 2 batches is too short")
    with pytest.raises(NotTunable, match="too short"):
        search(START, too_short, space(), budget_s=10)


def test_re_measuring_a_compiled_choice_is_costed_at_what_it_cost_before():
    class SlowCompile(SimulatedRun):
        def __call__(self, point):
            measured = super().__call__(point)
            seconds = 25.0 if point["compile"] else 1.0
            return Measurement(measured.samples_per_s, seconds, setup_seconds=measured.setup_seconds,
                               data_share=measured.data_share)

    run = SlowCompile(compile_speedup=3.0, compile_setup=1.0)
    result = search(START, run, space(compile=True, compile_cost_s=10, batch_mode=None), budget_s=40)
    assert result.chosen["compile"] is True
    assert result.spent <= 40


def test_the_choice_is_always_measured():
    # The loader look-ahead adopts workers judged at a larger batch; with no budget left for another pass,
    # the final point (the current batch with those workers) still gets its own measurement.
    run = SimulatedRun(per_worker=300.0, main_process=479.0, batch_knee=1024)
    result = search(START, run, space(max_passes=1), budget_s=30)
    assert result.chosen_measurement is not None and result.chosen_measurement.ok
    assert result.speedup is None or result.speedup > 0


def test_a_choice_slower_side_by_side_is_taken_back():
    class LuckyOnce(SimulatedRun):
        def __call__(self, point):
            measured = super().__call__(point)
            if point["precision"] == "bf16-mixed" and sum(c["precision"] == "bf16-mixed" for c in self.calls) == 1:
                return Measurement(measured.samples_per_s * 3, measured.seconds, data_share=0.0)  # one lucky reading
            return measured

    run = LuckyOnce(precision={"32": 1.0, "bf16-mixed": 0.9, "16-mixed": 0.1})
    result = search(START, run, space(batch_mode=None), budget_s=60)
    assert result.chosen == START
    assert any("keeping the start" in note for note in result.notes)


def test_the_users_value_wins_a_close_call():
    run = SimulatedRun(precision={"32": 1.0, "bf16-mixed": 1.01, "16-mixed": 0.1})
    assert search(START, run, space(batch_mode=None), budget_s=60).chosen["precision"] == "32"


def test_effective_rate_spreads_one_off_costs_over_the_run():
    assert effective_rate(Measurement(100.0, 1.0, setup_seconds=0.0), 1e4) == 100.0
    assert effective_rate(Measurement(100.0, 1.0, setup_seconds=100.0), 1e4) == pytest.approx(50.0)


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="budget"):
        search(START, SimulatedRun(), space(), budget_s=-1)


def test_a_budget_must_buy_the_start_and_one_alternative_before_a_search_starts():
    assert MIN_TRIALS == 2
    assert too_short_to_tune(budget_s=1.2, trial_s=0.6) is None  # exactly two trials: worth it
    assert "fewer than 2 trials" in too_short_to_tune(budget_s=1.19, trial_s=0.6)
    assert too_short_to_tune(budget_s=1.0, trial_s=0.3, trials=4) is not None


def test_a_data_bound_start_sweeps_the_loader_before_precision_so_a_small_budget_buys_workers():
    run = SimulatedRun(per_worker=1500.0, main_process=300.0, batch_knee=32)
    result = search(START, run, space(), budget_s=4)  # the start and three more 1-second trials
    assert run.calls[1]["num_workers"] > 0  # the first trial after the start feeds the device
    assert result.chosen["num_workers"] >= 2


def test_a_compute_bound_start_keeps_precision_first_and_never_sweeps_workers():
    run = SimulatedRun()
    search(START, run, space(), budget_s=60)
    assert run.calls[1]["precision"] != "32" and all(call["num_workers"] == 0 for call in run.calls)


def test_a_budget_given_as_a_share_of_the_run_shrinks_with_each_faster_configuration():
    run = SimulatedRun()  # bf16 1.4x and larger batches pay: the run as tuned is much shorter than as given
    def budget_for(measured):
        return 0.05 * 1e6 / measured.samples_per_s  # 5% of a 1e6-sample run at that speed

    result = search(START, run, space(), budget_s=budget_for)
    start_budget = budget_for(run(START))
    fastest = max(r.measurement.samples_per_s for r in result.trials if r.measurement.ok)
    assert result.budget_s == pytest.approx(budget_for(Measurement(fastest, 1.0)))
    assert result.budget_s < start_budget / 2
    assert result.spent <= result.budget_s + max(r.measurement.seconds for r in result.trials)  # one trial over, at most


def precision_pays_only_at_the_largest_batch(**options):
    """The shape benchmarks/tune.py measured on this CPU: fp32 peaks near batch 112 and slows above it;
    bf16 loses at 32 (0.84x), is level at 64-128 (+2%, under the margin) and 1.6x fp32 at 256."""
    return PrecisionByBatch(lambda batch: 0.84 if batch <= 32 else 1.02 if batch <= 128 else 1.6 / 0.8,
                            fp32=lambda batch: 0.8 if batch > 128 else 1.0, **options)


def test_a_precision_whose_gain_shows_only_at_the_largest_batch_that_fits_is_found_with_it():
    run = precision_pays_only_at_the_largest_batch(batch_knee=64)
    result = search(START, run, space(max_batch_size=256), budget_s=120)
    assert result.chosen["precision"] == "bf16-mixed" and result.chosen["batch_size"] == 256
    assert chosen_rate(run, result) >= 0.95 * grid_best(run, space(max_batch_size=256))
    assert "its gain grows with the batch" in result.reasons["precision"]


def test_keep_batch_size_never_looks_ahead_at_a_larger_batch():
    run = precision_pays_only_at_the_largest_batch(batch_knee=64)
    result = search(START, run, space(batch_mode=None, max_batch_size=256), budget_s=120)
    assert all(call["batch_size"] == 32 for call in run.calls) and result.chosen["precision"] == "32"


def test_a_batch_search_cut_short_by_the_budget_keeps_the_fastest_batch_it_measured():
    measured_rates = {32: 5696.0, 64: 7652.0, 128: 9966.0, 256: 9051.0}  # benchmarks/tune.py, compute-bound

    def trial(point):
        batch = point["batch_size"]
        below = max(b for b in measured_rates if b <= batch)
        above = min((b for b in measured_rates if b >= batch), default=below)
        share = 0.0 if above == below else (batch - below) / (above - below)
        rate = measured_rates[below] + share * (measured_rates[above] - measured_rates[below])
        return Measurement(rate, 1.0, peak_fraction=batch / 4096, data_share=0.0)

    result = search(START, trial, space(precisions=("32",), max_batch_size=256), budget_s=6)  # start + 5 probes
    assert any("batch_size: stopped" in note for note in result.notes)  # the budget did cut the search
    assert result.chosen["batch_size"] == 128 and "cut short by the budget" in result.reasons["batch_size"]
