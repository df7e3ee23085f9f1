"""Learning-curve forecasting: known curves recovered, intervals cover, LR drops, bad input, plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.optimize

import adaptrain.tuning.forecasting as fmod
from adaptrain.tuning.forecasting import (Forecast, ForecastError, forecast, forecast_history_file, last_lr_drop,
                                mann_kendall_z)

EPOCHS = np.arange(1, 21)


def power_law(x):
    return 0.9 - 0.5 * np.asarray(x, float) ** -0.8


def step_curve(x):
    """Power law up to epoch 20; then the lr drops 10x: a quick extra +0.1 that saturates."""
    x = np.asarray(x, float)
    plateau = 0.8 - 0.6 * 20 ** -0.7
    return np.where(x <= 20, 0.8 - 0.6 * x ** -0.7, plateau + 0.1 * (1 - np.exp(-0.5 * (x - 20))))


def test_recovers_a_known_power_law():
    fc = forecast(EPOCHS, power_law(EPOCHS), at=50, mode="max")
    assert fc.value == pytest.approx(power_law(50), abs=0.005)
    assert fc.low <= power_law(50) <= fc.high
    assert max(fc.families.values(), key=lambda f: f.weight).name == "power_law"
    assert sum(f.weight for f in fc.families.values()) == pytest.approx(1.0)
    assert fc.families["power_law"].params["c"] == pytest.approx(0.8, rel=0.05)  # the exponent is scale-free


def test_interval_contains_truth_on_noisy_curves():
    rng = np.random.default_rng(0)
    hits, errors = 0, []
    for seed in range(8):
        noisy = power_law(EPOCHS) + rng.normal(0, 0.01, len(EPOCHS))
        fc = forecast(EPOCHS, noisy, at=50, seed=seed)
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


def test_lr_drop_fits_the_segment_since_the_drop():
    epochs = np.arange(1, 31)
    lrs = np.where(epochs <= 20, 0.1, 0.01)
    values = step_curve(epochs) + np.random.default_rng(0).normal(0, 0.003, len(epochs))
    aware = forecast(epochs, values, at=60, lrs=lrs)
    blind = forecast(epochs, values, at=60)
    truth = step_curve(60)
    assert aware.segment_start == 21 and blind.segment_start == 1
    assert any("dropped at epoch 21" in note for note in aware.notes)
    assert abs(aware.value - truth) < 0.01
    assert abs(blind.value - truth) > 3 * abs(aware.value - truth)  # extrapolating across the bend overshoots
    assert aware.low <= truth <= aware.high


def test_lr_drop_with_too_few_points_since_is_refused():
    epochs = np.arange(1, 24)
    with pytest.raises(ForecastError, match=r"^cannot forecast: 3 finite point\(s\) since the learning-rate drop at epoch 21"):
        forecast(epochs, step_curve(epochs), at=60, lrs=np.where(epochs <= 20, 0.1, 0.01))


@pytest.mark.parametrize(("lrs", "expected"), [
    ([0.1] * 5, None),
    ([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], 4),  # step schedule: the last drop counts
    ([0.1, 0.095, 0.09, 0.085], None),  # a gentle decay bends the curve smoothly: no segment
    ([0.01, 0.05, 0.1, 0.1], None),  # warmup raises the lr: not a drop
    ([0.1, 0.06, 0.051], None),  # 0.6x is not a halving
    ([0.1, 0.05], 1),  # a halving is
    ([0.1, 0.0095, 0.0, 0.0], 2),  # annealed to zero (end of cosine/OneCycle)
])
def test_last_lr_drop(lrs, expected):
    assert last_lr_drop(lrs) == expected


def test_mann_kendall_z_flags_only_clear_trends():
    assert mann_kendall_z(np.arange(10.0)) > 1.96 and mann_kendall_z(-np.arange(10.0)) < -1.96
    noise = np.random.default_rng(0).normal(size=(200, 12))
    false_alarms = np.mean([abs(mann_kendall_z(row)) > 1.96 for row in noise])
    assert false_alarms < 0.1  # a 5% two-sided test on trendless noise


@pytest.mark.parametrize(("epochs", "values", "kwargs", "message"), [
    ([1, 2, 3], [0.1, 0.2, 0.3], {}, r"^cannot forecast: 3 finite point\(s\); need at least 5"),
    ([1, 2, 3, 4, 5, 6], [np.nan] * 5 + [0.5], {}, r"^cannot forecast: 1 finite point"),
    ([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.3, 0.4, 0.5, np.nan], {}, r"^cannot forecast: the last value \(epoch 6\) is nan"),
    ([1, 2, 3, 4, 5, 6], [0.4] * 6, {}, r"^cannot forecast: value is constant at 0.4 over 6 points"),
    ([1, 2, 3, 4, 5, 6, 7], [0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5], {"metric": "val_acc"},
     r"^cannot forecast: val_acc moves the wrong way \(0.9 -> 0.5\) while mode='max' .* pass mode='min'"),
    ([1, 2, 3, 4, 5, 6], [0.1, 0.15, 0.2, 0.25, 0.3, 0.35], {"at": 1000, "n_boot": 10},
     r"^cannot forecast: at epoch 1000 the 90% interval .* spans over 3x the observed range"),
])
def test_unforecastable_data_raises_forecast_error(epochs, values, kwargs, message):
    with pytest.raises(ForecastError, match=message):
        forecast(epochs, values, **{"at": 50, **kwargs})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "up"}, "mode is 'up'"),
    ({"epochs": [1, 2, 3]}, "got 3 epochs, 6 values"),
    ({"lrs": [0.1, 0.1]}, "2 lrs"),
    ({"epochs": [1, 2, 2, 3, 4, 5]}, "strictly increasing"),
    ({"families": ["power_law", "gompertz"]}, "unknown families \\['gompertz'\\]"),
    ({"level": 1.5}, "0 < level < 1"),
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


def test_a_family_that_scipy_cannot_fit_is_skipped(monkeypatch):
    real = scipy.optimize.curve_fit

    def flaky(fn, *args, **kwargs):
        if fn is fmod.FAMILIES["power_law"].fn:
            raise RuntimeError("Optimal parameters not found: maxfev reached")
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "curve_fit", flaky)
    fc = forecast(EPOCHS, power_law(EPOCHS), at=50)
    assert "power_law" not in fc.families and fc.families
    assert fc.value == pytest.approx(power_law(50), abs=0.02)


def test_no_fittable_family_raises_forecast_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Optimal parameters not found")

    monkeypatch.setattr(scipy.optimize, "curve_fit", broken)
    with pytest.raises(ForecastError, match="^cannot forecast: no curve family could be fitted"):
        forecast(EPOCHS, power_law(EPOCHS), at=50)


def test_limits_clip_the_forecast_and_cap_the_asymptotes():
    rising = 0.5 + 0.03 * EPOCHS  # still rising linearly: unbounded families would pass 1.0
    fc = forecast(EPOCHS, rising, at=40, limits=(0.0, 1.0))
    assert fc.high <= 1.0 and fc.value <= 1.0
    assert all(f.prediction <= 1.0 for f in fc.families.values())


def test_same_seed_same_forecast():
    noisy = power_law(EPOCHS) + np.random.default_rng(3).normal(0, 0.01, len(EPOCHS))
    a, b = (forecast(EPOCHS, noisy, at=50, seed=1) for _ in range(2))
    assert (a.value, a.low, a.high) == (b.value, b.low, b.high)


def test_plot_writes_a_png_and_to_dict_is_json(tmp_path):
    epochs = np.arange(1, 31)
    fc = forecast(epochs, step_curve(epochs), at=60, lrs=np.where(epochs <= 20, 0.1, 0.01),
                  metric="val_acc")
    path = fc.plot(tmp_path / "plots" / "forecast.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    record = json.loads(json.dumps(fc.to_dict()))
    assert record["value"] == fc.value and record["at"] == 60 and record["segment_start"] == 21
    assert set(record["families"]) == set(fc.families)
    assert {"params", "prediction", "holdout_error", "weight"} <= set(record["families"]["power_law"])


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
    assert isinstance(fc, Forecast) and fc.mode == "max" and fc.metric == "val_acc"
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
