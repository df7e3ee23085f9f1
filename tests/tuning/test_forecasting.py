"""Learning-curve forecasting: known curves recovered, unit invariance, lr drops, refusals, reliability, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import adaptrain.tuning.forecasting as fmod
from adaptrain.tuning.curve_fits import Member, MemberFit
from adaptrain.tuning.forecasting import (
    FAMILIES,
    Forecast,
    ForecastError,
    forecast,
    forecast_history_file,
    last_lr_drop,
    mann_kendall_z,
)

EPOCHS = np.arange(1, 21)


def power_law(x):
    return 0.9 - 0.5 * np.asarray(x, float) ** -0.8


def step_curve(x):
    """Power law up to epoch 20; then the lr drops 10x: a quick extra +0.1 that saturates."""
    x = np.asarray(x, float)
    plateau = 0.8 - 0.6 * 20 ** -0.7
    return np.where(x <= 20, 0.8 - 0.6 * x ** -0.7, plateau + 0.1 * (1 - np.exp(-0.5 * (x - 20))))


def onecycle_lrs(epochs: int, max_lr: float = 0.02, pct_start: float = 0.3) -> list[float]:
    """The lr of each epoch's last step under torch's OneCycleLR (cosine up, cosine down to max_lr/25/1e4)."""
    initial, final = max_lr / 25, max_lr / 25 / 1e4
    total, lrs = epochs * 10, []
    for step in range(10, total + 1, 10):
        t = step - 1
        up = pct_start * total - 1
        if t <= up:
            lrs.append(initial + (max_lr - initial) * (1 - math.cos(math.pi * t / up)) / 2)
        else:
            frac = (t - up) / (total - 1 - up)
            lrs.append(final + (max_lr - final) * (1 + math.cos(math.pi * frac)) / 2)
    return lrs


def test_recovers_a_known_power_law():
    fc = forecast(EPOCHS, power_law(EPOCHS), at=50, mode="max")
    assert fc.value == pytest.approx(power_law(50), abs=0.005)
    assert fc.low <= power_law(50) <= fc.high and fc.reliable and not fc.reasons
    assert sum(f.weight for f in fc.families.values()) == pytest.approx(1.0)
    assert fc.families["power_law"].params["c"] == pytest.approx(0.8, rel=0.1)  # the exponent is scale-free
    assert fc.width == pytest.approx(fc.high - fc.low) and fc.width < 0.1


def test_interval_contains_truth_on_noisy_curves():
    rng = np.random.default_rng(0)
    hits, errors = 0, []
    for _ in range(8):
        noisy = power_law(EPOCHS) + rng.normal(0, 0.01, len(EPOCHS))
        fc = forecast(EPOCHS, noisy, at=50)
        hits += fc.low <= power_law(50) <= fc.high
        errors.append(abs(fc.value - power_law(50)))
    assert hits >= 7  # a 90% interval
    assert np.mean(errors) < 0.02


def test_min_mode_forecasts_a_falling_loss():
    loss = 0.3 + 2.0 * EPOCHS ** -0.5
    fc = forecast(EPOCHS, loss, at=40, mode="min")
    truth = 0.3 + 2.0 * 40 ** -0.5
    assert fc.value == pytest.approx(truth, abs=0.03)  # 1.5% of the curve's range, 2x beyond the data
    assert fc.low <= truth <= fc.high
    assert fc.optimistic == fc.low  # lower is better


@pytest.mark.parametrize("scale", [1000.0, 1 / 7, 250.0])
@pytest.mark.parametrize("use_lrs", [False, True])
def test_the_unit_of_x_does_not_change_the_forecast(scale, use_lrs):
    # The same 30 evaluations logged as epochs 1..30 or as steps (x250: 250, 500, ...): same answer.
    epochs = np.arange(1, 31)
    values = step_curve(epochs) + np.random.default_rng(1).normal(0, 0.004, len(epochs))
    lrs = np.where(epochs <= 20, 0.1, 0.01) if use_lrs else None
    a = forecast(epochs, values, at=60, lrs=lrs)
    b = forecast(epochs * scale, values, at=60 * scale, lrs=lrs)
    for left, right in ((a.value, b.value), (a.low, b.low), (a.high, b.high)):
        assert right == pytest.approx(left, rel=1e-6)
    assert a.reliable == b.reliable and b.segment_start == pytest.approx(a.segment_start * scale)


def test_steps_far_from_one_are_not_read_as_epochs():
    # Evaluations every 2,500 iterations: the old fits counted x from 1, so iterations gave an
    # interval thousands of units wide; in u = x / x_last it is the same curve as in epochs.
    its = np.arange(1, 13) * 2500.0
    ap = 40 - 25 * (its / 2500) ** -0.7
    fc = forecast(its, ap, at=50 * 2500, unit="iteration")
    truth = 40 - 25 * 50 ** -0.7
    assert fc.low <= truth <= fc.high and fc.high - fc.low < np.ptp(ap)
    assert abs(fc.value - truth) < 0.1 * np.ptp(ap)


def test_messages_name_the_callers_unit():
    epochs = np.arange(1, 31)
    lrs = np.where(epochs <= 20, 0.1, 0.01)
    assert any("dropped at x=21 " in n for n in forecast(epochs, step_curve(epochs), at=60, lrs=lrs).notes)
    steps = forecast(epochs * 100, step_curve(epochs), at=6000, lrs=lrs, unit="step")
    assert any("dropped at step 2100 " in n for n in steps.notes) and not any("epoch" in n for n in steps.notes)
    with pytest.raises(ForecastError, match=r"the last value \(step 600\) is nan"):
        forecast(np.arange(1, 7) * 100, [0.1, 0.2, 0.3, 0.4, 0.5, np.nan], at=5000, unit="step")


def test_lr_drop_fits_the_segment_since_the_drop():
    epochs = np.arange(1, 31)
    lrs = np.where(epochs <= 20, 0.1, 0.01)
    values = step_curve(epochs) + np.random.default_rng(0).normal(0, 0.003, len(epochs))
    aware = forecast(epochs, values, at=60, lrs=lrs)
    blind = forecast(epochs, values, at=60)
    truth = step_curve(60)
    assert aware.segment_start == 21 and blind.segment_start == 1
    assert any("dropped at x=21" in note for note in aware.notes)
    assert abs(aware.value - truth) < 0.01
    assert aware.low <= truth <= aware.high


def test_few_points_since_an_lr_drop_give_an_unreliable_forecast_not_a_refusal():
    epochs = np.arange(1, 24)
    fc = forecast(epochs, step_curve(epochs), at=60, lrs=np.where(epochs <= 20, 0.1, 0.01))
    assert not fc.reliable and fc.segment_start == 1
    assert any("dropped at x=21 (0.1 -> 0.01), 3 point(s) ago" in r for r in fc.reasons)
    assert fc.low <= fc.value <= fc.high


@pytest.mark.parametrize(("lrs", "expected"), [
    ([0.1] * 5, None),
    ([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], 4),  # step schedule: the last drop counts
    ([0.1, 0.095, 0.09, 0.085], None),  # a gentle decay bends the curve smoothly: no segment
    ([0.01, 0.05, 0.1, 0.1], None),  # warmup raises the lr: not a drop
    ([0.1, 0.06, 0.051], None),  # 0.6x is not a halving
    ([0.1, 0.05], 1),  # a halving is
    ([0.005, 0.005, 0.0025, 0.0025], 2),  # ReduceLROnPlateau's exact halving
    ([0.1, 0.0095, 0.0, 0.0], 1),  # a step to 0.0095, then the anneal to zero is not a second drop
    (onecycle_lrs(50), None),  # OneCycle's final anneal (the demo's schedule) is not a drop
    ([0.5 * (1 + math.cos(math.pi * t / 20)) for t in range(21)], None),  # cosine to zero
])
def test_last_lr_drop(lrs, expected):
    assert last_lr_drop(lrs) == expected


def test_onecycle_history_is_forecast_over_all_its_points():
    # issue 15: the demo's OneCycle anneal was taken for a drop, leaving 1 point to fit.
    epochs = np.arange(1, 51)
    fc = forecast(epochs, power_law(epochs), at=100, lrs=onecycle_lrs(50), limits=(0, 1), unit="epoch")
    assert fc.segment_start == 1 and not any("dropped" in n for n in fc.notes)
    assert fc.value == pytest.approx(power_law(100), abs=0.01)


def test_mann_kendall_z_flags_only_clear_trends():
    assert mann_kendall_z(np.arange(10.0)) > 1.96 and mann_kendall_z(-np.arange(10.0)) < -1.96
    noise = np.random.default_rng(0).normal(size=(200, 12))
    false_alarms = np.mean([abs(mann_kendall_z(row)) > 1.96 for row in noise])
    assert false_alarms < 0.1  # a 5% two-sided test on trendless noise


@pytest.mark.parametrize(("epochs", "values", "kwargs", "message"), [
    ([1, 2, 3], [0.1, 0.2, 0.3], {}, r"^cannot forecast: 3 finite point\(s\); need at least 5"),
    ([1, 2, 3, 4, 5, 6], [np.nan] * 5 + [0.5], {}, r"^cannot forecast: 1 finite point"),
    ([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4, 0.5, np.nan], {}, r"^cannot forecast: the last value \(x=6\) is nan"),
    ([1, 2, 3, 4, 5, 6], [0.4] * 6, {}, r"^cannot forecast: value is constant at 0.4 over 6 points"),
    ([1, 2, 3, 4, 5, 6, 7], [0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5], {"metric": "val_acc"},
     r"^cannot forecast: val_acc moves the wrong way \(0.9 -> 0.5\) while mode='max' .* pass mode='min'"),
    ([1, 2, 3, 4, 5, 6, 7, 8], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], {"mode": "min"}, r"moves the wrong way"),
    (list(range(10, 90, 10)), [0.1, 0.3, 0.4, 0.45, 0.5, 0.52, 0.53, 0.54], {"at": 5},
     r"^cannot forecast: x=5 lies before the fitted segment \(from x=10\)"),
])
def test_only_a_curve_with_nothing_to_extend_is_refused(epochs, values, kwargs, message):
    with pytest.raises(ForecastError, match=message):
        forecast(epochs, values, **{"at": 50, **kwargs})


def test_a_rise_then_a_long_slide_is_forecast_not_refused():
    # A fast warm-up rise, then a long noisy decline (a high-lr plateau): most pairs fall, but the
    # run still ends far above where it started, so mode="max" is right.
    rng = np.random.default_rng(0)
    x = np.arange(1, 151)
    acc = np.where(x < 20, 2 + 2.3 * x, 47 - 0.07 * (x - 20)) + rng.normal(0, 2, len(x))
    fc = forecast(x, acc, at=300)
    assert fc.low <= fc.value <= fc.high


def test_a_long_extrapolation_is_answered_with_a_wide_unreliable_interval():
    # The old code refused this (interval over 3x the observed range); now it answers honestly.
    fc = forecast([1, 2, 3, 4, 5, 6], [0.1, 0.15, 0.2, 0.25, 0.3, 0.35], at=1000)
    assert not fc.reliable and fc.high > 0.35 and fc.low <= 0.35
    assert any("wider than the observed range" in r for r in fc.reasons)
    assert any("a long extrapolation" in n for n in fc.notes)


def test_few_points_are_flagged_unreliable():
    fc = forecast([1, 2, 3, 4, 5, 6], [0.5, 0.7, 0.78, 0.82, 0.84, 0.85], at=20, limits=(0, 1))
    assert not fc.reliable and fc.reasons[0].startswith("only 6 points in the fitted segment")
    assert forecast(EPOCHS, power_law(EPOCHS), at=30).reliable


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "up"}, "mode is 'up'"),
    ({"epochs": [1, 2, 3]}, "got 3 x values, 6 values"),
    ({"lrs": [0.1, 0.1]}, "2 lrs"),
    ({"epochs": [1, 2, 2, 3, 4, 5]}, "strictly increasing"),
    ({"families": ["power_law", "gompertz"]}, "unknown families \\['gompertz'\\]"),
    ({"level": 1.5}, "0 < level < 1"),
    ({"at": float("nan")}, "finite `at`"),
])
def test_malformed_arguments_raise_value_error(kwargs, message):
    args = {"epochs": [1, 2, 3, 4, 5, 6], "values": [0.1, 0.3, 0.4, 0.45, 0.48, 0.5], "at": 20, **kwargs}
    with pytest.raises(ValueError, match=message):
        forecast(**args)


def test_forecast_error_is_a_value_error():
    assert issubclass(ForecastError, ValueError)


def test_nan_points_are_skipped_with_a_note():
    values = power_law(EPOCHS).copy()
    values[[3, 7, 11]] = np.nan  # epochs without validation
    fc = forecast(EPOCHS, values, at=50)
    assert len(fc.values) == len(EPOCHS) - 3
    assert "skipped 3 non-finite point(s)" in fc.notes
    assert fc.value == pytest.approx(power_law(50), abs=0.01)


def test_a_family_that_cannot_be_fitted_is_skipped(monkeypatch):
    broken = Member("power_law", "a - b*u^-c", lambda u, z, cap=None: MemberFit(
        "power_law", lambda x: np.full(np.shape(x), np.nan)), 3)
    monkeypatch.setitem(fmod.FAMILIES, "power_law", broken)
    fc = forecast(EPOCHS, power_law(EPOCHS), at=50)
    assert "power_law" not in fc.families and fc.families
    assert fc.value == pytest.approx(power_law(50), abs=0.02)


def test_no_fittable_family_raises_forecast_error():
    with pytest.raises(ForecastError, match="^cannot forecast: no curve family could be fitted"):
        with np.errstate(all="ignore"):
            forecast(EPOCHS, power_law(EPOCHS), at=50, families=[])


def test_families_picks_a_subset():
    fc = forecast(EPOCHS, power_law(EPOCHS), at=50, families=["power_law", "last"])
    assert set(fc.families) == {"power_law", "last"}
    assert set(FAMILIES) >= {"power_law", "exp_saturation", "log_linear", "mmf", "janoschek", "last", "level",
                             "damped_trend", "damped_trend_fast"}


def test_limits_clip_the_forecast_and_cap_the_asymptotes():
    rising = 0.5 + 0.03 * EPOCHS  # still rising linearly: unbounded families would pass 1.0
    fc = forecast(EPOCHS, rising, at=40, limits=(0.0, 1.0))
    assert fc.high <= 1.0 and fc.value <= 1.0
    assert all(f.prediction <= 1.0 for f in fc.families.values())


def test_same_input_same_forecast():
    noisy = power_law(EPOCHS) + np.random.default_rng(3).normal(0, 0.01, len(EPOCHS))
    a, b = (forecast(EPOCHS, noisy, at=50) for _ in range(2))
    assert (a.value, a.low, a.high) == (b.value, b.low, b.high)


@pytest.mark.parametrize("truth", [None, 0.79, "points"])
def test_plot_writes_a_png_and_to_dict_is_json(tmp_path, truth):
    epochs = np.arange(1, 31)
    fc = forecast(epochs, step_curve(epochs), at=60, lrs=np.where(epochs <= 20, 0.1, 0.01), metric="val_acc",
                  unit="epoch")
    later = np.arange(31, 61)
    path = fc.plot(tmp_path / "plots" / "forecast.png",
                   truth=(later, step_curve(later)) if truth == "points" else truth)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    record = json.loads(json.dumps(fc.to_dict()))
    assert record["value"] == fc.value and record["at"] == 60 and record["segment_start"] == 21
    assert record["reliable"] is True and record["unit"] == "epoch" and record["width"] == pytest.approx(fc.width)
    assert set(record["families"]) == set(fc.families)
    assert {"params", "prediction", "holdout_error", "weight", "formula"} <= set(record["families"]["power_law"])


def test_plot_needs_the_curves():
    with pytest.raises(ValueError, match="needs the curves"):
        Forecast(0.6, 0.5, 0.7, 40, "max", 0.9, {}, [], [], 1.0).plot("unused.png")


def write_history(path, rows):
    keys = ["epoch", "lr", "train_loss", "val_loss", "val_acc"]
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_forecast_history_file(tmp_path):
    rows = []
    for e in range(1, 21):
        validated = e % 2 == 0  # validation every other epoch: odd rows have empty val cells
        rows.append({"epoch": e, "lr": 0.1, "train_loss": 1.0 / e,
                     "val_loss": 0.2 + 1.5 * e ** -0.6 if validated else None,
                     "val_acc": round(float(power_law(e)), 6) if validated else None})
    path = tmp_path / "history.csv"
    write_history(path, rows)
    fc = forecast_history_file(path, "val_acc", at=50, plot=tmp_path / "fc.png")
    assert isinstance(fc, Forecast) and fc.mode == "max" and fc.metric == "val_acc" and fc.unit == "epoch"
    assert fc.epochs == [float(e) for e in range(2, 21, 2)]
    assert fc.value == pytest.approx(power_law(50), abs=0.01) and fc.high <= 1.0
    assert (tmp_path / "fc.png").stat().st_size > 0
    assert forecast_history_file(path, "val_loss", at=50).mode == "min"  # inferred from the name
    with pytest.raises(ForecastError, match=r"no column 'val_ac'; columns: epoch, lr, train_loss"):
        forecast_history_file(path, "val_ac", at=50)


def test_ensemble_value_lies_among_the_clipped_family_predictions():
    # log-linear growth runs far past 1 by epoch 100; averaged unclipped, it would drag the value to ~1.
    epochs = list(range(1, 21))
    rng = np.random.default_rng(0)
    values = [min(0.97, 0.3 + 0.2 * math.log(e)) + rng.normal(0, 0.01) for e in epochs]
    fc = forecast(epochs, values, at=100, limits=(0, 1))
    predictions = [f.prediction for f in fc.families.values() if f.weight > 0]
    assert min(predictions) - 1e-9 <= fc.value <= max(predictions) + 1e-9
    expected = sum(f.weight * f.prediction for f in fc.families.values())
    assert fc.value == pytest.approx(expected, rel=1e-6)


def test_a_flat_noisy_curve_is_forecast_near_its_level():
    # The shapes would extrapolate the noise; the backtests hand the weight to the level members.
    rng = np.random.default_rng(2)
    values = np.concatenate([0.2 + 0.6 * (1 - np.exp(-np.arange(1, 11) / 2)), 0.79 + rng.normal(0, 0.01, 30)])
    fc = forecast(np.arange(1, 41), values, at=160)
    assert abs(fc.value - 0.79) < 0.02 and fc.low <= 0.79 <= fc.high


def test_a_forecast_past_an_annealed_schedule_is_flagged_unreliable():
    epochs = np.arange(1, 51)
    fc = forecast(epochs, power_law(epochs), at=100, lrs=onecycle_lrs(50), unit="epoch")
    assert not fc.reliable and any("annealed to 4e-06 of its peak" in r for r in fc.reasons)
    mid_run = forecast(epochs[:30], power_law(epochs[:30]), at=50, lrs=onecycle_lrs(50)[:30])
    assert mid_run.reliable  # the lr is still 55% of its peak: a forecast within the schedule


def test_history_file_losses_are_clipped_at_zero(tmp_path):
    # A loss still falling steeply: the shapes' optimistic end would cross zero.
    path = tmp_path / "history.csv"
    path.write_text("epoch,val_loss\n" + "".join(f"{e},{1.2 - 0.35 * math.log(e):.5f}\n" for e in range(1, 21)))
    fc = forecast_history_file(path, "val_loss", at=200)
    assert fc.low >= 0.0 and fc.value >= 0.0
    assert forecast(np.arange(1, 21), [1.2 - 0.35 * math.log(e) for e in range(1, 21)], at=200, mode="min").low < 0


def test_a_forecast_inside_the_seen_range_has_a_finite_interval():
    noisy = power_law(EPOCHS) + np.random.default_rng(4).normal(0, 0.01, len(EPOCHS))
    fc = forecast(EPOCHS, noisy, at=15)
    assert np.isfinite([fc.value, fc.low, fc.high]).all() and fc.low <= fc.value <= fc.high
    assert abs(fc.value - power_law(15)) < 0.03
