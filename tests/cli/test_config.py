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
    assert config["criterion"] == {"class_path": "torch.nn.CrossEntropyLoss", "init_args": {}, "call": True}
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
    with pytest.raises(ConfigError, match=r'trainer\.max_epocs is not a known key; did you mean '
                                          r'"trainer\.max_epochs"\?'):
        load_config([config_file], ["trainer.max_epocs=3"])
    with pytest.raises(ConfigError, match=r'optimizer\.init_arg is not a known key; did you mean '
                                          r'"optimizer\.init_args"'):
        load_config([config_file], ["optimizer.init_arg.lr=3"])


@pytest.mark.parametrize("override, shown", [("trainer.auto_num_workers=2", "2"), ("trainer.auto=1", "1"),
                                              ("trainer.channels_last=\"yes\"", '"yes"'),
                                              ("data.pin_memory=0", "0")])
def test_true_false_keys_take_only_true_or_false(config_file, override, shown):
    """OmegaConf alone turns 2, 1, 0 or "yes" into a bool for a bool key; Trainer(...) refuses them, so must YAML."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as error:
        load_config([config_file], [override])
    assert str(error.value) == f"{COMMAND_LINE}: {key} is {shown}; expected true or false."
    section, name = key.split(".")
    value = override.split("=")[1]
    write_config(config_file, config_file.read_text().replace(f"{section}:\n", f"{section}:\n  {name}: {value}\n", 1))
    with pytest.raises(ConfigError) as from_file:
        load_config([config_file])
    assert str(from_file.value) == f"{config_file}: {key} is {shown}; expected true or false."


def test_a_required_true_false_key_is_filled_by_a_later_override(config_file):
    text = config_file.read_text()
    write_config(config_file, text.replace("trainer:\n", "trainer:\n  auto: ???\n", 1))
    assert load_config([config_file], ["trainer.auto=true"])["trainer"]["auto"] is True
    assert load_config([config_file])["trainer"]["auto"] is False  # merged over a default, ??? keeps it


def test_true_false_keys_accept_booleans_null_and_interpolations(config_file):
    config = load_config([config_file], ["trainer.auto_num_workers=true", "trainer.progress=false",
                                         "data.pin_memory=null", "trainer.auto=${trainer.compile}"])
    assert config["trainer"]["auto_num_workers"] is True and config["trainer"]["progress"] is False
    assert config["data"]["pin_memory"] is None and config["trainer"]["auto"] is False


def test_value_checks_after_merge(config_file):
    with pytest.raises(ConfigError, match=r'trainer\.precision is "fp8"; expected one of "32", "16-mixed", '
                                          r'"bf16-mixed"'):
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


# ---------------------------------------------------------------------- turning loggers off
LIST_FORM = ["mlflow", "tensorboard"]
MAPPING_FORM = {"mlflow": {"log_system_metrics": False}, "tensorboard": {}}


@pytest.mark.parametrize("form", [LIST_FORM, MAPPING_FORM], ids=["list", "mapping"])
@pytest.mark.parametrize(("overrides", "expected"), [
    (["loggers.mlflow=false"], ["CSVLogger", "TensorBoardLogger"]),
    (["loggers.tensorboard=false"], ["CSVLogger", "MLflowLogger"]),
    (["loggers.mlflow=false", "loggers.tensorboard=false"], ["CSVLogger"]),
    (["loggers=null"], ["CSVLogger"]),  # the documented way to turn every optional logger off
    (["loggers=[]"], ["CSVLogger"]),
    (["loggers={}"], ["CSVLogger"]),  # replaces the section: it does not merge into it (and change nothing)
    (["loggers=[tensorboard]"], ["CSVLogger", "TensorBoardLogger"]),
    ([], ["CSVLogger", "MLflowLogger", "TensorBoardLogger"]),
], ids=["mlflow-off", "tensorboard-off", "both-off", "null", "empty-list", "empty-mapping", "replaced", "as-written"])
def test_loggers_turn_off_from_the_command_line_in_either_form(tmp_path, form, overrides, expected):
    from adaptrain.cli.experiment import build

    path = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers=form))
    built = build(load_config([path], overrides), "fit")
    assert [type(logger).__name__ for logger in built.loggers] == expected
    assert not (tmp_path / "runs").exists()  # building writes nothing


def test_a_list_of_loggers_is_addressed_by_name(tmp_path):
    """``loggers.<name>...`` on the list form: the list becomes the mapping form; specs keep their index."""
    form = ["mlflow", {"tensorboard": {"flush_secs": 5}}, {"class_path": "adaptrain.loggers.CSVLogger"}]
    path = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers=form))
    config = load_config([path], ["loggers.mlflow.log_artifacts=false"])
    assert config["loggers"] == {"mlflow": {"log_artifacts": False}, "tensorboard": {"flush_secs": 5},
                                 "2": {"class_path": "adaptrain.loggers.CSVLogger"}}
    assert load_config([path], ["loggers.0=false"])["loggers"][0] is False  # by index, still a list


def test_loggers_off_end_to_end_leaves_no_mlflow_store(tmp_path, capsys, monkeypatch):
    from adaptrain.cli.main import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = base_config(tmp_path / "runs", loggers=["mlflow"])
    config["trainer"]["max_epochs"] = 1
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["fit", "--config", str(path), "loggers.mlflow=false", "run_name=quiet"]) == 0, capsys.readouterr().err
    assert (tmp_path / "runs/tiny/quiet/history.csv").is_file()  # the CSV logger is always on
    assert not (tmp_path / "runs/mlflow.db").exists() and "mlflow: run" not in capsys.readouterr().out


def test_loggers_listed_in_one_file_and_mapped_in_another_merge(tmp_path):
    first = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers=["mlflow"]))
    second = write_config(tmp_path / "more.yaml", "loggers: {tensorboard: {}, mlflow: {log_artifacts: false}}\n")
    assert load_config([first, second])["loggers"] == {"mlflow": {"log_artifacts": False}, "tensorboard": {}}
    assert load_config([second, first])["loggers"] == {"mlflow": True, "tensorboard": {}}
