"""`adaptrain forecast` on a history the project itself writes: a real run with OneCycleLR (the demo's setup)."""

from __future__ import annotations

import functools

import pytest
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import Trainer
from adaptrain.cli.main import main
from adaptrain.core.history import History
from adaptrain.tuning.forecast_checks import last_lr_drop

EPOCHS = 12


@pytest.fixture(scope="module")
def onecycle_history(tmp_path_factory):
    """history.csv of a short real run: AdamW + OneCycleLR given as a factory, as examples/mnist1d_demo.py does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    y[torch.rand(320, generator=g) < 0.2] = 0  # some label noise: accuracy keeps a curve, not a jump to 1.0
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.02), nn.CrossEntropyLoss(),
                      metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")},
                      scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.02),
                      max_epochs=EPOCHS, seed=0, progress=False, device="cpu")
    history = trainer.fit(train, val)
    return history.to_csv(tmp_path_factory.mktemp("demo") / "history.csv")


def test_the_run_really_ends_in_a_steep_anneal(onecycle_history):
    lrs = [float(r["lr"]) for r in History.from_csv(onecycle_history).records]
    assert len(lrs) == EPOCHS and lrs[-1] < 0.5 * lrs[-2] < 0.5 * lrs[-3]  # falls by more than half, twice
    assert last_lr_drop(lrs) is None  # an anneal, not a step drop


@pytest.mark.parametrize("metric", ["val_acc", "val_loss"])
def test_cli_forecasts_a_onecycle_history(onecycle_history, metric, capsys, tmp_path):
    plot = tmp_path / "forecast.png"
    code = main(["forecast", str(onecycle_history), "--metric", metric, "--at", str(2 * EPOCHS), "--plot", str(plot)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith(f"{metric} at epoch {2 * EPOCHS}: ") and f"fitted on epochs 1-{EPOCHS}" in out
    assert "dropped" not in out and plot.stat().st_size > 10_000
    assert "unreliable: the learning rate has annealed" in out  # asked past the end of its schedule
    value = float(out.split(": ", 1)[1].split()[0])
    last = float(History.from_csv(onecycle_history).records[-1][metric])
    assert abs(value - last) < 0.5 * max(last, 0.1)  # the annealed run has flattened: near its last value


def test_cli_says_when_a_forecast_is_unreliable(tmp_path, capsys):
    path = tmp_path / "history.csv"
    path.write_text("epoch,val_acc\n" + "".join(f"{e},{0.5 + 0.05 * e}\n" for e in range(1, 7)))
    assert main(["forecast", str(path), "--metric", "val_acc", "--at", "60"]) == 0
    out = capsys.readouterr().out
    assert "unreliable: only 6 points in the fitted segment" in out
