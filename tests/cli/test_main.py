"""The adaptrain command line, run in-process through ``main(argv)`` (one real subprocess at the end)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adaptrain import Callback
from adaptrain.cli.main import main
from tests.cli_data import base_config, edit, tiny_datasets, write_config


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir()) if root.exists() else []


@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs"))


# ---------------------------------------------------------------------- bad configs


BAD_CONFIGS = [  # id, edit of the base config (or raw YAML text), overrides, what the message must name
    ("file-not-found", "MISSING", [], "--config"),
    ("yaml-syntax", "model: {class_path: torch.nn.Linear\ndata: [1, 2\n", [], "line 2"),
    ("top-level-list", "- model\n- data\n", [], "(top level)"),
    ("unknown-top-level-key", edit(modle={"class_path": "x"}), [], 'modle is not a known key; did you mean "model"'),
    ("unknown-trainer-key", None, ["trainer.max_epocs=3"], 'did you mean "trainer.max_epochs"'),
    ("wrong-type-override", None, ["trainer.max_epochs=abc"], 'trainer.max_epochs is "abc"; expected an integer'),
    ("wrong-type-in-file", edit(**{"trainer.gradient_clip_val": "big"}), [], "trainer.gradient_clip_val"),
    ("wrong-bool", None, ["trainer.compile=maybe"], "trainer.compile"),
    ("bad-choice", None, ["trainer.precision=fp8"], "trainer.precision"),
    ("out-of-range", None, ["trainer.max_epochs=0"], "trainer.max_epochs is 0; expected an integer >= 1"),
    ("override-without-equals", None, ["trainer.max_epochs"], '"trainer.max_epochs" is not an override'),
    ("missing-model", edit(model=None), [], "model is missing"),
    ("section-not-a-mapping", edit(model="torch.nn.Linear"), [], "model is"),
    ("missing-class-path", edit(**{"model.class_path": None}), [], "model.class_path is missing"),
    ("unimportable-module", None, ["model.class_path=no_such_pkg.Net"], 'no module named "no_such_pkg"'),
    ("attribute-typo", None, ["model.class_path=adaptrain.models.MNIST1DCnn"], '"adaptrain.models.MNIST1DCNN"'),
    ("unknown-init-arg", None, ["model.init_args.in_feature=8"],
     'model.init_args.in_feature is not an argument of torch.nn.Linear; did you mean "in_features"'),
    ("missing-init-arg", edit(**{"model.init_args": {"in_features": 8}}), [], "model.init_args misses out_features"),
    ("constructor-raises", None, ["model.init_args.out_features=-3"], "model could not be built"),
    ("args-of-another-class", None, ["model.class_path=torch.optim.SGD"],
     "model.init_args.in_features is not an argument of torch.optim.SGD"),
    ("built-wrong-type", None, ["model.class_path=collections.OrderedDict", "model.init_args={}"],
     "model.class_path built a OrderedDict; expected a torch.nn.Module"),
    ("optimizer-unknown-arg", None, ["optimizer.init_args.learning_rate=0.1"], "optimizer.init_args.learning_rate"),
    ("scheduler-missing-arg", None, ["scheduler.class_path=torch.optim.lr_scheduler.StepLR"],
     "scheduler.init_args misses step_size"),
    ("scheduler-interval", None, ["scheduler.class_path=torch.optim.lr_scheduler.StepLR",
                                  "scheduler.init_args.step_size=1",
                                  "scheduler.interval=sometimes"], "scheduler.interval"),
    ("callback-not-a-callback", edit(callbacks=[{"class_path": "torch.nn.ReLU"}]), [],
     "callbacks.0.class_path built a ReLU"),
    ("callback-bad-arg",
     edit(callbacks=[{"class_path": "adaptrain.EarlyStopping", "init_args": {"patience": 0}}]), [],
     "callbacks.0 could not be built"),
    ("metric-bad-path", None, ["metrics.acc.class_path=torchmetrics.Acuracy"], "metrics.acc.class_path"),
    ("criterion-nested-typo", edit(criterion={"class_path": "adaptrain.MultiLoss", "init_args": {
        "losses": {"a": {"class_path": "torch.nn.CrossEntropyLos"}}}}), [], "criterion.init_args.losses.a.class_path"),
    ("unknown-logger", None, ["loggers.mlfow={}"], 'loggers.mlfow names no logger; did you mean "mlflow"'),
    ("logger-option-typo", None, ["loggers.mlflow.tracking_url=x"], 'loggers.mlflow.tracking_url is not an argument'),
    ("data-batch-size-range", None, ["data.batch_size=0"], "data.batch_size is 0"),
    ("data-option-unused", None, ["data.batch_size=4"], "data.batch_size is set"),
    ("env-var-missing", edit(root_dir="${oc.env:ADAPTRAIN_SURELY_UNSET_VAR}"), [], "root_dir could not be resolved"),
    ("ckpt-not-found", None, ["ckpt_path=nowhere.ckpt"], "ckpt_path"),
    ("experiment-not-a-folder-name", None, ["experiment=../escape"], "experiment"),
    ("init-arg-wrong-type", None, ["model.init_args.bias=1"],
     "model.init_args.bias is 1; torch.nn.Linear expects bool"),
    ("class-path-is-a-module", None, ["data.class_path=torch.nn"], 'data.class_path is "torch.nn", a module'),
    ("metrics-not-a-mapping", None, ["metrics=[1]"], "metrics is a list; expected a mapping"),
    ("list-entry-missing", None, ["callbacks.0.init_args.patience=1"], "callbacks has no entry 0"),
    ("device-unavailable", None, ["trainer.device=cuda:7"] if not torch.cuda.is_available() else ["trainer.device=tpu"],
     "trainer.device"),
]


@pytest.mark.parametrize("edit, overrides, expected", [case[1:] for case in BAD_CONFIGS],
                         ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys, edit, overrides, expected):
    root = tmp_path / "runs"
    path = tmp_path / "run.yaml"
    if edit == "MISSING":
        path = tmp_path / "missing.yaml"
    elif isinstance(edit, str):
        write_config(path, edit)
    else:
        write_config(path, (edit or (lambda c: c))(base_config(root)))
    code, out, err = run(["fit", "--config", path, *overrides], capsys)
    assert code == 2, err
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err  # one line
    assert err.startswith("adaptrain: error: ")
    assert not root.exists() and not (tmp_path / "mlflow.db").exists()  # nothing written


def test_at_least_twenty_bad_configs():
    assert len(BAD_CONFIGS) >= 20


def test_error_names_the_file_it_came_from(tmp_path, capsys):
    path = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", model={
        "class_path": "torch.nn.Linear", "init_args": {"in_features": 8, "out_feature": 3}}))
    code, _, err = run(["fit", "--config", path], capsys)
    assert code == 2 and f"{path}: model.init_args.out_feature is not an argument" in err


def test_bad_usage_exits_2(config_file, capsys):
    assert run(["train", "--config", config_file], capsys)[0] == 2  # not a verb
    assert run(["fit"], capsys)[0] == 2  # --config is required
    assert run(["fit", "--config", config_file, "--no-such-flag"], capsys)[0] == 2


# ---------------------------------------------------------------------- runs
def test_fit_writes_the_run_folder(config_file, tmp_path, capsys):
    code, out, err = run(["fit", "--config", config_file, "trainer.max_epochs=3", "run_name=first"], capsys)
    assert code == 0, err
    folder = tmp_path / "runs" / "tiny" / "first"
    names = {p.name for p in folder.iterdir()}
    assert names >= {"config.yaml", "history.csv", "history.json", "history.png", "train.log"}
    rows = list(csv.DictReader(open(folder / "history.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and "val_acc" in rows[0]
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 3 and saved["run_name"] == "first"
    log = (folder / "train.log").read_text().splitlines()
    assert "start fit: experiment tiny, run first" in log[0] and "end (finished): 3 epochs" in log[-1]
    assert f"run folder: {folder}" in out


def test_train_log_has_the_progress_bar_lines(config_file, tmp_path, capsys):
    code, out, _ = run(["fit", "--config", config_file, "trainer.progress=true", "run_name=bar"], capsys)
    assert code == 0
    printed = [line for line in out.splitlines()  # stdout is not a TTY here: plain lines
               if line.startswith("epoch ") and "  batch " not in line]  # the summaries, not the in-epoch lines
    log = (tmp_path / "runs/tiny/bar/train.log").read_text().splitlines()
    logged = [line for line in log if line.startswith("epoch ")]
    assert printed == logged and len(logged) == 2


def test_saved_config_reproduces_the_run(config_file, tmp_path, capsys):
    config = base_config(tmp_path / "runs", data={"class_path": "tests.cli_data.tiny_dict", "batch_size": 8})
    config["trainer"]["seed"] = None  # the CLI draws one and records it
    write_config(config_file, config)
    assert run(["fit", "--config", config_file, "run_name=orig"], capsys)[0] == 0
    saved = tmp_path / "runs/tiny/orig/config.yaml"
    assert isinstance(yaml.safe_load(saved.read_text())["trainer"]["seed"], int)
    assert run(["fit", "--config", saved], capsys)[0] == 0
    assert (tmp_path / "runs/tiny/orig-2").is_dir()  # same name: a new folder, the first is kept

    def losses(name):
        rows = csv.DictReader(open(tmp_path / f"runs/tiny/{name}/history.csv"))
        return [(r["train_loss"], r["val_loss"], r["val_acc"]) for r in rows]
    assert losses("orig") == losses("orig-2")


def test_interrupted_run_exits_130_and_says_so(config_file, tmp_path, capsys):
    code, _, err = run(["fit", "--config", config_file, "run_name=ctrl-c",
                        "callbacks=[{class_path: tests.cli_data.InterruptAfterFirstEpoch}]"], capsys)
    assert code == 130 and "interrupted" in err
    log = (tmp_path / "runs/tiny/ctrl-c/train.log").read_text()
    assert "end (killed): 1 epochs" in log
    assert len((tmp_path / "runs/tiny/ctrl-c/history.csv").read_text().splitlines()) == 2  # header + epoch 1


def test_print_config_prints_and_writes_nothing(config_file, tmp_path, capsys):
    code, out, _ = run(["fit", "--config", config_file, "--print-config", "optimizer.init_args.lr=0.5"], capsys)
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["optimizer"]["init_args"]["lr"] == 0.5
    assert printed["criterion"]["class_path"] == "torch.nn.CrossEntropyLoss"
    assert not (tmp_path / "runs").exists()


def test_overrides_may_follow_options(config_file, tmp_path, capsys):
    code, out, _ = run(["fit", "trainer.max_epochs=1", "--config", config_file, "--print-config", "experiment=x"],
                       capsys)
    assert code == 0 and yaml.safe_load(out)["trainer"]["max_epochs"] == 1 and yaml.safe_load(out)["experiment"] == "x"


def test_scheduler_section_becomes_a_factory(config_file, tmp_path, capsys):
    code, _, err = run(["fit", "--config", config_file, "run_name=cycle",
                        "scheduler.class_path=torch.optim.lr_scheduler.OneCycleLR",
                        "scheduler.init_args.max_lr=0.5"], capsys)
    assert code == 0, err  # total_steps filled in by the trainer
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "runs/tiny/cycle/history.csv"))]
    assert lrs[0] > 0.2 and lrs[1] < lrs[0]  # max_lr 0.5 replaced SGD's 0.1, then annealing: stepped per batch


def test_validate_test_predict_load_weights(config_file, tmp_path, capsys):
    from adaptrain import Trainer
    from adaptrain.checkpoint.io import save_weights

    torch.manual_seed(3)
    model = torch.nn.Linear(8, 3)
    weights = save_weights(model, tmp_path / "model.safetensors")
    expected = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                       progress=False).test(torch.utils.data.DataLoader(tiny_datasets()[2], batch_size=32))
    code, out, err = run(["test", "--config", config_file, f"ckpt_path={weights}", "run_name=t"], capsys)
    assert code == 0, err
    results = yaml.safe_load((tmp_path / "runs/tiny/t/test.json").read_text())
    assert results["test_loss"] == pytest.approx(expected["test_loss"])
    assert "test: test_loss" in out
    assert run(["validate", "--config", config_file, f"ckpt_path={weights}", "run_name=v"], capsys)[0] == 0
    assert "val_loss" in yaml.safe_load((tmp_path / "runs/tiny/v/validate.json").read_text())
    assert run(["predict", "--config", config_file, f"ckpt_path={weights}", "run_name=p"], capsys)[0] == 0
    predictions = torch.load(tmp_path / "runs/tiny/p/predictions.pt")
    assert predictions.shape == (32, 3) and torch.allclose(predictions, model(tiny_datasets()[2].tensors[0]), atol=1e-6)


def test_fit_checkpoints_in_the_run_folder_then_test_from_them(config_file, tmp_path, capsys):
    checkpoint = ("callbacks=[{class_path: adaptrain.callbacks.checkpointing.ModelCheckpoint, "
                  "init_args: {monitor: val_loss}}]")
    assert run(["fit", "--config", config_file, "run_name=ck", checkpoint], capsys)[0] == 0
    folder = tmp_path / "runs/tiny/ck/checkpoints"
    best = [p for p in folder.glob("epoch=*.ckpt")]
    assert len(best) == 1 and (folder / "last.ckpt").is_file()
    saved = tmp_path / "runs/tiny/ck/config.yaml"
    code, out, err = run(["test", "--config", saved, f"ckpt_path={best[0]}"], capsys)
    assert code == 0, err
    assert "note: no ckpt_path" not in out and (tmp_path / "runs/tiny/ck-test/test.json").is_file()
    code, _, err = run(["fit", "--config", config_file, "ckpt_path=last"], capsys)
    assert code == 2 and 'ckpt_path is "last"' in err


def test_forecast_verb(tmp_path, capsys):
    path = tmp_path / "history.csv"
    rows = ["epoch,val_acc"] + [f"{e},{0.9 - 0.5 * e ** -0.8:.6f}" for e in range(1, 21)]
    path.write_text("\n".join(rows) + "\n")
    code, out, err = run(["forecast", tmp_path, "--metric", "val_acc", "--at", "50"], capsys)
    assert code == 0, err
    assert out.startswith("val_acc at epoch 50: ")
    assert run(["forecast", tmp_path, "--metric", "val_acc", "--at", "50", "--mode", "min"], capsys)[0] == 1
    code, _, err = run(["forecast", tmp_path / "nowhere", "--metric", "val_acc", "--at", "50"], capsys)
    assert code == 2 and "history" in err


def test_profile_and_bench_verbs(config_file, tmp_path, capsys):
    code, out, err = run(["profile", "--config", config_file, "--runs", "2", "--warmup", "1",
                          "--json", tmp_path / "profile.json"], capsys)
    assert code == 0, err
    assert (tmp_path / "profile.json").is_file()
    code, out, err = run(["bench", "--config", config_file, "--precisions", "32", "--batch-sizes", "4", "8",
                          "--steps", "2", "--warmup", "1", "--csv", tmp_path / "bench.csv"], capsys)
    assert code == 0, err
    assert "| 32 | 8 |" in out and len((tmp_path / "bench.csv").read_text().splitlines()) == 3
    # Commas work too, and without --csv/--markdown the table lands in a run folder.
    code, out, err = run(["bench", "--config", config_file, "--precisions", "32,bf16-mixed", "--batch-sizes", "4,8",
                          "--steps", "2", "--warmup", "1"], capsys)
    assert code == 0, err
    written = [p for p in (tmp_path / "runs").rglob("bench.csv")]
    assert len(written) == 1 and len(written[0].read_text().splitlines()) == 5
    assert "| bf16-mixed | 8 |" in written[0].with_name("bench.md").read_text()
    code, _, err = run(["bench", "--config", config_file, "--batch-sizes", "4,x"], capsys)
    assert code == 2 and "expected int values separated by commas" in err


@pytest.mark.slow
def test_console_script_in_a_subprocess(config_file, tmp_path):
    script = Path(sys.executable).with_name("adaptrain")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "adaptrain.cli.main"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}  # tests.cli_data is importable
    done = subprocess.run([*command, "fit", "--config", str(config_file), "run_name=sub", "trainer.max_epochs=1"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs/tiny/sub/history.csv").is_file()
    assert "run folder: " in done.stdout


def test_fit_with_a_bad_checkpoint_writes_nothing(config_file, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    code, _, err = run(["fit", "--config", config_file, f"ckpt_path={bad}"], capsys)
    assert code == 2 and "ckpt_path could not be loaded" in err and "is not a checkpoint or is corrupt" in err
    assert run_folders(tmp_path / "runs") == []


# ---------------------------------------------------------------------- errors while running
def three_tensors():
    """A data factory whose batches are (x, y, z): not a batch structure the trainer takes."""
    x = torch.randn(16, 8)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, 0].long().abs() % 3, x), batch_size=4)


def nan_inputs():
    """A data factory whose inputs are NaN: the loss is NaN from the first batch."""
    x = torch.full((32, 8), float("nan"))
    data = torch.utils.data.TensorDataset(x, torch.zeros(32, dtype=torch.long))
    return torch.utils.data.DataLoader(data, batch_size=8)


class InterruptBeforeTheFirstStep(Callback):
    def before_batch(self, trainer):
        raise KeyboardInterrupt


class FailAfterTheFirstEpoch(Callback):
    def after_epoch(self, trainer):
        raise RuntimeError("disk on fire")


def _store(tmp_path, capsys):
    from tests.cli_data import mlflow_store

    pytest.importorskip("mlflow")
    uri = mlflow_store(tmp_path / "elsewhere" / "mlflow.db")  # outside root_dir: root must stay absent
    capsys.readouterr()  # MLflow's own set-up logs are not the CLI's output
    return uri


def _mlflow_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


EARLY_FAILURES = [  # id, overrides, what the one line must say
    ("model-on-shapes", ["model.init_args.in_features=5"], "the model (Linear) failed on inputs"),
    ("batch-structure", ["data.class_path=tests.cli.test_main.three_tensors"],
     "BatchStructureError: train_loader yielded"),
    ("callback-raises", ["callbacks=[{class_path: tests.cli.test_main.InterruptBeforeTheFirstStep}]"], None),
]


@pytest.mark.parametrize("overrides, expected", [case[1:] for case in EARLY_FAILURES],
                         ids=[case[0] for case in EARLY_FAILURES])
def test_failing_before_the_first_step_is_one_line_and_leaves_nothing(tmp_path, capsys, overrides, expected):
    uri = _store(tmp_path, capsys)
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers={
        "mlflow": {"tracking_uri": uri, "log_system_metrics": False}, "tensorboard": {}}))
    code, out, err = run(["fit", "--config", config, *overrides], capsys)
    assert not (tmp_path / "runs").exists()  # no run folder, no experiment folder, no root
    assert _mlflow_runs(uri) == []  # no FAILED (or KILLED) MLflow run
    if expected is None:  # Ctrl-C keeps its exit code
        assert code == 130 and "interrupted" in err
        return
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    assert lines[0].startswith("adaptrain: error: fit failed before its first optimizer step: ")
    assert expected in lines[0]
    removed = re.escape(str(tmp_path / "runs" / "tiny"))
    assert re.fullmatch(rf"adaptrain: nothing was kept \({removed}/[\w-]+ removed\); --debug prints the traceback",
                        lines[1]), lines[1]


def test_debug_prints_the_traceback_too(config_file, tmp_path, capsys):
    code, _, err = run(["fit", "--config", config_file, "model.init_args.in_features=5", "--debug"], capsys)
    assert code == 1
    assert err.startswith("Traceback (most recent call last):") and "mat1 and mat2" in err
    assert err.strip().splitlines()[-2].startswith("adaptrain: error: fit failed before its first optimizer step: ")


def test_failing_after_the_first_step_keeps_the_run_with_its_traceback(tmp_path, capsys):
    uri = _store(tmp_path, capsys)
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers={
        "mlflow": {"tracking_uri": uri, "log_system_metrics": False}}))
    code, _, err = run(["fit", "--config", config, "run_name=nan", "data.class_path=tests.cli.test_main.nan_inputs"],
                       capsys)
    assert code == 1
    log = tmp_path / "runs/tiny/nan/train.log"
    lines = err.strip().splitlines()
    # The NaN is seen at the first refresh point (batch 2, after two optimizer steps).
    assert lines[0].startswith("adaptrain: error: fit failed at epoch 1, batch 2 (optimizer step 2): "
                               "NonFiniteLossError: non-finite loss"), err
    assert lines[1] == f"adaptrain: the traceback is in {log} (--debug prints it here)" and len(lines) == 2
    text = log.read_text()
    assert "error: NonFiniteLossError: non-finite loss" in text and "Traceback (most recent call last):" in text
    assert "end (failed)" in text.splitlines()[-1]
    (failed,) = _mlflow_runs(uri)
    assert failed.info.status == "FAILED"


def test_a_config_error_found_while_running_exits_2(config_file, tmp_path, capsys):
    checkpoint = "callbacks=[{class_path: adaptrain.ModelCheckpoint, init_args: {monitor: train_los}}]"
    code, _, err = run(["fit", "--config", config_file, "run_name=typo", checkpoint], capsys)
    assert code == 2 and "train_los" in err.splitlines()[0] and "Traceback" not in err


def test_an_error_after_an_epoch_is_in_train_log(config_file, tmp_path, capsys):
    code, _, err = run(["fit", "--config", config_file, "run_name=boom",
                        "callbacks=[{class_path: tests.cli.test_main.FailAfterTheFirstEpoch}]"], capsys)
    assert code == 1 and "fit failed at epoch" in err and "disk on fire" in err
    assert "RuntimeError: disk on fire" in (tmp_path / "runs/tiny/boom/train.log").read_text()


def test_evaluation_that_fails_leaves_nothing(config_file, tmp_path, capsys):
    code, _, err = run(["test", "--config", config_file, "model.init_args.in_features=5"], capsys)
    assert code == 1 and err.startswith("adaptrain: error: test failed: RuntimeError: the model (Linear) failed")
    assert not (tmp_path / "runs").exists()


def test_exit_codes_are_in_the_help(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes: 0 done; 1 the run failed" in " ".join(out.split()) and "--debug" in out and "--new-run" in out


# ---------------------------------------------------------------------- resuming continues the run
def test_resume_continues_the_run_folder_mlflow_run_and_event_files(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = _store(tmp_path, capsys)
    config = write_config(tmp_path / "run.yaml", base_config(tmp_path / "runs", loggers={
        "mlflow": {"tracking_uri": uri, "log_system_metrics": False}, "tensorboard": {}},
        callbacks=[{"class_path": "adaptrain.ModelCheckpoint"}]))
    assert run(["fit", "--config", config, "run_name=r"], capsys)[0] == 0
    folder = tmp_path / "runs/tiny/r"
    first_id = json.loads((folder / "mlflow.json").read_text())["run_id"]
    code, out, err = run(["fit", "--config", folder / "config.yaml", f"ckpt_path={folder}/checkpoints/last.ckpt",
                          "trainer.max_epochs=3"], capsys)
    assert code == 0, err
    assert f"run folder: {folder}  (seed 0; continuing the run in it" in out
    assert run_folders(tmp_path / "runs") == [folder]  # no second folder
    assert (folder / "config.resume-1.yaml").is_file() and "max_epochs: 2" in (folder / "config.yaml").read_text()
    assert [r["epoch"] for r in csv.DictReader(open(folder / "history.csv"))] == ["1", "2", "3"]
    log = (folder / "train.log").read_text()
    assert log.count(" start fit: ") == 2 and " resume fit at epoch 2, optimizer step 8" in log
    (only,) = _mlflow_runs(uri)  # the same MLflow run, continued
    assert only.info.run_id == first_id and only.info.status == "FINISHED"
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(first_id, "val_loss")] == [1, 2, 3]
    assert only.data.tags["adaptrain.resumed_at_step"] == "8"
    assert json.loads(only.data.tags["adaptrain.resume_changed_params"])["trainer.max_epochs"] == "3"
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [1, 2, 3]  # one run in TensorBoard, both event files

    # --new-run: the same checkpoint, resumed into a new folder and a new MLflow run.
    code, _, err = run(["fit", "--config", folder / "config.yaml", f"ckpt_path={folder}/checkpoints/last.ckpt",
                        "trainer.max_epochs=4", "--new-run"], capsys)
    assert code == 0, err
    assert run_folders(tmp_path / "runs") == [folder, tmp_path / "runs/tiny/r-2"]
    assert sorted(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in _mlflow_runs(uri)) == [1, 3]


def test_a_resume_that_fails_before_its_first_step_changes_nothing(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", base_config(
        tmp_path / "runs", callbacks=[{"class_path": "adaptrain.ModelCheckpoint"}]))
    assert run(["fit", "--config", config, "run_name=r"], capsys)[0] == 0
    folder = tmp_path / "runs/tiny/r"
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    log = (folder / "train.log").read_text()
    code, _, err = run(["fit", "--config", folder / "config.yaml", f"ckpt_path={folder}/checkpoints/last.ckpt",
                        "trainer.max_epochs=3", "data.class_path=tests.cli.test_main.three_tensors"], capsys)
    assert code == 1 and "before its first optimizer step" in err
    assert f"nothing was kept ({folder / 'config.resume-1.yaml'} removed)" in err
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # no config.resume-1.yaml left
    assert (folder / "train.log").read_text() == log


# ---------------------------------------------------------------------- call: false (a function as a loss)
MULTI_IO = Path(__file__).resolve().parents[2] / "examples" / "digits_multi_io.yaml"


def test_call_false_passes_a_plain_function_as_a_loss(tmp_path, capsys):
    function_loss = "criterion.init_args.losses.digit={class_path: torch.nn.functional.cross_entropy, call: false}"
    common = ["fit", "--config", MULTI_IO, f"root_dir={tmp_path}", "trainer.max_epochs=1", "loggers=null"]
    code, _, err = run([*common, "run_name=fn", function_loss], capsys)
    assert code == 0, err  # called with no arguments, cross_entropy would have raised while building

    def digit_loss(name):
        first = next(csv.DictReader(open(tmp_path / "digits-multi-io" / name / "history.csv")))
        return float(first["train_loss_digit"])
    # With init_args, a partial: label smoothing changes the loss.
    smoothed = function_loss.replace("call: false}", "call: false, init_args: {label_smoothing: 0.2}}")
    assert run([*common, "run_name=smooth", smoothed], capsys)[0] == 0
    assert digit_loss("smooth") > digit_loss("fn")


@pytest.mark.parametrize("spec, expected", [
    ("{class_path: torch.nn.functional.cross_entropy, call: nope}",
     'criterion.init_args.losses.digit.call is "nope"; expected true'),
    ("{class_path: torch.nn.functional.cross_entropy, call: false, init_args: {label_smothing: 0.1}}",
     "criterion.init_args.losses.digit.init_args.label_smothing is not an argument of "
     'torch.nn.functional.cross_entropy; did you mean "label_smoothing"'),
    ("{class_path: torch.nn.functional.cross_entropy, calls: false}",
     "criterion.init_args.losses.digit.calls is not a known key; expected class_path, init_args, call"),
])
def test_call_false_mistakes_are_config_errors(tmp_path, capsys, spec, expected):
    code, _, err = run(["fit", "--config", MULTI_IO, f"root_dir={tmp_path}",
                        f"criterion.init_args.losses.digit={spec}"], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_call_false_at_the_top_level_of_a_spec():
    from adaptrain.cli.instantiate import instantiate

    def accuracy(outputs, targets):
        return (outputs.argmax(1) == targets).float().mean()

    import tests.cli.test_main as here
    here.accuracy = accuracy  # an importable custom function, as a user's module would hold
    assert instantiate({"class_path": "tests.cli.test_main.accuracy", "call": False}, "metrics.acc") is accuracy
    assert isinstance(instantiate({"class_path": "torch.nn.CrossEntropyLoss", "call": True}, "criterion"),
                      torch.nn.CrossEntropyLoss)  # call: true is the default: the class is called


@pytest.mark.slow
def test_python_dash_m_runs_the_cli_and_a_runtime_error_is_one_line(config_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}  # tests.cli_data is importable
    done = subprocess.run([sys.executable, "-m", "adaptrain.cli.main", "fit", "--config", str(config_file),
                           "model.init_args.in_features=5"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("adaptrain: error: fit failed before its first optimizer step: ")
    assert not (tmp_path / "runs").exists()


class SigtermAtStep3(Callback):
    """Sends this process a real SIGTERM after optimizer step 3 (as SLURM would at its time limit)."""

    def after_step(self, trainer):
        if trainer.state.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_keeps_its_exit_code_and_the_run(config_file, tmp_path, capsys):
    callbacks = ("callbacks=[{class_path: adaptrain.ModelCheckpoint}, "
                 "{class_path: tests.cli.test_main.SigtermAtStep3}]")
    code, _, err = run(["fit", "--config", config_file, "run_name=term", callbacks], capsys)
    assert code == 143, err
    folder = tmp_path / "runs/tiny/term"
    assert (folder / "checkpoints/last.ckpt").is_file()
    assert "end (killed)" in (folder / "train.log").read_text().splitlines()[-1]


def test_call_false_at_the_top_of_criterion_and_metrics_through_the_cli(tmp_path, capsys):
    """A plain function as the criterion and as a metric, named at the top of their sections."""
    config = base_config(tmp_path / "runs", criterion={"class_path": "torch.nn.functional.cross_entropy",
                                                        "call": False},
                         metrics={"acc": {"class_path": "tests.cli_data.accuracy", "call": False}})
    code, _, err = run(["fit", "--config", write_config(tmp_path / "run.yaml", config), "loggers=null"], capsys)
    assert code == 0, err
    record = next(csv.DictReader(open(run_folders(tmp_path / "runs")[0] / "history.csv")))
    assert 0.0 <= float(record["train_acc"]) <= 1.0 and float(record["train_loss"]) > 0


def test_an_empty_data_set_from_the_data_factory_is_named(tmp_path, capsys):
    config = base_config(tmp_path / "runs", data={"class_path": "tests.cli_data.empty_data"})
    code, _, err = run(["fit", "--config", write_config(tmp_path / "run.yaml", config)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.class_path returned an empty train data set (TensorDataset of 0 samples)" in err
    assert not (tmp_path / "runs").exists()


def test_fast_dev_run_from_the_command_line(tmp_path, capsys):
    config = base_config(tmp_path / "runs")
    code, _, err = run(["fit", "--config", write_config(tmp_path / "run.yaml", config), "trainer.max_epochs=5",
                        "trainer.fast_dev_run=2", "loggers=null"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(run_folders(tmp_path / "runs")[0] / "history.csv")))
    assert len(rows) == 1  # one short epoch, not five
