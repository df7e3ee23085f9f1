"""CSVLogger: the run folder's own record (history CSV/JSON, plot, train.log). Always on in the CLI.

Named ``csv_logger`` so that ``import csv`` elsewhere in the package never finds this module.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from adaptrain.core.history import format_values
from adaptrain.loggers.base import Logger, RunInfo
from adaptrain.loggers.run_dir import RunDir

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


def epoch_line(record: Mapping[str, Any], max_epochs: int) -> str:
    """The line :class:`~adaptrain.ProgressBar` prints per epoch when stdout is not a terminal.

    Example:
        >>> epoch_line({"epoch": 1, "lr": 0.001, "train_loss": 0.5, "epoch_time": 2.0, "samples_per_s": 90.0}, 3)
        'epoch 1/3  lr 0.001  train_loss 0.5  2.0s  90 samples/s'
    """
    return (f"epoch {record['epoch']}/{max_epochs}  {format_values(dict(record))}  "
            f"{record.get('epoch_time', 0):.1f}s  {record.get('samples_per_s', 0):.0f} samples/s")


class CSVLogger(Logger):
    """Writes ``history.csv`` and ``history.json`` after every epoch (atomically, so a crash or a
    reader never sees half a file), ``history.png`` at the end, and ``train.log``: start info, the
    progress bar's per-epoch lines, and end info (status, time, stop reason, and the full traceback
    when the run failed). Nothing is written before the first optimizer step.

    An observer: changes nothing. Runs before the other loggers (``order`` 80), so the files
    exist when MLflow uploads them at the end of the run.

    Args:
        run_dir: the folder to write to (the trainer's other loggers then use it too); default
            ``trainer.run_dir`` (set by the CLI), else a new ``runs/default/<timestamp>``.
        plot: write ``history.png`` at the end of ``fit``.

    Example:
        >>> import tempfile
        >>> logger = CSVLogger(run_dir=tempfile.mkdtemp())  # Trainer(..., callbacks=[logger])
    """

    order = 80

    def __init__(self, run_dir: str | Path | None = None, plot: bool = True) -> None:
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.plot = plot
        self._log: IO[str] | None = None
        self._files: RunDir | None = None
        self._adaptations_logged = 0  # train.log has a line for each of the first N adaptations

    @property
    def files(self) -> RunDir | None:
        """The paths of the run folder, once started."""
        return self._files

    @property
    def own_run_dir(self) -> Path | None:
        return self.run_dir

    @property
    def needs_run_dir(self) -> bool:
        return True

    def _start(self, trainer: Trainer) -> None:
        run = self.run or RunInfo()
        if self.run_dir is not None:
            self._files = RunDir.at(self.run_dir)
        else:
            self._files = run.run_dir or RunDir(run.root_dir, run.experiment, run.run_name or "run")
        self._files.path.mkdir(parents=True, exist_ok=True)
        self._log = open(self._files.log, "a", buffering=1)  # line-buffered: `tail -f` shows each epoch
        state = trainer.state
        model_params = sum(p.numel() for p in trainer.model.parameters())
        if self.resumed_at is not None:  # appended to the log of the run it continues
            epoch, step = self.resumed_at
            self._write(f"{_now(self.fit_started)} resume {run.verb} at epoch {epoch}, optimizer step {step}")
        self._write(f"{_now(self.fit_started)} start {run.verb}: experiment {run.experiment}, run {self._files.name}, "
                    f"model {type(trainer.model).__name__} ({model_params:,} parameters), "
                    f"optimizer {type(state.optimizer).__name__}, device {trainer.device}, "
                    f"precision {trainer.precision_name}, max_epochs {state.max_epochs}, "
                    f"seed {trainer.seed}")
        self._write(f"run folder: {self._files.path}")

    def after_batch(self, trainer: Trainer) -> None:
        pass  # per-step values go to MLflow / TensorBoard; the files hold one row per epoch

    def after_epoch(self, trainer: Trainer) -> None:
        if not self._started or self._files is None:
            return
        history = trainer.state.history
        history.to_csv(self._files.history_csv)
        history.to_json(self._files.history_json)
        self._write_adaptations(history)
        if history.records:
            self._write(epoch_line(history.records[-1], trainer.state.max_epochs))

    def _write_adaptations(self, history: Any) -> None:
        """``adaptations.json``, and a train.log line for each change not logged yet."""
        if not history.adaptations or self._files is None:
            return
        history.adaptations_to_json(self._files.adaptations)
        for entry in history.adaptations[self._adaptations_logged:]:
            self._write(f"adapted: {entry['reason']}")
        self._adaptations_logged = len(history.adaptations)

    def log_results(self, verb: str, results: Mapping[str, Any]) -> None:
        if not self._started or self._files is None:
            return
        with open(self._files.results(verb), "w") as handle:
            json.dump(dict(results), handle, indent=1)
        self._write(f"{verb}: {format_values(dict(results))}")

    def _finish(self, status: str) -> None:
        trainer, files = self.trainer, self._files
        if trainer is not None and files is not None:
            state = trainer.state
            self._write_adaptations(state.history)
            if state.history.records:
                state.history.to_csv(files.history_csv)
                state.history.to_json(files.history_json)
                if self.plot:
                    state.history.plot(files.plot)
            if state.stop_reason:
                self._write(f"stopped: {state.stop_reason}")
            error = self.error if self.error is not None else state.exception
            if error is not None and status != "FINISHED":
                self._write(f"error: {type(error).__name__}: {error}")
                if isinstance(error, Exception):  # a failure, not Ctrl-C or a signal: the whole story
                    self._write("".join(traceback.format_exception(error)).rstrip())
            # The resource monitor (a later issue) writes its own report to files.resources;
            # its one-line summary belongs here, before the end line.
            elapsed = time.time() - self.fit_started
            counts = f"{state.epoch} epochs, {state.global_step} optimizer steps, " if state.global_step else ""
            self._write(f"{_now()} end ({status.lower()}): {counts}{elapsed:.1f}s")
        if self._log is not None:
            self._log.close()
            self._log = None

    def _write(self, line: str) -> None:
        if self._log is not None:
            self._log.write(line + "\n")


def _now(timestamp: float | None = None) -> str:
    moment = datetime.fromtimestamp(timestamp) if timestamp is not None else datetime.now()
    return moment.strftime("%Y-%m-%d %H:%M:%S")
