"""Loader tuning decisions: the hardware starting point and the tuner, on synthetic throughput curves.

Each curve maps settings to a true samples/s; a window's data wait is what that rate leaves after a
fixed compute time per sample. Noise is seeded, so every test is deterministic and none times anything.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest

from adaptrain.tuning.loader_tuning import LoaderSettings, LoaderTuner, initial_loader_settings

GiB = 2**30


def window(rate: float, compute_per_sample: float, samples: int = 2000) -> tuple[float, float]:
    """(data_time, compute_time) of a window of ``samples`` at ``rate`` with that compute cost a sample."""
    total = samples / rate
    compute = min(compute_per_sample * samples, total)
    return total - compute, compute


def run(curve, start, max_workers, *, compute_per_sample, ram=None, noise=0.0, seed=0, chunks=8, **options):
    """Drive a tuner on ``curve`` until it settles; returns (tuner, final decision)."""
    rng = random.Random(seed)
    tuner = LoaderTuner(start, max_workers, **options)
    settings = start
    for _ in range(30):
        rate = curve(settings)
        rates = [rate * (1 + noise * rng.gauss(0, 1)) for _ in range(chunks)] if noise else rate
        data, compute = window(rate, compute_per_sample)
        decision = tuner.observe(settings, data, compute, rates, ram(settings) if ram else None)
        if decision.settled:
            return tuner, decision
        settings = decision.settings
    raise AssertionError("the tuner did not settle in 30 observations")


def table_curve(rates: dict[int, float], prefetch_gain: float = 0.0):
    """samples/s by worker count, times (1 + prefetch_gain) for each doubling of prefetch_factor above 2."""
    def curve(s: LoaderSettings) -> float:
        steps = (s.prefetch_factor or 2).bit_length() - 2
        return rates[s.num_workers] * (1 + prefetch_gain) ** steps
    return curve


def best_static(curve, max_workers: int, prefetch=(2, 4, 8)) -> float:
    return max(curve(LoaderSettings(w, p, persistent_workers=True))
               for w, p in itertools.product(range(max_workers + 1), prefetch))


# On 2 cores (issue 19's measurements): 4 workers beat 1 by far, the best is ~1.85x num_workers=0.
TWO_CORES = {0: 100, 1: 105, 2: 150, 3: 170, 4: 185}
# 4 cores, peaking at 6 workers (contention above): found by the refine step between 4 and 8.
PEAKED = {w: max(400 - 8 * (w - 6) ** 2, 40) for w in range(17)}
# 8 cores, saturating: doubling to the ceiling pays.
SATURATING = {w: 1000 * (1 - 0.8 ** (w + 1)) for w in range(17)}


# ------------------------------------------------------------------ the starting point
def test_start_divides_cores_among_local_ranks_and_pins_on_cuda():
    start = initial_loader_settings(cpu_count=16, local_world_size=4, dataset_len=50_000, batch_size=64, cuda=True)
    assert start.settings.as_dict() == {"num_workers": 4, "prefetch_factor": 2, "pin_memory": True,
                                        "persistent_workers": True}
    assert start.max_workers == 8
    assert "4 CPU cores per process (16 cores / 4 local ranks)" in start.reason
    assert initial_loader_settings(cpu_count=16, local_world_size=4).settings.pin_memory is False


def test_start_with_one_core_loads_in_the_main_process():
    start = initial_loader_settings(cpu_count=1)
    assert start.settings.as_dict() == {"num_workers": 0, "prefetch_factor": None, "pin_memory": False,
                                        "persistent_workers": False}
    assert start.max_workers == 2  # the tuner may still find that a worker pays (I/O-bound loading)
    assert "main process" in start.reason
    assert initial_loader_settings(cpu_count=3, local_world_size=4).settings.num_workers == 0  # 1 core each


def test_start_is_capped_by_the_batches_of_an_epoch():
    start = initial_loader_settings(cpu_count=32, dataset_len=100, batch_size=64)
    assert (start.settings.num_workers, start.max_workers) == (2, 2)
    assert "capped at 2 by the 2 batches an epoch" in start.reason
    empty = initial_loader_settings(cpu_count=32, dataset_len=0, batch_size=64)
    assert (empty.settings.num_workers, empty.settings.persistent_workers) == (0, False)


def test_start_is_capped_by_half_the_free_ram():
    start = initial_loader_settings(cpu_count=16, free_ram_bytes=4 * GiB, per_worker_ram_bytes=GiB)
    assert (start.settings.num_workers, start.max_workers) == (2, 2)
    assert "half the free RAM (4.0 GiB, 1024 MiB a worker: 2 workers)" in start.reason
    none_fit = initial_loader_settings(cpu_count=16, free_ram_bytes=GiB, per_worker_ram_bytes=GiB)
    assert none_fit.settings.num_workers == 0
    # Only one of the two RAM figures: no RAM cap.
    assert initial_loader_settings(cpu_count=16, free_ram_bytes=GiB).settings.num_workers == 16


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cpu_count": 0}, "cpu_count is 0; expected an int >= 1."),
    ({"cpu_count": 4, "local_world_size": 0}, "local_world_size is 0; expected an int >= 1."),
    ({"cpu_count": 4, "batch_size": True}, "batch_size is True; expected an int >= 1."),
    ({"cpu_count": 4, "dataset_len": -1}, "dataset_len is -1; expected an int >= 0."),
    ({"cpu_count": 4, "free_ram_bytes": GiB, "per_worker_ram_bytes": 0}, "per_worker_ram_bytes is 0; expected an int >= 1."),
])
def test_start_rejects_bad_input_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError) as error:
        initial_loader_settings(**kwargs)
    assert str(error.value) == message


def test_settings_normalise_as_dataloader_does():
    assert LoaderSettings(0, 4, persistent_workers=True) == LoaderSettings(0)
    assert LoaderSettings(2).prefetch_factor == 2
    assert LoaderSettings.from_dict({"batch_size": 8, "num_workers": 3, "prefetch_factor": 4,
                                     "pin_memory": True, "persistent_workers": True}) == LoaderSettings(3, 4, True, True)
    with pytest.raises(ValueError, match=r"num_workers is -1; expected an int >= 0\."):
        LoaderSettings(-1)
    with pytest.raises(ValueError, match=r"prefetch_factor is 0; expected an int >= 1 or None\."):
        LoaderSettings(2, 0)


# ------------------------------------------------------------------ the tuner on curves
@pytest.mark.parametrize(("rates", "start_workers", "max_workers", "compute_per_sample"), [
    (TWO_CORES, 2, 4, 1 / 250),
    (TWO_CORES, 0, 4, 1 / 250),
    (PEAKED, 4, 16, 1 / 1000),
    (SATURATING, 8, 16, 1 / 2000),
])
def test_data_bound_reaches_95_percent_of_the_best_static_setting_within_budget(
        rates, start_workers, max_workers, compute_per_sample):
    curve = table_curve(rates, prefetch_gain=0.01)
    start = LoaderSettings(start_workers, persistent_workers=True)
    tuner, decision = run(curve, start, max_workers, compute_per_sample=compute_per_sample)
    assert len(tuner.trials) - 1 <= tuner.max_trials
    assert curve(decision.settings) >= 0.95 * best_static(curve, max_workers)
    assert curve(decision.settings) > curve(start)
    assert decision.settings.persistent_workers


def test_peak_between_doublings_is_found_by_the_refine_step():
    curve = table_curve(PEAKED)
    tuner, decision = run(curve, LoaderSettings(4), 16, compute_per_sample=1 / 1000)
    assert [t.settings.num_workers for t in tuner.trials][:3] == [4, 8, 6]
    assert decision.settings.num_workers == 6


def test_two_core_data_bound_run_moves_to_four_workers_with_the_numbers_in_the_reason():
    tuner, decision = run(table_curve(TWO_CORES), LoaderSettings(2, persistent_workers=True), 4,
                          compute_per_sample=1 / 250)
    assert decision.settings.num_workers == 4
    first = tuner.decisions[0].reason
    assert first.startswith("data-bound (data wait 40% of step time at 150.0 samples/s)")
    assert first.endswith("trying num_workers 2 -> 4")
    assert "num_workers 2 -> 4 paid: 150.0 -> 185.0 samples/s (+23.3%, needs +5.0%)" in tuner.decisions[1].reason
    assert "1.23x the start's 150.0" in decision.reason


@pytest.mark.parametrize("start", [LoaderSettings(2, persistent_workers=False), LoaderSettings(0),
                                   LoaderSettings(4, 2, True, True)])
def test_compute_bound_start_settles_at_once_on_what_it_has_persistent(start):
    flat = lambda s: 100.0  # workers gain nothing
    tuner, decision = run(flat, start, 8, compute_per_sample=1 / 102)  # data wait 2% of step time
    assert len(tuner.trials) == 1
    assert decision.settings == LoaderSettings(start.num_workers, start.prefetch_factor, start.pin_memory,
                                               persistent_workers=True)
    assert decision.reason.startswith("compute-bound (data wait 2% of step time")


def test_compute_bound_never_pays_for_respawned_workers():
    # Over a run, non-persistent workers respawn each epoch: up to 44% slower on a compute-bound loop.
    def run_rate(s: LoaderSettings) -> float:
        return 100.0 * (0.56 if s.num_workers and not s.persistent_workers else 1.0)
    _, decision = run(lambda s: 100.0, LoaderSettings(2, persistent_workers=False), 8, compute_per_sample=1 / 101)
    best = max(run_rate(LoaderSettings(w, p, persistent_workers=pw))
               for w, p, pw in itertools.product(range(9), (2, 4), (False, True)))
    assert run_rate(decision.settings) >= 0.98 * best


def test_a_change_that_does_not_pay_is_not_kept():
    curve = table_curve({2: 150, 4: 153, 3: 151})  # +2%: below the 5% margin
    tuner, decision = run(curve, LoaderSettings(2), 4, compute_per_sample=1 / 250)
    assert decision.settings.num_workers == 2
    assert "num_workers 2 -> 4 did not pay: 150.0 -> 153.0 samples/s (+2.0%, needs +5.0%)" in tuner.decisions[1].reason


def test_the_loader_no_longer_the_bottleneck_ends_the_search():
    curve = table_curve({2: 150, 4: 195, 8: 199})
    tuner, decision = run(curve, LoaderSettings(2), 8, compute_per_sample=1 / 200)  # at 195: 2.5% data wait
    assert [t.settings.num_workers for t in tuner.trials] == [2, 4]
    assert decision.settings.num_workers == 4
    assert "no longer the bottleneck: data wait 3%" in decision.reason


def test_trial_budget_bounds_the_search():
    tuner, decision = run(table_curve(SATURATING), LoaderSettings(1), 16, compute_per_sample=1 / 2000, max_trials=2)
    assert len(tuner.trials) == 3
    assert decision.settings.num_workers == 4  # 1 -> 2 -> 4, then the budget is spent
    assert "the 2-trial budget is spent" in decision.reason


# ------------------------------------------------------------------ RAM pressure
def test_ram_over_the_limit_backs_off_to_the_best_setting_below_it():
    ram = lambda s: 0.5 + 0.1 * s.num_workers  # 4 workers: 90%
    tuner, decision = run(table_curve(TWO_CORES), LoaderSettings(2), 4, compute_per_sample=1 / 250, ram=ram)
    assert decision.settings.num_workers == 2
    assert "num_workers 2 -> 4: RAM at 90% (limit 85%), backing off to num_workers=2" in decision.reason


def test_ram_trend_stops_the_next_doubling_before_it_is_tried():
    ram = lambda s: 0.40 + 0.08 * s.num_workers  # 4 workers: 72%; 8 would be 104%
    tuner, decision = run(table_curve(SATURATING), LoaderSettings(2), 16, compute_per_sample=1 / 2000, ram=ram)
    assert all(t.settings.num_workers <= 4 for t in tuner.trials)
    assert decision.settings.num_workers == 4
    assert "num_workers=8 would take RAM to about 104% (limit 85%)" in decision.reason


def test_ram_already_over_the_limit_at_the_start_adds_nothing():
    tuner, decision = run(table_curve(TWO_CORES), LoaderSettings(2), 4, compute_per_sample=1 / 250,
                          ram=lambda s: 0.93)
    assert len(tuner.trials) == 1 and decision.settings.num_workers == 2
    assert decision.reason.startswith("RAM at 93% (limit 85%): adding no workers")


# ------------------------------------------------------------------ noise
def test_noise_widens_the_margin():
    start = LoaderSettings(2)
    noisy, steady = LoaderTuner(start, 4), LoaderTuner(start, 4)
    for tuner, rates in ((noisy, [150, 120, 180, 150, 140, 160]), (steady, 150.0)):
        tuner.observe(start, 4.0, 6.0, rates)
    more = LoaderSettings(4, persistent_workers=True)
    # +6.7% over the start, but each median has a standard error of ~5%: not a measured gain.
    assert "did not pay: 150.0 -> 160.0 samples/s (+6.7%, needs +14.3%)" in noisy.observe(
        more, 3.0, 6.0, [160, 130, 190, 160, 150, 170]).reason
    assert steady.observe(more, 3.0, 6.0, 160.0).reason.startswith("num_workers 2 -> 4 paid")


def test_with_seeded_noise_the_pick_is_never_truly_worse_than_the_start_and_mostly_near_the_best():
    curve = table_curve(PEAKED, prefetch_gain=-0.03)  # deeper prefetch costs a little
    best, start = best_static(curve, 16), LoaderSettings(4)

    def picks(noise):
        return [run(curve, start, 16, compute_per_sample=1 / 1000, noise=noise, seed=seed)[1].settings
                for seed in range(200)]
    assert all(curve(p) >= curve(start) for p in picks(0.05))  # 5% noise a window: misses gains, takes no loss
    # 3% noise a window: the +8.7% step from 4 to 6 workers is seen nearly always (measured: 194 of 200).
    assert sum(curve(p) >= 0.95 * best for p in picks(0.03)) >= 190


def test_on_a_flat_curve_seeded_noise_rarely_causes_a_change():
    flat = lambda s: 150.0  # data-bound, but workers change nothing (loading waits on something else)
    changed = sum(run(flat, LoaderSettings(2), 16, compute_per_sample=1 / 250, noise=0.05, seed=seed)[1]
                  .settings.num_workers != 2 for seed in range(200))
    assert changed <= 10  # measured: 6 of 200 (z=2 standard errors; 13 with z=1.5)


def test_the_result_is_never_a_setting_measured_slower_than_the_start():
    rng = random.Random(1)
    for seed in range(100):
        rates = {w: rng.uniform(50, 500) for w in range(17)}
        curve = table_curve(rates, prefetch_gain=rng.uniform(-0.2, 0.2))
        tuner, decision = run(curve, LoaderSettings(rng.randint(0, 8)), 16, compute_per_sample=1 / 1000,
                              noise=0.1, seed=seed)
        measured = {t.settings.num_workers: t for t in tuner.trials}
        chosen = [t for t in tuner.trials if t.settings.num_workers == decision.settings.num_workers
                  and t.settings.prefetch_factor == decision.settings.prefetch_factor]
        assert chosen, f"seed {seed}: settled on an unmeasured setting {decision.settings}"
        assert max(t.samples_per_s for t in chosen) >= tuner.trials[0].samples_per_s, measured


def test_whole_run_with_tuning_keeps_95_percent_of_the_best_static_throughput():
    curve = table_curve(TWO_CORES, prefetch_gain=0.01)
    tuner, decision = run(curve, LoaderSettings(2), 4, compute_per_sample=1 / 250)
    run_samples, window_samples = 200_000, 2000  # each trial measured over 1% of the run
    tuning = sum(window_samples / curve(t.settings) for t in tuner.trials)
    rest = (run_samples - window_samples * len(tuner.trials)) / curve(decision.settings)
    assert run_samples / (tuning + rest) >= 0.95 * best_static(curve, 4)


# ------------------------------------------------------------------ the protocol
def test_observe_checks_what_was_measured_and_the_numbers():
    tuner = LoaderTuner(LoaderSettings(2), 4)
    with pytest.raises(ValueError, match="observed num_workers=4, prefetch_factor=2, but the tuner asked for "
                                         "num_workers=2, prefetch_factor=2"):
        tuner.observe(LoaderSettings(4), 1.0, 1.0, 100.0)
    for args, message in [((-1.0, 1.0, 100.0), "data_time is -1.0; expected seconds >= 0."),
                          ((0.0, 0.0, 100.0), "data_time + compute_time is 0"),
                          ((1.0, 1.0, 0.0), "samples_per_s is 0.0; expected a rate > 0"),
                          ((1.0, 1.0, []), "samples_per_s is []; expected a rate > 0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            tuner.observe(LoaderSettings(2), *args)
    with pytest.raises(ValueError, match=r"ram_fraction is 1\.5; expected a fraction in \[0, 1\] or None\."):
        tuner.observe(LoaderSettings(2), 1.0, 1.0, 100.0, ram_fraction=1.5)
    assert tuner.trials == []  # nothing recorded from bad input


def test_observe_after_settling_is_refused():
    tuner = LoaderTuner(LoaderSettings(0), 4)
    decision = tuner.observe(LoaderSettings(0), 0.0, 1.0, 100.0)
    assert decision.settled and tuner.result is decision
    with pytest.raises(RuntimeError, match="already settled on num_workers=0"):
        tuner.observe(LoaderSettings(0), 0.0, 1.0, 100.0)


def test_tuner_rejects_bad_options():
    with pytest.raises(ValueError, match=r"min_gain is 1\.5; expected a fraction in \[0, 1\]\."):
        LoaderTuner(LoaderSettings(0), 4, min_gain=1.5)
    with pytest.raises(ValueError, match=r"max_workers is -1; expected an int >= 0\."):
        LoaderTuner(LoaderSettings(0), -1)
