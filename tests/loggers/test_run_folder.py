"""One fit, one run folder: CSV, MLflow and TensorBoard loggers from Python share it.

Real components: an MLflow sqlite store read back with MlflowClient, TensorBoard event files read
back with EventAccumulator. The clock that names run folders is replaced by a counter, so "two
loggers a second apart" happens on every run instead of by chance.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from adaptrain import Callback, ModelCheckpoint, Trainer
from adaptrain.loggers import CSVLogger, MLflowLogger, TensorBoardLogger, base, run_dir
from tests.cli_data import mlflow_store, tiny_data

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.fixture
def ticking_clock(monkeypatch, tmp_path):
    """Every call for a run name gets a later time, and the run root is a fresh folder."""
    ticks = (f"20260101-0000{second:02d}" for second in itertools.count())
    monkeypatch.setattr(run_dir, "default_run_name", lambda now=None: next(ticks))
    monkeypatch.setattr(base, "default_run_name", lambda now=None: next(ticks), raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def fit(loggers, epochs=2, model=None, extra=(), run_dir_=None, ckpt_path=None):
    torch.manual_seed(0)
    model = model or torch.nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                      max_epochs=epochs, callbacks=[*loggers, *extra], seed=0, log_every_n_steps=2, progress=False)
    if run_dir_ is not None:
        trainer.run_dir = run_dir_
    train, val, _ = tiny_data()
    trainer.fit(train, val, ckpt_path=ckpt_path)
    return trainer


def events(folder):
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def all_runs(uri):
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def test_one_fit_makes_one_folder_that_every_logger_uses(ticking_clock):
    uri = mlflow_store(ticking_clock / "runs" / "mlflow.db")
    mlflow_logger = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    fit([CSVLogger(), mlflow_logger, TensorBoardLogger()])
    (folder,) = [p for p in (ticking_clock / "runs" / "default").iterdir()]  # one folder, not one per logger
    names = {p.name for p in folder.iterdir()}
    assert {"history.csv", "train.log", "history.png", "tensorboard", "mlflow.json"} <= names
    assert [e.step for e in events(folder / "tensorboard").Scalars("val_loss")] == [1, 2]
    stored = json.loads((folder / "mlflow.json").read_text())
    assert stored["run_id"] == mlflow_logger.run_id and stored["tracking_uri"] == uri
    got = MlflowClient(uri).get_run(mlflow_logger.run_id)
    assert got.info.run_name == folder.name and got.data.tags["adaptrain.run_dir"] == str(folder.resolve())
    assert "history.csv" in {a.path for a in MlflowClient(uri).list_artifacts(mlflow_logger.run_id)}


def test_a_csv_run_dir_is_shared_with_the_other_loggers(ticking_clock):
    fit([CSVLogger(run_dir=ticking_clock / "exp" / "mine"), TensorBoardLogger()], epochs=1)
    assert [e.step for e in events(ticking_clock / "exp" / "mine" / "tensorboard").Scalars("val_loss")] == [1]
    assert not (ticking_clock / "runs").exists()


def test_mlflow_alone_makes_no_folder(ticking_clock):
    uri = mlflow_store(ticking_clock / "store" / "mlflow.db")
    logger = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    fit([logger], epochs=1)
    assert not (ticking_clock / "runs").exists()
    assert MlflowClient(uri).get_run(logger.run_id).info.status == "FINISHED"


def test_a_fit_failing_before_its_first_step_leaves_nothing(ticking_clock):
    uri = mlflow_store(ticking_clock / "store" / "mlflow.db")
    with pytest.raises(RuntimeError, match="the model"):
        fit([CSVLogger(), MLflowLogger(tracking_uri=uri, log_system_metrics=False), TensorBoardLogger()],
            model=torch.nn.Linear(5, 3))  # the data has 8 features
    assert not (ticking_clock / "runs").exists()
    assert all_runs(uri) == []  # no FAILED run


def test_a_failure_after_the_first_step_keeps_the_traceback(ticking_clock):
    class Boom(Callback):
        def after_step(self, trainer):
            if trainer.state.global_step == 3:
                raise ValueError("step three went wrong")

    uri = mlflow_store(ticking_clock / "store" / "mlflow.db")
    logger = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    with pytest.raises(Exception, match="step three went wrong"):
        fit([CSVLogger(), logger], extra=[Boom()])
    (folder,) = list((ticking_clock / "runs" / "default").iterdir())
    log = (folder / "train.log").read_text()
    assert "Traceback (most recent call last):" in log and "ValueError: step three went wrong" in log
    assert MlflowClient(uri).get_run(logger.run_id).info.status == "FAILED"


def test_a_resume_into_the_same_folder_continues_the_mlflow_run(ticking_clock):
    uri = mlflow_store(ticking_clock / "store" / "mlflow.db")
    folder = ticking_clock / "runs" / "exp" / "r"
    first = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    fit([CSVLogger(), first], extra=[ModelCheckpoint()], run_dir_=folder)
    second = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    fit([CSVLogger(), second], epochs=3, extra=[ModelCheckpoint()], run_dir_=folder, ckpt_path="last")
    assert second.run_id == first.run_id and len(all_runs(uri)) == 1
    assert [m.step for m in MlflowClient(uri).get_metric_history(first.run_id, "val_loss")] == [1, 2, 3]
    # A fit that starts from scratch in the same folder is a new run.
    third = MLflowLogger(tracking_uri=uri, log_system_metrics=False)
    fit([CSVLogger(), third], epochs=1, run_dir_=folder)
    assert third.run_id != first.run_id and json.loads((folder / "mlflow.json").read_text())["run_id"] == third.run_id
