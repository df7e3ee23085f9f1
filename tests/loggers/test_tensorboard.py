"""TensorBoardLogger: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import sys

import pytest
import torch

from adaptrain import MissingExtraError, Trainer
from adaptrain.cli.main import main
from adaptrain.loggers import RunInfo, TensorBoardLogger
from adaptrain.loggers.run_dir import RunDir
from tests.cli_data import base_config, tiny_data, write_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402


def fit(logger, epochs=2):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                      max_epochs=epochs, callbacks=[logger], seed=0, log_every_n_steps=2, progress=False)
    train, val, _ = tiny_data()
    return trainer.fit(train, val)


def read(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_scalars_per_epoch_and_per_step_and_hparams(tmp_path):
    logger = TensorBoardLogger(log_dir=tmp_path / "tb")
    logger.bind(RunInfo(params={"optimizer.init_args.lr": 0.1, "trainer.max_epochs": 2, "scheduler": None,
                                "model.init_args.hidden": [64, 32]}))
    history = fit(logger)
    events = read(tmp_path / "tb")
    val_loss = events.Scalars("val_loss")
    assert [e.step for e in val_loss] == [1, 2]
    assert [e.value for e in val_loss] == pytest.approx(history["val_loss"])
    assert [e.step for e in events.Scalars("train_loss_step")] == [2, 4, 6, 8]  # optimizer steps
    assert [e.step for e in events.Scalars("lr_step")] == [2, 4, 6, 8]
    assert {"train_loss", "lr", "epoch_time"} <= set(events.Tags()["scalars"])
    content = events.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer.init_args.lr"].number_value == pytest.approx(0.1)
    assert start.hparams["scheduler"].string_value == "None"
    assert start.hparams["model.init_args.hidden"].string_value == "[64, 32]"
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"val_loss", "train_loss"} <= {m.name.tag for m in experiment.metric_infos}


def test_default_log_dir_is_in_the_run_folder(tmp_path):
    logger = TensorBoardLogger()
    logger.bind(RunInfo("exp", "run", RunDir(tmp_path, "exp", "run"), tmp_path))
    fit(logger, epochs=1)
    assert [e.step for e in read(tmp_path / "exp" / "run" / "tensorboard").Scalars("val_loss")] == [1]


def test_cli_logs_the_config_as_hparams(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml",
                          base_config(tmp_path / "runs", loggers={"tensorboard": {"flush_secs": 5}}))
    assert main(["fit", "--config", str(config), "run_name=tb"]) == 0
    log_dir = tmp_path / "runs" / "tiny" / "tb" / "tensorboard"
    assert f"tensorboard --logdir {log_dir}" in capsys.readouterr().out
    content = read(log_dir).PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["trainer.max_epochs"].number_value == 2
    assert start.hparams["model.class_path"].string_value == "torch.nn.Linear"


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'adaptrain\[tensorboard\]'"):
        TensorBoardLogger()
