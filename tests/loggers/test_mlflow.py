"""MLflowLogger against a real MLflow store on disk (sqlite), read back with MlflowClient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptrain import Callback, MissingExtraError, Trainer
from adaptrain.cli.main import main
from adaptrain.loggers import CSVLogger, MLflowLogger, RunInfo
from adaptrain.loggers.run_dir import create_run_dir
from tests.cli_data import base_config, mlflow_store, tiny_data, write_config

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return mlflow_store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


class FakeCheckpoint(Callback):
    """Stands in for ModelCheckpoint: reports a best checkpoint file."""

    def __init__(self, path: Path) -> None:
        self.best_model_path = str(path)

    def before_fit(self, trainer):
        torch.save(trainer.model.state_dict(), self.best_model_path)


def fit(loggers, tmp_path, epochs=2, extra=()):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                      max_epochs=epochs, callbacks=[*loggers, *extra], seed=0, log_every_n_steps=2, progress=False)
    train, val, _ = tiny_data()
    return trainer, trainer.fit(train, val)


def test_params_metrics_artifacts_and_system_metrics(tracking_uri, tmp_path):
    run = create_run_dir(tmp_path, "mlflow-test", "r1")
    run.config.write_text("trainer:\n  max_epochs: 2\n")
    info = RunInfo("mlflow-test", "r1", run, tmp_path, {"trainer.max_epochs": 2, "optimizer.init_args.lr": 0.1,
                                                          "trainer.gradient_clip_val": None, "callbacks": []})
    csv_logger, logger = CSVLogger(), MLflowLogger(tracking_uri=tracking_uri)
    for lg in (csv_logger, logger):
        lg.bind(info)
    _, history = fit([csv_logger, logger], tmp_path, extra=[FakeCheckpoint(tmp_path / "best.ckpt")])

    client = MlflowClient(tracking_uri)
    got = client.get_run(logger.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "r1"
    assert got.data.params == {"trainer.max_epochs": "2", "optimizer.init_args.lr": "0.1",
                               "trainer.gradient_clip_val": "null", "callbacks": "[]"}
    assert got.data.tags["adaptrain.run_dir"] == str(run.path.resolve())
    assert client.get_experiment(got.info.experiment_id).name == "mlflow-test"
    per_epoch = client.get_metric_history(logger.run_id, "val_loss")
    assert [(m.step, m.value) for m in per_epoch] == [(1, pytest.approx(history.records[0]["val_loss"])),
                                                     (2, pytest.approx(history.records[1]["val_loss"]))]
    # 4 train batches per epoch, refresh every 2: optimizer steps 2, 4, 6, 8
    assert [m.step for m in client.get_metric_history(logger.run_id, "train_loss_step")] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(logger.run_id, "lr_step")] == [2, 4, 6, 8]
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"config.yaml", "history.csv", "history.json", "history.png", "train.log", "checkpoints"} <= artifacts
    assert [a.path for a in client.list_artifacts(logger.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    # System metrics: one synchronous sample per epoch end (no sampling thread, so none is ever missing).
    system = {key for key in got.data.metrics if key.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage", "system/process_memory_rss_megabytes"} <= system
    for key in system:
        assert [m.step for m in client.get_metric_history(logger.run_id, key)] == [1, 2], key
    cpu = [m.value for m in client.get_metric_history(logger.run_id, "system/cpu_utilization_percentage")]
    assert all(0 <= value <= 100 for value in cpu)
    assert got.data.metrics["system/process_memory_rss_megabytes"] > 10  # this process holds torch


def test_failed_run_is_marked_failed(tracking_uri, tmp_path):
    class Boom(Callback):
        order = 95  # after the logger recorded the epoch

        def after_epoch(self, trainer):
            raise RuntimeError("boom")

    logger = MLflowLogger(tracking_uri=tracking_uri, log_system_metrics=False)
    with pytest.raises(Exception, match="boom"):
        fit([logger], tmp_path, extra=[Boom()])
    run = MlflowClient(tracking_uri).get_run(logger.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in MlflowClient(tracking_uri).get_metric_history(logger.run_id, "train_loss")] == [1]


def test_without_psutil_system_metrics_are_skipped_with_a_warning(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    logger = MLflowLogger(tracking_uri=tracking_uri)
    with pytest.warns(RuntimeWarning, match="system metrics are off.*psutil"):
        fit([logger], tmp_path, epochs=1)
    run = MlflowClient(tracking_uri).get_run(logger.run_id)
    assert run.info.status == "FINISHED" and not [k for k in run.data.metrics if k.startswith("system/")]


def test_tracking_uri_from_the_environment(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    logger = MLflowLogger(experiment="from-env", log_system_metrics=False)
    fit([logger], tmp_path, epochs=1)
    assert MlflowClient(tracking_uri).get_run(logger.run_id).data.params["max_epochs"] == "1"  # trainer defaults


def test_cli_default_store_is_inside_the_run_root(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow_store(tmp_path / "runs" / "mlflow.db")  # migrated already: the test checks where the logger looks
    loggers = {"mlflow": {"log_system_metrics": False}}
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers=loggers))
    assert main(["fit", "--config", str(config), "run_name=cli", "optimizer.init_args.lr=0.05"]) == 0
    out = capsys.readouterr().out
    db = tmp_path / "runs" / "mlflow.db"
    assert f"in sqlite:///{db}" in out
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.params["optimizer.init_args.lr"] == "0.05"
    assert run.data.params["model.class_path"] == "torch.nn.Linear"
    assert run.data.params["run_name"] == "cli" and run.data.metrics["val_acc"] >= 0
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())  # not ./mlruns


def test_missing_extra_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` does when it is not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'adaptrain\[mlflow\]'"):
        MLflowLogger()
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers=["mlflow"]))
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "loggers.0" in err and "pip install 'adaptrain[mlflow]'" in err
    assert not (tmp_path / "runs").exists()


def test_import_adaptrain_does_not_import_mlflow_or_tensorboard():
    code = ("import sys, adaptrain, adaptrain.cli.main, adaptrain.loggers, adaptrain.cli.experiment; "
            "bad = [m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
