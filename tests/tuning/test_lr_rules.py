"""The LR finder's pure rules on synthetic sweeps: the schedule, the stop, the curve read, the suggestions."""

import math
import random

import pytest

from adaptrain.tuning.lr_rules import (
    RULES,
    SweepTracker,
    check_sweep,
    read_curve,
    smooth,
    suggest,
    sweep_lr,
    sweep_lrs,
)

DESCENT = -3.0  # log10 of the LR where the synthetic loss falls fastest
BLOW_UP = -0.5  # log10 of the LR above which it diverges


def sweep(num_steps=100, noise=0.05, seed=0, min_lr=1e-7, max_lr=10.0, stop_factor=4.0):
    """A sweep as the finder records it: raw losses of a curve that is flat, falls around 1e-3 (over about
    two decades), bottoms out and blows up above 0.3, with multiplicative noise; stopped by the tracker."""
    rng = random.Random(seed)
    tracker = SweepTracker(0.98, stop_factor)
    lrs, losses = [], []
    for lr in sweep_lrs(min_lr, max_lr, num_steps):
        t = math.log10(lr)
        loss = 0.3 + 2.0 / (1 + math.exp((t - DESCENT) / 0.5))
        if t > BLOW_UP:
            loss *= math.exp(6 * (t - BLOW_UP))
        loss *= 1 + noise * rng.gauss(0, 1)
        lrs.append(lr)
        losses.append(loss)
        tracker.add(loss)
        if tracker.stop_reason:
            break
    return lrs, losses, tracker


def suggested(rule, **options):
    lrs, losses, _ = sweep(**options)
    return suggest(lrs, losses, rule)


def test_the_sweep_is_exponential_from_min_to_max_lr():
    lrs = sweep_lrs(1e-6, 1.0, 13)
    assert lrs[0] == 1e-6 and lrs[-1] == 1.0
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios)) == pytest.approx(10 ** 0.5)
    assert sweep_lr(6, 1e-6, 1.0, 13) == pytest.approx(1e-3)


def test_smoothing_is_bias_corrected_and_causal():
    assert smooth([5.0] * 20, 0.98) == pytest.approx([5.0] * 20)  # no pull towards the 0 it starts from
    values = smooth([1.0] * 10 + [3.0] * 10, 0.9)
    assert values[:10] == pytest.approx([1.0] * 10)  # causal: the jump does not show before it happens
    reference, avg = [], 0.0  # the rule written out: EMA, then Adam's bias correction
    for i, loss in enumerate([1.0] * 10 + [3.0] * 10):
        avg = 0.9 * avg + 0.1 * loss
        reference.append(avg / (1 - 0.9 ** (i + 1)))
    assert values == pytest.approx(reference)
    assert values[10] == pytest.approx(1.2915, abs=1e-4) and values[-1] < 2.9  # it lags behind the jump after


def test_the_tracker_stops_at_four_times_the_best_moving_average():
    tracker = SweepTracker(beta=0.0, stop_factor=4.0)
    for loss in (3.0, 1.0, 2.0, 3.9):
        tracker.add(loss)
    assert tracker.stop_reason is None
    tracker.add(4.1)
    assert "above 4 x its best (1)" in tracker.stop_reason


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_the_tracker_stops_at_a_non_finite_loss_even_without_a_factor(bad):
    tracker = SweepTracker(0.98, stop_factor=None)
    tracker.add(2.0)
    assert math.isnan(tracker.add(bad))
    assert tracker.stop_reason == f"the loss became {bad}"


def test_a_loss_that_is_never_positive_is_stopped_by_nan_only():
    tracker = SweepTracker(beta=0.0, stop_factor=4.0)
    for loss in (-1.0, -2.0, 5.0, 50.0):  # 50 > 4 x -2, but a relative rule means nothing below 0
        tracker.add(loss)
    assert tracker.stop_reason is None


def test_the_synthetic_sweep_stops_after_the_blow_up():
    lrs, _, tracker = sweep()
    assert "above 4 x its best" in tracker.stop_reason
    assert 10 ** BLOW_UP < lrs[-1] < 10.0


@pytest.mark.parametrize("num_steps", [100, 300])
@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_valley_lands_in_the_descent_at_every_seed(num_steps, noise):
    # the loss falls by 10% of its drop near 10**-4.1 and is within 1% of its floor from 10**-1.8
    for seed in range(20):
        lr = suggested("valley", num_steps=num_steps, noise=noise, seed=seed).lr
        assert 10 ** (DESCENT - 1) < lr < 10 ** (DESCENT + 1.5), (seed, lr)


