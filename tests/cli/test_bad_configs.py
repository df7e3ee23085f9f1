"""Bad configs, table-driven: each exits 2 with one line on stderr naming the key (or file), and writes nothing.

Run in-process through ``main(argv)`` with the working directory set to the test's folder, so a
stray file anywhere (a run folder, ``mlflow.db``, ``./mlruns``, ``__pycache__``) shows up in the
before/after listing. Cases marked "issue 16" got a traceback, exit 1 or a run folder before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adaptrain.cli.main import main
from tests.cli_data import base_config, edit, tiny_data, write_config


def train_only():
    """A data factory with a train loader and no val loader."""
    return tiny_data()[0]




def _garbage(folder: Path) -> None:
    (folder / "garbage.ckpt").write_bytes(b"not a checkpoint")


def _other_model(folder: Path) -> None:
    from adaptrain import Trainer
    from adaptrain.core.resume import save_checkpoint

    model = torch.nn.Linear(8, 5)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), progress=False)
    save_checkpoint(trainer, folder / "other.ckpt")


def _module_that_raises(folder: Path) -> None:
    (folder / "broken_module.py").write_text("raise RuntimeError('broken on import')\n")


CHECKPOINT = "adaptrain.callbacks.checkpointing.ModelCheckpoint"
EARLY = "adaptrain.EarlyStopping"
NO_CUDA_DEVICE = "trainer.device=cuda:7" if not torch.cuda.is_available() else "trainer.device=tpu"

# id, config files (the first an edit of the base config, or YAML text; later ones YAML text),
# overrides ({tmp} is the test's folder), text the one line must contain, optional setup(folder)
CASES: list[tuple] = [
    # ------------------------------------------------------------ files and YAML
    ("file-not-found", ["MISSING"], [], "--config is"),
    ("config-is-a-folder", ["FOLDER"], [], "a directory; expected a YAML file"),
    ("yaml-syntax", ["model: {class_path: torch.nn.Linear\ndata: [1, 2\n"], [], "line 2"),
    ("not-text", [b"\xff\xfe\x00binary"], [], "is not a text file"),
    ("top-level-list", ["- model\n- data\n"], [], "(top level) is a list"),
    ("top-level-scalar", ["5\n"], [], "(top level) is 5; expected a mapping of sections"),
    ("empty-file", [""], [], "model is missing; expected a mapping with class_path"),
    ("callbacks-mapping-in-file (issue 16)", [edit(callbacks={"a": 1})], [], "callbacks is a mapping; expected a list"),
    ("metrics-list-in-second-file (issue 16)", [None, "metrics: [1, 2]\n"], [],
     "metrics is a list; expected a mapping"),
    ("init-args-list-in-file", [edit(**{"model.init_args": [8, 3]})], [],
     "model.init_args is a list; expected a mapping"),
    ("trainer-list-in-second-file", [None, "trainer: [1]\n"], [], "trainer is a list"),
    ("scheduler-list-in-file", [edit(scheduler=[1])], [], "scheduler is a list"),
    ("second-file-wrong-type", [None, "trainer: {max_epochs: two}\n"], [], 'second.yaml: trainer.max_epochs is "two"'),
    # ------------------------------------------------------------ keys and types
    ("unknown-top-level-key", [edit(modle={"class_path": "x"})], [], 'modle is not a known key; did you mean "model"'),
    ("unknown-trainer-key", [None], ["trainer.max_epocs=3"], 'did you mean "trainer.max_epochs"'),
    ("unknown-trainer-key-in-file", [edit(**{"trainer.precison": "32"})], [], 'did you mean "trainer.precision"'),
    ("unknown-spec-key", [None], ["model.init_arg.in_features=8"], 'did you mean "model.init_args"'),
    ("wrong-type-override", [None], ["trainer.max_epochs=abc"], 'trainer.max_epochs is "abc"; expected an integer'),
    ("wrong-type-in-file", [edit(**{"trainer.gradient_clip_val": "big"})], [], "trainer.gradient_clip_val"),
    ("wrong-bool", [None], ["trainer.compile=maybe"], "trainer.compile"),
    ("float-for-int", [None], ["trainer.max_epochs=1.5"], "trainer.max_epochs"),
    ("list-for-int-in-file", [edit(**{"trainer.max_epochs": [1]})], [], "trainer.max_epochs is a list"),
    ("experiment-list-in-file", [edit(experiment=[1])], [], "experiment is a list"),
    ("override-without-equals", [None], ["trainer.max_epochs"], '"trainer.max_epochs" is not an override'),
    ("override-bad-key", [None], ["9lives=1"], '"9lives=1" is not an override'),
    ("override-broken-yaml (issue 16)", [None], ["trainer.max_epochs=[1,"],
     "trainer.max_epochs has a value that is not valid YAML"),
    ("override-broken-mapping", [None], ["model.init_args={in_features: 8"],
     "model.init_args has a value that is not valid YAML"),
    # ------------------------------------------------------------ trainer values and bounds
    ("bad-precision", [None], ["trainer.precision=fp8"], 'trainer.precision is "fp8"'),
    ("bad-nan-policy", [None], ["trainer.nan_policy=ignore"], "trainer.nan_policy"),
    ("max-epochs-zero", [None], ["trainer.max_epochs=0"], "trainer.max_epochs is 0; expected an integer >= 1"),
    ("max-epochs-huge (issue 16)", [None], ["trainer.max_epochs=100000000000000000000000000000"],
     "trainer.max_epochs is 100000000000000000000000000000; expected an integer <="),
    ("accumulate-zero", [None], ["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches is 0"),
    ("accumulate-huge", [None], ["trainer.accumulate_grad_batches=10000000000000000000000"],
     "trainer.accumulate_grad_batches"),
    ("log-every-zero", [None], ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps is 0"),
    ("clip-negative", [None], ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val is -1.0"),
    ("seed-overflow (issue 16)", [None], ["trainer.seed=100000000000000000000000000000"], "trainer.seed is 1000"),
    ("seed-negative", [None], ["trainer.seed=-1"], "trainer.seed is -1"),
    ("device-unavailable", [None], [NO_CUDA_DEVICE], "trainer.device"),
    ("device-nonsense", [None], ["trainer.device=abacus"], "trainer.device"),
    # ------------------------------------------------------------ sections and specs
    ("missing-model", [edit(model=None)], [], "model is missing"),
    ("section-not-a-mapping", [edit(model="torch.nn.Linear")], [], 'model is "torch.nn.Linear"; expected a mapping'),
    ("missing-class-path", [edit(**{"model.class_path": None})], [], "model.class_path is missing"),
    ("empty-class-path", [None], ["model.class_path=''"], "model.class_path"),
    ("class-path-not-dotted", [None], ["model.class_path=Linear"], 'model.class_path is "Linear"; expected a dotted'),
    ("unimportable-module", [None], ["model.class_path=no_such_pkg.Net"], 'no module named "no_such_pkg"'),
    ("module-raises-on-import", [None], ["model.class_path=broken_module.Net"], "importing broken_module raised",
     _module_that_raises),
    ("attribute-typo", [None], ["model.class_path=adaptrain.models.MNIST1DCnn"], '"adaptrain.models.MNIST1DCNN"'),
    ("class-path-is-a-module", [None], ["data.class_path=torch.nn"], 'data.class_path is "torch.nn", a module'),
    ("unknown-init-arg", [None], ["model.init_args.in_feature=8"], 'model.init_args.in_feature is not an argument'),
    ("missing-init-arg", [edit(**{"model.init_args": {"in_features": 8}})], [], "model.init_args misses out_features"),
    ("init-arg-wrong-type", [None], ["model.init_args.bias=1"],
     "model.init_args.bias is 1; torch.nn.Linear expects bool"),
    ("constructor-raises", [None], ["model.init_args.out_features=-3"], "model could not be built"),
    ("args-of-another-class", [None], ["model.class_path=torch.optim.SGD"],
     "model.init_args.in_features is not an argument"),
    ("built-wrong-type", [None], ["model.class_path=collections.OrderedDict", "model.init_args={}"],
     "model.class_path built a OrderedDict; expected a torch.nn.Module"),
    ("optimizer-unknown-arg", [None], ["optimizer.init_args.learning_rate=0.1"], "optimizer.init_args.learning_rate"),
    ("optimizer-bad-value", [None], ["optimizer.init_args.lr=-1"], "optimizer could not be built"),
    ("optimizer-not-an-optimizer", [None], ["optimizer.class_path=collections.Counter"],
     "optimizer.class_path built a Counter; expected a torch.optim.Optimizer"),
    ("scheduler-missing-arg", [None], ["scheduler.class_path=torch.optim.lr_scheduler.StepLR"],
     "scheduler.init_args misses step_size"),
    ("scheduler-interval", [None], ["scheduler.class_path=torch.optim.lr_scheduler.StepLR",
     "scheduler.init_args.step_size=1",
                                    "scheduler.interval=sometimes"], "scheduler.interval"),
    ("scheduler-unknown-arg", [None], ["scheduler.class_path=torch.optim.lr_scheduler.StepLR",
     "scheduler.init_args.step=1"],
     "scheduler.init_args.step is not an argument"),
    ("criterion-unknown-class", [None], ["criterion.class_path=torch.nn.CrossEntropy"], "criterion.class_path"),
    ("criterion-nested-typo", [edit(criterion={"class_path": "adaptrain.MultiLoss", "init_args": {
        "losses": {"a": {"class_path": "torch.nn.CrossEntropyLos"}}}})], [], "criterion.init_args.losses.a.class_path"),
    ("metric-bad-path", [None], ["metrics.acc.class_path=torchmetrics.Acuracy"], "metrics.acc.class_path"),
    ("metrics-not-a-mapping", [None], ["metrics=[1]"], "metrics is a list; expected a mapping"),
    ("metric-spec-not-a-mapping", [None], ["metrics.acc=[1]"], "metrics.acc is a list"),
    ("metric-class-path-null", [None], ["metrics.acc.class_path=null"], "metrics.acc.class_path is null"),
    # ------------------------------------------------------------ callbacks
    ("callback-not-a-callback", [edit(callbacks=[{"class_path": "torch.nn.ReLU"}])], [],
     "callbacks.0.class_path built a ReLU"),
    ("callback-bad-arg", [edit(callbacks=[{"class_path": EARLY, "init_args": {"patience": 0}}])], [],
     "callbacks.0 could not be built"),
    ("callback-unknown-arg", [edit(callbacks=[{"class_path": CHECKPOINT, "init_args": {"monitr": "val_loss"}}])], [],
     'callbacks.0.init_args.monitr is not an argument'),
    ("callback-spec-without-class-path", [None], ["callbacks=[{init_args: {}}]"], "callbacks.0.class_path is null"),
    ("list-entry-missing", [None], ["callbacks.0.init_args.patience=1"], "callbacks has no entry 0"),
    ("checkpoint-monitor-nobody-produces (issue 16)",
     [edit(callbacks=[{"class_path": CHECKPOINT, "init_args": {"monitor": "val_accuracy"}}])], [],
     'callbacks.0.init_args.monitor is "val_accuracy", which no loader produces; available: [\'val_acc\', '
     '\'val_loss\']. Did you mean "val_acc"?'),
    ("early-stopping-monitor-typo", [None], [f"callbacks=[{{class_path: {EARLY}, init_args: {{monitor: val_los}}}}]"],
     'callbacks.0.init_args.monitor is "val_los"'),
    ("val-monitor-without-val-loader", [edit(data={"class_path": "tests.cli.test_bad_configs.train_only"},
                                             callbacks=[{"class_path": CHECKPOINT,
     "init_args": {"monitor": "val_loss"}}])],
     [], "callbacks.0.init_args.monitor is \"val_loss\", but data.class_path gives no val loader"),
    ("checkpoint-bad-mode", [edit(callbacks=[{"class_path": CHECKPOINT, "init_args": {"mode": "best"}}])], [],
     "callbacks.0 could not be built"),
    # ------------------------------------------------------------ loggers
    ("unknown-logger", [None], ["loggers.mlfow={}"], 'loggers.mlfow names no logger; did you mean "mlflow"'),
    ("logger-option-typo", [None], ["loggers.mlflow.tracking_url=x"], 'loggers.mlflow.tracking_url is not an argument'),
    ("logger-option-typo-list-form", [edit(loggers=["mlflow"])], ["loggers.mlflow.tracking_url=x"],
     "loggers.mlflow.tracking_url is not an argument"),
    ("logger-options-not-a-mapping", [None], ["loggers.mlflow=5"], "loggers.mlflow is 5"),
    ("loggers-a-number", [None], ["loggers=5"], "loggers is 5"),
    ("logger-name-typo-in-list", [None], ["loggers=[tensorbord]"],
     'loggers.0 names no logger; did you mean "tensorboard"'),
    # ------------------------------------------------------------ data
    ("batch-size-zero", [None], ["data.batch_size=0"], "data.batch_size is 0"),
    ("batch-size-huge (issue 16)", [edit(data={"class_path": "tests.cli_data.tiny_dict"})],
     ["data.batch_size=100000000000000000000000000"],
     "data.batch_size is 100000000000000000000000000; expected an integer"),
    ("eval-batch-size-zero", [None], ["data.eval_batch_size=0"], "data.eval_batch_size is 0"),
    ("num-workers-negative", [None], ["data.num_workers=-1"], "data.num_workers is -1"),
    ("num-workers-huge", [None], ["data.num_workers=1000000"], "data.num_workers is 1000000"),
    ("data-option-unused", [None], ["data.batch_size=4"], "data.batch_size is set"),
    ("data-factory-gives-no-train", [None], ["data.class_path=collections.OrderedDict"], "data.class_path"),
    # ------------------------------------------------------------ paths, names, interpolation, checkpoints
    ("root-dir-is-a-file (issue 16)", [None], ["root_dir={tmp}/run.yaml"],
     "root_dir is \"{tmp}/run.yaml\", which is an existing file"),
    ("root-dir-under-a-file", [None], ["root_dir={tmp}/run.yaml/runs"],
     "root_dir is \"{tmp}/run.yaml/runs\", which is under"),
    ("experiment-not-a-folder-name", [None], ["experiment=../escape"], "experiment is \"../escape\""),
    ("run-name-with-a-slash", [None], ["run_name=a/b"], "run_name is \"a/b\""),
    ("env-var-missing", [edit(root_dir="${oc.env:ADAPTRAIN_SURELY_UNSET_VAR}")], [], "root_dir could not be resolved"),
    ("interpolation-to-nowhere", [edit(experiment="${nowhere}")], [], "experiment could not be resolved"),
    ("ckpt-not-found", [None], ["ckpt_path=nowhere.ckpt"], 'ckpt_path is "nowhere.ckpt", which is not a file'),
    ("ckpt-last", [None], ["ckpt_path=last"], 'ckpt_path is "last"'),
    ("ckpt-garbage", [None], ["ckpt_path={tmp}/garbage.ckpt"], "ckpt_path could not be loaded", _garbage),
    ("ckpt-of-another-model", [None], ["ckpt_path={tmp}/other.ckpt"], "different model", _other_model),
]


def _setup(folder: Path, files: list, overrides: list[str], setup: Callable | None) -> list[str]:
    """Write the config files (and what the case needs); returns the command line."""
    root = folder / "runs"
    argv = ["fit"]
    for index, content in enumerate(files):
        path = folder / ("run.yaml" if index == 0 else "second.yaml")
        if content == "MISSING":
            path = folder / "missing.yaml"
        elif content == "FOLDER":
            path = folder / "a-folder"
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            write_config(path, content)
        else:
            write_config(path, (content or (lambda c: c))(base_config(root)))
        argv += ["--config", str(path)]
    if setup is not None:
        setup(folder)
    return argv + [item.replace("{tmp}", str(folder)) for item in overrides]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("files, overrides, expected, setup", [(*case[1:4], case[4] if len(case) > 4 else None)
                                                             for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_config_exits_2_with_one_line_naming_the_key_and_writes_nothing(
        tmp_path, capsys, monkeypatch, files, overrides, expected, setup):
    monkeypatch.chdir(tmp_path)  # relative paths (./mlruns, ./checkpoints, modules) land here, in view
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing a case's module leaves no __pycache__
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = _setup(tmp_path, files, overrides, setup)
    before = _listing(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("adaptrain: error: "), err  # one line
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert out == ""
    assert _listing(tmp_path) == before  # no run folder, no mlflow.db, nothing else
    sys.modules.pop("broken_module", None)


def test_the_table_covers_the_issue():
    assert len(CASES) >= 63 and len({case[0] for case in CASES}) == len(CASES)
    assert sum("(issue 16)" in case[0] for case in CASES) == 8  # the seven, the container type in two forms
