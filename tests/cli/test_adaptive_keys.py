"""The adaptive batch-size keys from YAML: the search runs, and what it chose reaches the run folder and MLflow."""

from __future__ import annotations

import json

import pytest

from adaptrain.cli.main import main
from tests.cli_data import base_config, mlflow_store, write_config


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_yaml_adaptive_batch_size_and_micro_batch_size_reach_the_run_folder_and_mlflow(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = mlflow_store(tmp_path / "mlflow.db")
    config = base_config(tmp_path / "runs", loggers={"mlflow": {"tracking_uri": uri, "log_system_metrics": False}})
    config["data"] = {"class_path": "tests.cli_data.tiny_dict", "batch_size": 8}
    config["trainer"].update(adaptive_batch_size={"mode": "full", "max_batch_size": 32, "max_trials": 5},
                             micro_batch_size="auto")
    code, out, err = run(["fit", "--config", write_config(tmp_path / "run.yaml", config), "run_name=adapt"], capsys)
    assert code == 0, err
    assert "adaptrain: batch size 8 ->" in out or "adaptrain: batch size 8 kept" in out
    folder = tmp_path / "runs" / "tiny" / "adapt"
    kinds = [entry["kind"] for entry in json.loads((folder / "adaptations.json").read_text())]
    assert kinds == ["batch_size", "micro_batch_size"]
    chosen = json.loads((folder / "adaptations.json").read_text())[0]["after"]
    assert 8 <= chosen <= 32
    client = MlflowClient(uri)
    run_info, = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run_info.data.params["adapted.batch_size"] == str(chosen)
    assert "adapted.lr" in run_info.data.params


@pytest.mark.parametrize("override, expected", [
    ("trainer.adaptive_batch_size=medium", 'trainer.adaptive_batch_size is "medium"; expected null, "safe", "full"'),
    ("trainer.micro_batch_size=0", 'trainer.micro_batch_size is 0; expected null, "auto" or an integer >= 1'),
    ("trainer.auto_num_workers=maybe", "trainer.auto_num_workers"),
])
def test_bad_adaptive_keys_exit_2_naming_the_key(tmp_path, capsys, override, expected):
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))
    code, _, err = run(["fit", "--config", config, override], capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "runs").exists()
