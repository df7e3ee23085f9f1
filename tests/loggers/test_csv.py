"""CSVLogger: the run folder's history files, plot and train.log, written by an observer callback."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader

from adaptrain import Callback, ProgressBar, Trainer
from adaptrain.loggers import CSVLogger, RunInfo
from adaptrain.loggers.run_dir import RunDir
from tests.cli_data import tiny_data


def make_trainer(callbacks, epochs=3, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                   max_epochs=epochs, callbacks=callbacks, seed=0, log_every_n_steps=2, **kwargs)


def test_writes_history_plot_and_log(tmp_path):
    train, val, _ = tiny_data()
    bar = ProgressBar(Console(file=io.StringIO(), force_terminal=False, width=400))  # the non-TTY lines
    logger = CSVLogger(run_dir=tmp_path / "exp" / "run")
    history = make_trainer([logger, bar]).fit(train, val)
    files = RunDir(tmp_path, "exp", "run")
    rows = list(csv.DictReader(open(files.history_csv)))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["val_loss"]) == pytest.approx(history.last("val_loss"))
    assert json.loads(files.history_json.read_text()) == history.records
    assert files.plot.stat().st_size > 1000
    log = files.log.read_text().splitlines()
    printed = [line for line in bar.console.file.getvalue().splitlines() if line.startswith("epoch ")]
    summaries = [line for line in printed if "  batch " not in line]  # not the in-epoch progress lines
    assert len(summaries) == 3
    assert [line for line in log if line.startswith("epoch ")] == summaries  # the same lines the bar prints
    assert " start fit: " in log[0] and "model Linear (27 parameters)" in log[0]
    assert " end (finished): 3 epochs, 12 optimizer steps" in log[-1]


def test_history_is_on_disk_after_every_epoch(tmp_path):
    seen = []

    class Peek(Callback):
        order = 95  # after the logger

        def after_epoch(self, trainer):
            seen.append(len(list(csv.DictReader(open(tmp_path / "r" / "history.csv")))))

    train, val, _ = tiny_data()
    make_trainer([CSVLogger(run_dir=tmp_path / "r"), Peek()], progress=False).fit(train, val)
    assert seen == [1, 2, 3]


def test_failed_run_keeps_the_epochs_done_and_says_why(tmp_path):
    class Boom(Callback):
        def after_epoch(self, trainer):
            if trainer.state.epoch == 2:
                raise RuntimeError("disk on fire")

    train, val, _ = tiny_data()
    logger = CSVLogger(run_dir=tmp_path / "r", plot=False)
    with pytest.raises(Exception, match="disk on fire"):
        make_trainer([logger, Boom()], progress=False).fit(train, val)
    log = (tmp_path / "r" / "train.log").read_text()
    assert "error: CallbackError: Boom.after_epoch raised RuntimeError: disk on fire" in log
    assert "end (failed)" in log and logger._log is None  # the file is closed
    assert len(list(csv.DictReader(open(tmp_path / "r" / "history.csv")))) == 2


def test_uses_the_trainer_run_dir_and_the_bound_run(tmp_path):
    train, val, _ = tiny_data()
    trainer = make_trainer([CSVLogger()], epochs=1, progress=False)
    trainer.run_dir = tmp_path / "e" / "from-trainer"
    trainer.fit(train, val)
    assert (tmp_path / "e" / "from-trainer" / "history.csv").is_file()
    logger = CSVLogger()
    logger.bind(RunInfo("e", "bound", RunDir(tmp_path, "e", "bound"), tmp_path))
    make_trainer([logger], epochs=1, progress=False).fit(train, val)
    assert "experiment e, run bound" in (tmp_path / "e" / "bound" / "train.log").read_text()


def test_validate_results(tmp_path):
    train, val, _ = tiny_data()
    trainer = make_trainer([], epochs=1, progress=False)
    logger = CSVLogger(run_dir=tmp_path / "r")
    logger.bind(RunInfo(verb="validate"))
    logger.start(trainer)
    logger.log_results("validate", trainer.validate(val))
    logger.finish()
    assert set(json.loads((tmp_path / "r" / "validate.json").read_text())) == {"val_loss"}
    assert "start validate" in (tmp_path / "r" / "train.log").read_text()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    train, val, _ = tiny_data()
    make_trainer([CSVLogger(run_dir=tmp_path / "r")], epochs=1, progress=False).fit(train, val)
    assert not (tmp_path / "r").exists()


def test_unlabelled_iterable_loader_still_logs(tmp_path):
    # A loader without len() (a generator-backed iterable): the logger needs nothing from it.
    class Stream:
        def __iter__(self):
            return iter(DataLoader(tiny_data()[0].dataset, batch_size=8))

    make_trainer([CSVLogger(run_dir=tmp_path / "r", plot=False)], epochs=1, progress=False).fit(Stream())
    assert (tmp_path / "r" / "history.csv").is_file()
