"""Config loading: schema defaults, merging files, typed overrides, interpolation, error wording."""

from __future__ import annotations

import pytest

from adaptrain.cli.config import COMMAND_LINE, flatten, load_config, to_yaml
from adaptrain.errors import ConfigError
from tests.cli_data import base_config, write_config


@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))


def test_defaults_fill_every_section(config_file):
    config = load_config([config_file])
    assert config["optimizer"]["class_path"] == "torch.optim.SGD"
    assert config["criterion"] == {"class_path": "torch.nn.CrossEntropyLoss", "init_args": {}}
    assert config["scheduler"] is None and config["callbacks"] == [] and config["loggers"] is None
    assert config["trainer"]["precision"] == "32" and config["trainer"]["accumulate_grad_batches"] == 1
    assert config["run_name"] is None and config["ckpt_path"] is None


def test_overrides_are_typed_like_yaml(config_file):
    config = load_config([config_file], ["trainer.max_epochs=3", "optimizer.init_args.lr=1e-3",
                                         "trainer.gradient_clip_val=1", "model.init_args.bias=false",
                                         "trainer.seed=null", "callbacks=[]", "experiment=lr-sweep"])
    assert config["trainer"]["max_epochs"] == 3
    assert config["optimizer"]["init_args"]["lr"] == pytest.approx(1e-3)
    assert config["trainer"]["gradient_clip_val"] == 1.0 and isinstance(config["trainer"]["gradient_clip_val"], float)
    assert config["model"]["init_args"]["bias"] is False and config["trainer"]["seed"] is None
    assert config["experiment"] == "lr-sweep"


def test_override_fills_a_null_section(config_file):
    config = load_config([config_file], ["scheduler.class_path=torch.optim.lr_scheduler.StepLR",
                                         "scheduler.init_args.step_size=2", "scheduler.interval=epoch"])
    assert config["scheduler"] == {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 2},
                                   "interval": "epoch", "monitor": None}


def test_override_a_list_item(tmp_path):
    path = write_config(tmp_path / "run.yaml", base_config(tmp_path, callbacks=[
        {"class_path": "adaptrain.EarlyStopping", "init_args": {"patience": 3}}]))
    assert load_config([path], ["callbacks.0.init_args.patience=7"])["callbacks"][0]["init_args"]["patience"] == 7


def test_later_files_win(tmp_path, config_file):
    second = write_config(tmp_path / "fast.yaml", "trainer:\n  max_epochs: 9\n")
    config = load_config([config_file, second])
    assert config["trainer"]["max_epochs"] == 9 and config["trainer"]["seed"] == 0  # merged, not replaced


def test_environment_interpolation(tmp_path, monkeypatch):
    config = base_config(tmp_path)
    config["root_dir"] = "${oc.env:ADAPTRAIN_TEST_ROOT,runs}"
    config["trainer"]["max_epochs"] = "${oc.env:ADAPTRAIN_TEST_EPOCHS,4}"
    path = write_config(tmp_path / "run.yaml", config)
    monkeypatch.delenv("ADAPTRAIN_TEST_ROOT", raising=False)
    monkeypatch.delenv("ADAPTRAIN_TEST_EPOCHS", raising=False)
    assert load_config([path])["root_dir"] == "runs"
    monkeypatch.setenv("ADAPTRAIN_TEST_ROOT", "/data/runs")
    monkeypatch.setenv("ADAPTRAIN_TEST_EPOCHS", "12")
    resolved = load_config([path])
    assert resolved["root_dir"] == "/data/runs" and resolved["trainer"]["max_epochs"] == 12


def test_errors_name_the_file_or_the_command_line(config_file):
    with pytest.raises(ConfigError) as from_override:
        load_config([config_file], ["trainer.max_epochs=abc"])
    assert str(from_override.value) == f'{COMMAND_LINE}: trainer.max_epochs is "abc"; expected an integer.'
    write_config(config_file, config_file.read_text().replace("max_epochs: 2", "max_epochs: two"))
    with pytest.raises(ConfigError) as from_file:
        load_config([config_file])
    assert str(from_file.value) == f'{config_file}: trainer.max_epochs is "two"; expected an integer.'
    assert from_file.value.field == "trainer.max_epochs" and from_file.value.source == str(config_file)


def test_unknown_key_suggests_the_close_one(config_file):
    with pytest.raises(ConfigError, match=r'trainer\.max_epocs is not a known key; did you mean "trainer\.max_epochs"\?'):
        load_config([config_file], ["trainer.max_epocs=3"])
    with pytest.raises(ConfigError, match=r'optimizer\.init_arg is not a known key; did you mean "optimizer\.init_args"'):
        load_config([config_file], ["optimizer.init_arg.lr=3"])


def test_value_checks_after_merge(config_file):
    with pytest.raises(ConfigError, match=r'trainer\.precision is "fp8"; expected one of "32", "16-mixed", "bf16-mixed"'):
        load_config([config_file], ["trainer.precision=fp8"])
    with pytest.raises(ConfigError, match=r"metrics\.acc\.class_path is null"):
        load_config([config_file], ["metrics.acc.class_path=null"])


def test_yaml_round_trip_and_flatten(config_file):
    config = load_config([config_file], ["trainer.max_epochs=5"])
    again = load_config([write_config(config_file.with_name("again.yaml"), to_yaml(config))])
    assert again == config
    flat = flatten(config)
    assert flat["trainer.max_epochs"] == 5 and flat["model.init_args.in_features"] == 8
    assert flat["callbacks"] == [] and "metrics.acc.init_args.num_classes" in flat
