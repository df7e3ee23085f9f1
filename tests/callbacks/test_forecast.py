"""ForecastCallback: logs forecasts during real runs, stops runs that cannot reach their target."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import ConfigError, Trainer
from adaptrain.callbacks.forecast import ForecastCallback, hopeless
from adaptrain.core.history import History
from adaptrain.tuning.forecasting import Forecast


def noisy_classification(n: int = 600, features: int = 20, classes: int = 4, noise: float = 0.3):
    """A linear teacher with 30% of labels shuffled: accuracy tops out near 0.78, never 0.95."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=50, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(x[400:], y[400:]), batch_size=200)


def run(callback: ForecastCallback, epochs: int = 30) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.02), nn.CrossEntropyLoss(),
                      metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")},
                      max_epochs=epochs, callbacks=[callback], seed=0, progress=False, device="cpu")
    trainer.fit(*noisy_classification())
    return trainer


@pytest.mark.parametrize(("monitor", "target"), [("val_acc", {"stop_if_below": 0.95}),
                                                 ("val_loss", {"stop_if_above": 0.2})])
def test_stops_a_run_that_cannot_reach_its_target(monitor, target, capsys):
    callback = ForecastCallback(monitor=monitor, min_epochs=5, patience=2, **target)
    trainer = run(callback, epochs=30)
    records = trainer.state.history.records
    assert 6 <= len(records) < 30  # at least min_epochs + patience - 1 epochs, then stopped
    assert trainer.state.should_stop and callback.stopped_epoch == records[-1]["epoch"]
    assert trainer.state.stop_reason.startswith(f"ForecastCallback: {monitor} at epoch 30 cannot reach the target")
    last = records[-1]
    optimistic = last[f"forecast_{monitor}_high"] if "stop_if_below" in target else last[f"forecast_{monitor}_low"]
    assert (optimistic < 0.95) if "stop_if_below" in target else (optimistic > 0.2)
    out = capsys.readouterr().out
    assert f"ForecastCallback: stopping at epoch {len(records)} of 30" in out and "Saves" in out


def test_logs_forecasts_without_a_target(tmp_path):
    callback = ForecastCallback(monitor="val_acc", min_epochs=5)
    trainer = run(callback, epochs=20)
    records = trainer.state.history.records
    assert len(records) == 20 and not trainer.state.should_stop
    assert all("forecast_val_acc" not in r for r in records[:4])  # fewer than min_epochs values
    logged = [r for r in records if "forecast_val_acc" in r]
    assert len(logged) >= 10 and [f["epoch"] for f in callback.forecasts] == [r["epoch"] for r in logged]
    for r in logged:
        assert 0.0 <= r["forecast_val_acc_low"] <= r["forecast_val_acc"] <= r["forecast_val_acc_high"] <= 1.0
    late = logged[-1]  # made at epoch 19 for epoch 20: a short, well-supported extrapolation
    assert late["forecast_val_acc_low"] <= records[-1]["val_acc"] <= late["forecast_val_acc_high"]
    header = trainer.state.history.to_csv(tmp_path / "history.csv").read_text().splitlines()[0]
    assert "forecast_val_acc,forecast_val_acc_low,forecast_val_acc_high" in header  # loggers see the keys


def fake_trainer(values, lrs=None, max_epochs=40):
    records = [{"epoch": i + 1, "lr": 0.1 if lrs is None else lrs[i], "val_acc": v} for i, v in enumerate(values)]
    return SimpleNamespace(state=SimpleNamespace(history=History(records), max_epochs=max_epochs,
                                                 should_stop=False, stop_reason=None), print=print)


def step_curve(epochs):
    e = np.asarray(epochs, float)
    return np.where(e <= 20, 0.8 - 0.6 * e ** -0.7, 0.8 - 0.6 * 20 ** -0.7 + 0.1 * (1 - np.exp(-0.5 * (e - 20))))


def test_uses_the_records_lr_to_fit_after_a_drop():
    epochs = np.arange(1, 31)
    trainer = fake_trainer(step_curve(epochs).tolist(), lrs=np.where(epochs <= 20, 0.1, 0.01).tolist(), max_epochs=60)
    callback = ForecastCallback(monitor="val_acc")
    callback.after_epoch(trainer)
    assert callback.last.segment_start == 21
    assert trainer.state.history.records[-1]["forecast_val_acc"] == pytest.approx(step_curve(60), abs=0.01)
    blind = ForecastCallback(monitor="val_acc", use_lr=False)
    blind.after_epoch(trainer)
    assert blind.last.segment_start == 1


