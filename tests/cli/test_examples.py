"""The example configs in examples/ run end to end (a short run each, overridden on the command line)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from adaptrain.cli.main import main
from tests.cli_data import mlflow_store

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CASES = [  # config, extra overrides, the metric to check, its floor after those epochs (chance: 0.1)
    # MNIST-1D: 2,000 sequences instead of 5,000, so the test stays a few seconds on 2 cores.
    ("mnist1d_cnn.yaml", ["trainer.max_epochs=2", "data.init_args.num_samples=2000"], "val_acc", 0.25),
    ("digits_mlp.yaml", ["trainer.max_epochs=2"], "val_acc", 0.8),
    ("digits_multi_io.yaml", ["trainer.max_epochs=2"], "val_digit_acc", 0.8),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, metric, floor", CASES, ids=[c[0] for c in CASES])
def test_example_trains(name, overrides, metric, floor, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow_store(tmp_path / "mlflow.db")  # the default store (root_dir/mlflow.db), migrated once per session
    code = main(["fit", "--config", str(EXAMPLES / name), *overrides, f"root_dir={tmp_path}",
                 "run_name=example", "trainer.progress=false"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (folder,) = tmp_path.glob("*/example")
    rows = list(csv.DictReader(open(folder / "history.csv")))
    assert len(rows) == 2 and float(rows[-1][metric]) > floor, rows[-1]
    assert (folder / "config.yaml").is_file() and (folder / "train.log").is_file()
    if name == "digits_mlp.yaml":  # ModelCheckpoint + MLflow: the best checkpoint is uploaded
        from mlflow.tracking import MlflowClient

        assert (folder / "checkpoints" / "last.ckpt").is_file()
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
        uploaded = [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "checkpoints")]
        assert len(uploaded) == 1 and uploaded[0].startswith("checkpoints/epoch=")


def test_multi_io_records_per_output_losses_and_metrics(tmp_path, capsys):
    code = main(["fit", "--config", str(EXAMPLES / "digits_multi_io.yaml"), "trainer.max_epochs=1",
                 f"root_dir={tmp_path}", "run_name=m", "loggers=null", "trainer.progress=false"])
    assert code == 0, capsys.readouterr().err
    header = next(csv.reader(open(tmp_path / "digits-multi-io" / "m" / "history.csv")))
    assert {"train_loss_digit", "train_loss_odd", "val_digit_acc", "val_odd_acc"} <= set(header)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_example_configs_resolve(name, capsys, monkeypatch):
    monkeypatch.setenv("ADAPTRAIN_ROOT", "/tmp/adaptrain-example-root")
    assert main(["fit", "--config", str(EXAMPLES / name), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "class_path: adaptrain.models." in out
    if name == "mnist1d_cnn.yaml":
        assert "root_dir: /tmp/adaptrain-example-root" in out  # ${oc.env:ADAPTRAIN_ROOT,runs}


def test_make_demo_script_runs_end_to_end(tmp_path, monkeypatch):
    """The script behind `make demo`, shortened to 2 epochs: run folder, plot, weights, test accuracy."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "examples" / "mnist1d_demo.py"
    spec = importlib.util.spec_from_file_location("mnist1d_demo", script)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    monkeypatch.chdir(tmp_path)
    accuracy = demo.main(epochs=2)
    (run,) = (tmp_path / "runs" / "demo").iterdir()
    assert {p.name for p in run.iterdir()} >= {"history.csv", "history.json", "history.png", "model.safetensors",
                                               "checkpoints"}
    assert 0.3 < accuracy <= 1.0  # 2 epochs already beat chance (0.1) by far
