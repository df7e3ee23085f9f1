"""The Logger base class: an observer callback that records a run (files, MLflow, TensorBoard).

A logger reads ``trainer.state`` and changes nothing. It records, on rank zero only:

* at ``before_fit``: the start of a run and its parameters (the flattened resolved config when
  the CLI bound one with :meth:`Logger.bind`, else the trainer's main settings);
* after batches at the trainer's refresh points (``batch_idx % log_every_n_steps == 0``, where
  ``state.running`` was just read from the device, so logging adds no host-device sync):
  ``train_<name>_step`` and ``lr_step`` at ``step = global_step``;
* at ``after_epoch``: every number in the epoch's history record at ``step = epoch``;
* at ``after_fit`` / ``exception``: the end of the run, with its status.

Subclasses implement ``_start``, ``_log_metrics`` and ``_finish``.

Example:
    >>> class PrintLogger(Logger):
    ...     def _log_metrics(self, metrics, step):
    ...         print(step, metrics)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from adaptrain.distributed import env as distributed
from adaptrain.core.callback import Callback
from adaptrain.loggers.run_dir import RunDir, default_run_name

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


@dataclass
class RunInfo:
    """What a logger needs to know about the run; the CLI fills it from the config."""

    experiment: str = "default"
    run_name: str | None = None
    run_dir: RunDir | None = None
    root_dir: Path = Path("runs")
    params: dict[str, Any] = field(default_factory=dict)  # flattened resolved config
    verb: str = "fit"  # fit | validate | test | predict

    @classmethod
    def from_trainer(cls, trainer: "Trainer") -> "RunInfo":
        """Defaults for a logger used without the CLI: the trainer's ``run_dir`` if it has one."""
        path = getattr(trainer, "run_dir", None)
        run_dir = None
        if path is not None:
            path = Path(path)
            run_dir = RunDir(path.parent.parent, path.parent.name, path.name)
        return cls(experiment=(run_dir.experiment if run_dir else "") or "default",
                   run_name=run_dir.name if run_dir else default_run_name(),
                   run_dir=run_dir, root_dir=run_dir.root if run_dir else Path("runs"),
                   params=trainer_params(trainer))


def trainer_params(trainer: "Trainer") -> dict[str, Any]:
    """The settings that identify a run when no config file describes it."""
    optimizer = trainer.state.optimizer
    return {"model": type(trainer.model).__name__, "optimizer": type(optimizer).__name__,
            "lr": optimizer.defaults.get("lr"), "max_epochs": trainer.state.max_epochs,
            "precision": trainer.precision_name, "accumulate_grad_batches": trainer.state.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val, "seed": trainer.seed}


def numeric(values: Mapping[str, Any]) -> dict[str, float]:
    """The plain numbers of a record (no bools, strings or the epoch counter)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}


def best_checkpoint(trainer: "Trainer") -> Path | None:
    """The best checkpoint a checkpoint callback reports (``best_model_path``), if it exists."""
    for callback in trainer.callbacks.callbacks:
        for attr in ("best_model_path", "best_path"):
            value = getattr(callback, attr, None)
            if value and Path(value).is_file():
                return Path(value)
    return None


class Logger(Callback):
    """Base of the loggers: rank-zero lifecycle (start, metrics, finish) wired to the loop's events.

    An observer: reads the state, changes nothing. Besides the hooks, the CLI calls
    :meth:`start`, :meth:`log_metrics` and :meth:`finish` itself for ``validate`` and ``test``.
    """

    order = 95  # after the other callbacks (ModelCheckpoint is 90: the best file exists), before the bar

    def __init__(self) -> None:
        self.run: RunInfo | None = None
        self.trainer: "Trainer | None" = None
        self._started = False

    def bind(self, run: RunInfo) -> None:
        """Tell the logger the run's names, folder and parameters (the CLI does this)."""
        self.run = run

    # ------------------------------------------------------------------ lifecycle
    def start(self, trainer: "Trainer") -> None:
        """Open the run (once; a no-op on ranks other than zero)."""
        if self._started or not distributed.is_global_zero():
            return
        if self.run is None:
            self.run = RunInfo.from_trainer(trainer)
        self.trainer = trainer
        self._start(trainer)
        self._started = True

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._started:
            values = numeric(metrics)
            if values:
                self._log_metrics(values, step)

    def log_results(self, verb: str, results: Mapping[str, Any]) -> None:
        """The metrics of a ``validate`` / ``test`` run (logged at step 0 unless overridden)."""
        self.log_metrics(results, 0)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` ("FINISHED", "FAILED" or "KILLED")."""
        if self._started:
            self._started = False
            self._finish(status)

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer: "Trainer") -> None:
        self.start(trainer)

    def after_batch(self, trainer: "Trainer") -> None:
        state = trainer.state
        if self._started and state.batch_idx % trainer.log_every_n_steps == 0 and state.running:
            values = {f"train_{k}_step": v for k, v in state.running.items()}
            self.log_metrics({**values, "lr_step": state.lr}, state.global_step)

    def after_epoch(self, trainer: "Trainer") -> None:
        if self._started and trainer.state.history.records:
            record = trainer.state.history.records[-1]
            self.log_metrics(record, int(record.get("epoch", trainer.state.epoch)))

    def after_fit(self, trainer: "Trainer") -> None:
        self.finish("FINISHED")

    def exception(self, trainer: "Trainer") -> None:
        # Ctrl-C, or a signal turned into SystemExit by ModelCheckpoint's handler: stopped, not broken.
        status = "KILLED" if isinstance(trainer.state.exception, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.finish(status)
        except Exception as error:  # noqa: BLE001 - the training error is the one to report, not ours
            warnings.warn(f"{type(self).__name__} could not close its run after the error: "
                          f"{type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ to implement
    def _start(self, trainer: "Trainer") -> None:
        pass

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def _finish(self, status: str) -> None:
        pass