def test_a_refused_forecast_logs_nothing_and_never_stops():
    trainer = fake_trainer([0.25] * 8)  # constant: no trend to extend
    callback = ForecastCallback(monitor="val_acc", stop_if_below=0.9, patience=1)
    callback.after_epoch(trainer)
    assert "forecast_val_acc" not in trainer.state.history.records[-1]
    assert callback.last_error.startswith("cannot forecast:") and not trainer.state.should_stop


def test_hopeless_compares_the_optimistic_end():
    up = Forecast(0.60, 0.55, 0.66, 40, "max", 0.9, {}, [], [], 1.0)
    assert hopeless(up, stop_if_below=0.7).startswith("even the optimistic end of the 90% interval, 0.66")
    assert hopeless(up, stop_if_below=0.65) is None and hopeless(up) is None
    down = Forecast(0.30, 0.25, 0.40, 40, "min", 0.9, {}, [], [], 1.0)
    assert "0.25, is above the target 0.2" in hopeless(down, stop_if_above=0.2)
    assert hopeless(down, stop_if_above=0.26) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"monitor": "val_loss", "stop_if_below": 0.1}, "stop_if_below=...\\) needs mode='max'.*pass stop_if_above"),
    ({"monitor": "val_acc", "stop_if_above": 0.1}, "stop_if_above=...\\) needs mode='min'.*pass stop_if_below"),
    ({"min_epochs": 3}, "min_epochs=3\\): expected an integer >= 4"),
    ({"mode": "up"}, 'mode="up"'),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ForecastCallback(**kwargs)


def test_missing_monitor_names_the_available_keys():
    trainer = fake_trainer([0.1, 0.2])
    with pytest.raises(ConfigError, match='"val_accuracy", which no loader produces.*Did you mean "val_acc"'):
        ForecastCallback(monitor="val_accuracy").after_epoch(trainer)


def test_state_dict_round_trip():
    callback = ForecastCallback()
    callback.forecasts, callback.strikes, callback.stopped_epoch = [{"epoch": 5, "value": 0.5}], 1, None
    restored = ForecastCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.state_dict() == callback.state_dict() and ForecastCallback.order == -5


def plateau(n: int) -> list[float]:
    """A run that has flattened near 0.6: no forecast can reach 0.9."""
    return [0.6 - 0.3 * np.exp(-e / 2) for e in range(1, n + 1)]


def test_an_unreliable_forecast_never_stops_the_run():
    trainer = fake_trainer(plateau(6))  # 6 points: below the 8 a firm forecast needs
    callback = ForecastCallback(monitor="val_acc", stop_if_below=0.9, patience=1)
    callback.after_epoch(trainer)
    assert callback.last is not None and not callback.last.reliable and callback.last.high < 0.9
    assert not trainer.state.should_stop and callback.strikes == 0
    assert callback.forecasts[-1]["reliable"] is False
    assert "forecast_val_acc" in trainer.state.history.records[-1]  # still logged


def test_a_reliable_hopeless_forecast_stops_the_run(capsys):
    trainer = fake_trainer(plateau(12))
    callback = ForecastCallback(monitor="val_acc", stop_if_below=0.9, patience=1)
    callback.after_epoch(trainer)
    assert callback.last.reliable and trainer.state.should_stop and callback.stopped_epoch == 12
    out = capsys.readouterr().out
    assert "stopping at epoch 12 of 40" in out and "forecast to be" in out and "at epoch 40" in out


def test_unreliable_forecasts_between_reliable_ones_neither_count_nor_reset(monkeypatch):
    import adaptrain.callbacks.forecast as module

    real = module.forecast
    flags = iter([True, False, True])

    def flagged(*args, **kwargs):
        fc = real(*args, **kwargs)
        fc.reliable = next(flags)
        return fc

    monkeypatch.setattr(module, "forecast", flagged)
    callback = ForecastCallback(monitor="val_acc", stop_if_below=0.9, patience=2)
    trainer = fake_trainer(plateau(10))
    for n in (10, 11, 12):
        trainer.state.history = History([{"epoch": i + 1, "lr": 0.1, "val_acc": v} for i, v in enumerate(plateau(n))])
        callback.after_epoch(trainer)
    assert [f["reliable"] for f in callback.forecasts] == [True, False, True]
    assert callback.strikes == 2 and trainer.state.should_stop and callback.stopped_epoch == 12