@pytest.mark.parametrize("num_steps", [100, 300])
def test_steepest_lands_near_the_steepest_fall(num_steps):
    for seed in range(20):
        lr = suggested("steepest", num_steps=num_steps, seed=seed).lr
        assert 10 ** (DESCENT - 0.75) < lr < 10 ** (DESCENT + 0.75), (seed, lr)


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_minimum_is_a_decade_below_the_lowest_loss(noise):
    for seed in range(20):
        found = suggested("minimum", noise=noise, seed=seed)
        lrs, losses, _ = sweep(noise=noise, seed=seed)
        read_at = lrs[found.index]
        assert found.lr == pytest.approx(read_at / 10)
        assert 10 ** (BLOW_UP - 2) < read_at <= 10 ** (BLOW_UP + 0.5), (seed, read_at)  # the bottom, before the rise


def test_valley_is_not_pulled_onto_a_long_noisy_plateau():
    """The descent starts where the loss has fallen a tenth of its drop, so a sweep starting four decades
    lower gives about the same suggestion as one starting just below the descent (a longest decreasing
    subsequence of the moving average, fastai's valley, strings plateau points together: 0.6 decade apart
    on these two sweeps)."""
    far = suggested("valley", min_lr=1e-9, num_steps=300, noise=0.2, seed=3).lr
    near = suggested("valley", min_lr=1e-5, num_steps=150, noise=0.2, seed=3).lr
    assert abs(math.log10(far / near)) < 0.5


def test_the_read_curve_does_not_lag_where_the_moving_average_does():
    lrs, losses, _ = sweep(noise=0.0)
    half = (losses[0] + 0.3) / 2  # halfway from the plateau to the floor: the truth is at 10**DESCENT

    def halfway(curve):
        return math.log10(lrs[next(i for i, v in enumerate(curve) if v < half)])

    assert abs(halfway(losses) - DESCENT) < 0.1
    assert abs(halfway(read_curve(lrs, losses)) - DESCENT) < 0.1
    assert halfway(smooth(losses, 0.98)) - DESCENT > 0.5  # the causal average, as the peers read it


def test_an_exploded_step_does_not_drag_its_neighbours():
    lrs = sweep_lrs(1e-4, 1.0, 41)
    losses = [1.0] * 30 + [0.5, 1e6] + [1.0] * 9
    curve = read_curve(lrs, losses)
    assert max(curve) == pytest.approx(1.0)  # capped at the starting level before averaging
    assert curve[30] < 1.0


def test_read_curve_keeps_the_finite_part_only():
    curve = read_curve(sweep_lrs(1e-4, 1.0, 6), [2.0, 1.5, 1.0, math.nan, 1.0, 1.0])
    assert all(math.isfinite(v) for v in curve[:3]) and all(math.isnan(v) for v in curve[3:])


@pytest.mark.parametrize("rule", RULES)
def test_a_curve_that_never_descends_gives_no_suggestion_and_says_why(rule):
    lrs = sweep_lrs(1e-7, 10.0, 100)
    rng = random.Random(0)
    rising = [2.3 * (1 + 0.01 * i) * (1 + 0.02 * rng.gauss(0, 1)) for i in range(100)]
    flat = [2.3 * (1 + 0.02 * rng.gauss(0, 1)) for _ in range(100)]
    for losses in (rising, flat):
        found = suggest(lrs, losses, rule)
        assert found.lr is None and found.index is None
        assert found.reason.startswith("no descent: the loss never fell below")


def test_a_sweep_that_diverged_at_once_gives_no_suggestion():
    lrs = sweep_lrs(1.0, 100.0, 100)[:4]
    found = suggest(lrs, [1.0, 5.0, 50.0, math.inf])
    assert found.lr is None and found.reason.startswith("too few points: 3 finite step(s) of 4")


def test_suggest_rejects_an_unknown_rule_and_mismatched_lengths():
    with pytest.raises(ValueError, match=r'lr_find\(rule=.fast.\): expected "valley" or "steepest" or "minimum"'):
        suggest([1.0, 2.0], [1.0, 1.0], "fast")
    with pytest.raises(ValueError, match="2 learning rates but 3 losses"):
        suggest([1.0, 2.0], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("arguments, named", [
    ({"min_lr": 0.0}, "min_lr=0.0"),
    ({"min_lr": math.nan}, "min_lr=nan"),
    ({"max_lr": 1e-8}, "max_lr=1e-08"),
    ({"num_steps": 4}, "num_steps=4"),
    ({"num_steps": 10.0}, "num_steps=10.0"),
    ({"smoothing": 1.0}, "smoothing=1.0"),
    ({"stop_factor": 1.0}, "stop_factor=1.0"),
    ({"rule": "steep"}, "rule='steep'"),
])
def test_check_sweep_names_the_bad_argument(arguments, named):
    values = {"min_lr": 1e-7, "max_lr": 10.0, "num_steps": 100, **arguments}
    with pytest.raises(ValueError, match=r"^lr_find\(" + named.replace("(", r"\(").replace(".", r"\.") + r"\): expected"):
        check_sweep(**values)
