"""The Logger base class: an observer callback that records a run (files, MLflow, TensorBoard).

A logger reads ``trainer.state`` and changes nothing. It records, on rank zero only:

* at the first optimizer step (lazily, not at ``before_fit``: a run that fails before it trains
  leaves no run folder files, no MLflow run, no event file): the start of a run and its parameters
  (the flattened resolved config when the CLI bound one with :meth:`Logger.bind`, else the
  trainer's main settings);
* after batches at the trainer's refresh points (``batch_idx % log_every_n_steps == 0``, where
  ``state.running`` was just read from the device, so logging adds no host-device sync):
  ``train_<name>_step`` and ``lr_step`` at ``step = global_step``;
* at ``after_epoch``: every number in the epoch's history record at ``step = epoch``;
* at ``after_fit`` / ``exception``: the end of the run, with its status.

Every logger of one trainer records into the same run folder: the one the CLI bound, else
``trainer.run_dir``, else a :class:`~adaptrain.CSVLogger`'s ``run_dir``, else a new
``runs/default/<timestamp>`` claimed once (see :func:`shared_run`).

Subclasses implement ``_start``, ``_log_metrics`` and ``_finish``.

Example:
    >>> class PrintLogger(Logger):
    ...     def _log_metrics(self, metrics, step):
    ...         print(step, metrics)
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptrain.core.batch_sizing import adapted_params
from adaptrain.core.callback import Callback
from adaptrain.distributed import env as distributed
from adaptrain.loggers import run_dir as run_dirs
from adaptrain.loggers.run_dir import RunDir

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
    def from_trainer(cls, trainer: Trainer) -> RunInfo:
        """The run of a logger used without the CLI: :func:`shared_run` (one per trainer)."""
        return shared_run(trainer)


# One RunInfo per trainer, so that its loggers, started one after the other, agree on the folder
# (resolving it per logger gave two timestamped folders a second apart). Weak keys: a trainer
# that is garbage-collected takes its entry with it.
_SHARED: weakref.WeakKeyDictionary[Any, RunInfo] = weakref.WeakKeyDictionary()


def shared_run(trainer: Trainer) -> RunInfo:
    """The run every unbound logger of ``trainer`` records into, resolved once per trainer.

    The folder is ``trainer.run_dir`` if set, else the ``run_dir`` a logger was given (a
    ``CSVLogger(run_dir=...)``), else, when some logger writes files, a new
    ``runs/default/<timestamp>`` (claimed with ``mkdir``, so two runs never share one); with only
    loggers that write no files (MLflow alone) there is no folder and the run is named by the time.

    Example:
        >>> import tempfile, torch
        >>> from adaptrain import Trainer
        >>> from adaptrain.loggers import CSVLogger
        >>> model = torch.nn.Linear(2, 1)
        >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
        ...                   callbacks=[CSVLogger(run_dir=tempfile.mkdtemp() + "/exp/run")], progress=False)
        >>> shared_run(trainer) is shared_run(trainer), shared_run(trainer).run_dir.name
        (True, 'run')
    """
    found = _SHARED.get(trainer)
    if found is not None:
        return found
    loggers = [cb for cb in trainer.callbacks.callbacks if isinstance(cb, Logger)]
    path = getattr(trainer, "run_dir", None)
    if path is None:
        path = next((lg.own_run_dir for lg in loggers if lg.own_run_dir is not None), None)
    run_dir: RunDir | None = None
    if path is not None:
        run_dir = RunDir.at(path)
    elif any(lg.needs_run_dir for lg in loggers):
        run_dir = run_dirs.create_run_dir("runs", "default")
    info = RunInfo(experiment=(run_dir.experiment if run_dir else "") or "default",
                   run_name=run_dir.name if run_dir else run_dirs.default_run_name(),
                   run_dir=run_dir, root_dir=run_dir.root if run_dir else Path("runs"),
                   params=trainer_params(trainer))
    _SHARED[trainer] = info
    return info


def trainer_params(trainer: Trainer) -> dict[str, Any]:
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


def best_checkpoint(trainer: Trainer) -> Path | None:
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

    Attributes:
        error: the exception that ended the run (set before ``_finish`` on a failure), else None.
        resumed_at: ``(epoch, optimizer step)`` where ``fit`` began when it began from a checkpoint
            (steps already taken at ``before_fit``), else None. A logger may then continue the run
            it recorded before (MLflow does, with the id it stored in the run folder).
    """

    order = 95  # after the other callbacks (ModelCheckpoint is 90: the best file exists), before the bar

    def __init__(self) -> None:
        self.run: RunInfo | None = None
        self.trainer: Trainer | None = None
        self.error: BaseException | None = None
        self.resumed_at: tuple[int, int] | None = None
        self.fit_started = time.time()  # when fit began (the logger itself starts at the first step)
        self._started = False

    @property
    def own_run_dir(self) -> Path | None:
        """A run folder this logger was given itself (CSVLogger's ``run_dir``); the trainer's other
        loggers then share it."""
        return None

    @property
    def needs_run_dir(self) -> bool:
        """Whether this logger writes into the run folder (so one must be created for it)."""
        return False

    def bind(self, run: RunInfo) -> None:
        """Tell the logger the run's names, folder and parameters (the CLI does this)."""
        self.run = run

    # ------------------------------------------------------------------ lifecycle
    def start(self, trainer: Trainer) -> None:
        """Open the run (once; a no-op on ranks other than zero)."""
        if self._started or not distributed.is_global_zero():
            return
        if self.run is None:
            self.run = shared_run(trainer)
        self.trainer = trainer
        self.run.params.update(adapted_params(trainer))  # what the batch-size search chose, as run params
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

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        """Close the run with ``status`` ("FINISHED", "FAILED" or "KILLED"); ``error``: what ended it."""
        if self._started:
            self._started = False
            self.error = error
            self._finish(status)

    @property
    def resuming(self) -> bool:
        """Whether this ``fit`` continues from a checkpoint (see ``resumed_at``)."""
        return self.resumed_at is not None

    @property
    def started(self) -> bool:
        """Whether the run is open (from the first optimizer step of ``fit`` to its end)."""
        return self._started

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer: Trainer) -> None:
        # Nothing is opened yet: a fit that fails before its first optimizer step (a model that does
        # not fit the data, a bad batch) must leave no run behind. The run opens at the first step.
        self.trainer = trainer
        state = trainer.state  # a checkpoint is restored before the events: steps taken means a resume
        self.resumed_at = (state.epoch, state.global_step) if state.global_step > 0 else None
        self.fit_started = time.time()
        self.error = None

    def after_step(self, trainer: Trainer) -> None:
        if not self._started:
            self.start(trainer)

    def after_batch(self, trainer: Trainer) -> None:
        state = trainer.state
        if self._started and state.batch_idx % trainer.log_every_n_steps == 0 and state.running:
            values = {f"train_{k}_step": v for k, v in state.running.items()}
            self.log_metrics({**values, "lr_step": state.lr}, state.global_step)

    def after_epoch(self, trainer: Trainer) -> None:
        if not self._started:
            self.start(trainer)  # an epoch that took no step (every batch skipped) still gets its record
        if self._started and trainer.state.history.records:
            record = trainer.state.history.records[-1]
            self.log_metrics(record, int(record.get("epoch", trainer.state.epoch)))

    def after_fit(self, trainer: Trainer) -> None:
        self.finish("FINISHED")

    def exception(self, trainer: Trainer) -> None:
        # Ctrl-C, or a signal turned into SystemExit by ModelCheckpoint's handler: stopped, not broken.
        error = trainer.state.exception
        status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.finish(status, error)
        except Exception as error:  # noqa: BLE001 - the training error is the one to report, not ours
            warnings.warn(f"{type(self).__name__} could not close its run after the error: "
                          f"{type(error).__name__}: {error}", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ to implement
    def _start(self, trainer: Trainer) -> None:
        pass

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def _finish(self, status: str) -> None:
        pass

