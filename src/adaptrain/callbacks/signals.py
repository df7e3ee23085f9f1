"""Stop cleanly on SIGTERM / SIGINT (and requeue on SIGUSR1 under SLURM), after saving a checkpoint.

What happens on a signal:

- The handler only records it. Training runs on to the end of the current optimizer step (the
  whole accumulation window), or of the current epoch if the signal came during validation.
- There, the :class:`~adaptrain.ModelCheckpoint` writes ``last.ckpt`` (unless it just wrote this
  very point), and :class:`TrainingInterrupted` ends ``fit``.
- ``TrainingInterrupted`` is a ``SystemExit``: a script that does not catch it exits with code
  ``128 + signal number``, the shell's convention for "killed by signal":

  ======== ================================================ =========
  signal   sent by                                          exit code
  ======== ================================================ =========
  SIGINT   Ctrl-C                                           130
  SIGTERM  ``kill``, SLURM at the time limit, Kubernetes    143
  SIGUSR1  SLURM ``--signal=USR1@90``: also requeues the    138
           job with ``scontrol requeue $SLURM_JOB_ID``
  ======== ================================================ =========

- A second signal while the first is pending stops at once (a second Ctrl-C raises
  ``KeyboardInterrupt``); whatever was being written stays intact thanks to the atomic writes.

Handlers are installed in ``before_fit`` (from the main thread only: Python allows nothing else)
and the previous ones are put back in ``after_fit`` or when an exception ends ``fit``.

DataLoader workers ignore the handled signals, so a signal to the whole process group (SLURM's
time limit, ``kill -TERM -<pgid>``, Ctrl-C) reaches the main process only. A worker cannot ignore
a signal from its very start: torch installs its own SIGTERM handler (which kills the worker) before
``worker_init_fn`` runs. So while a loader with workers starts them (``before_train`` /
``before_validate``), the main thread blocks the handled signals; the workers inherit the mask,
ignore the signals, then unblock them. The main thread unblocks at the epoch's first batch (or the
end of validation), where a signal that came meanwhile is delivered: it is delayed, never lost. What
it costs: during that time (the workers' start and the first batch, or a whole validation pass with
workers) a second Ctrl-C waits for the first batch too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptrain.core.callback import Callback, CheckpointSaver
from adaptrain.distributed.env import barrier, max_over_ranks, world_size
from adaptrain.errors import ConfigError

if TYPE_CHECKING:
    from adaptrain.callbacks.checkpointing import ModelCheckpoint
    from adaptrain.core.trainer import Trainer


class TrainingInterrupted(SystemExit):
    """``fit`` stopped on a signal; ``code`` is the process exit code (128 + signal number).

    Attributes: ``signum``, ``checkpoint`` (the path saved, or None), ``signal_step`` (the
    optimizer step count when the signal arrived), ``saved_step`` (the step in the checkpoint).
    Uncaught, the interpreter exits with ``code`` and prints nothing: the trainer printed the message.

    Example:
        >>> stop = TrainingInterrupted(signal.SIGTERM, None, 120, None)
        >>> stop.code, str(stop)
        (143, 'SIGTERM received at step 120: training stopped, no checkpoint saved.')
    """

    def __init__(self, signum: int, checkpoint: Path | None, signal_step: int, saved_step: int | None,
                 requeued: bool = False) -> None:
        name = signal.Signals(signum).name
        if checkpoint is None:
            where = "no checkpoint saved"
        else:
            then = "the job was requeued" if requeued else "resume with fit(..., ckpt_path='last')"
            where = f"saved {checkpoint} at step {saved_step}; {then}"
        super().__init__(f"{name} received at step {signal_step}: training stopped, {where}.")
        self.code = 128 + signum  # what the interpreter exits with when nobody catches this
        self.signum, self.checkpoint, self.requeued = signum, checkpoint, requeued
        self.signal_step, self.saved_step = signal_step, saved_step


class SignalHandler(Callback):
    """Turns SIGTERM / SIGINT (SIGUSR1 under SLURM) into a checkpoint and a clean stop.

    :class:`~adaptrain.ModelCheckpoint` drives one itself (``handle_signals=True``, the default), so
    most runs need nothing more. Add one yourself to choose the signals or the requeue; it then
    replaces the checkpoint's own. Changes training: it stops ``fit``.

    Args:
        checkpoint: the ModelCheckpoint that saves; default: the trainer's first one.
        signals: the signals to catch; default SIGTERM, SIGINT, and SIGUSR1 under SLURM.
        requeue: on SIGUSR1, run ``scontrol requeue``; default: when ``SLURM_JOB_ID`` is set.

    Example:
        >>> from adaptrain.callbacks.checkpointing import ModelCheckpoint
        >>> checkpoint = ModelCheckpoint(every_n_train_steps=200)
        >>> callbacks = [checkpoint, SignalHandler(checkpoint, requeue=False)]
    """

    order = 95  # after ModelCheckpoint (90): a step checkpoint due at this step is written first

    def __init__(self, checkpoint: ModelCheckpoint | None = None, signals: tuple[int, ...] | None = None,
                 requeue: bool | None = None) -> None:
        on_slurm = "SLURM_JOB_ID" in os.environ
        default = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR1,) if on_slurm else ())
        self.checkpoint, self.signals = checkpoint, tuple(signals or default)
        self.requeue = on_slurm if requeue is None else requeue
        self.received: int | None = None
        self.received_step = 0
        self._previous: dict[int, Any] = {}
        self._trainer: Trainer | None = None
        self._blocked = False  # the main thread holds the signals while a loader starts its workers

    def before_fit(self, trainer: Trainer) -> None:
        if self.checkpoint is None:
            found = trainer.callbacks.find(CheckpointSaver)
            if not found:
                raise ConfigError("SignalHandler(checkpoint=...)", "is None and the trainer has no ModelCheckpoint "
                                  "to save with; add ModelCheckpoint(...) to callbacks.")
            self.checkpoint = found[0]
        self.received, self._trainer = None, trainer
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("SignalHandler: fit() runs outside the main thread, where Python cannot install "
                          "signal handlers; SIGTERM/SIGINT will not save a checkpoint.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    # Workers are forked when the phase's loader iterator is made, after before_train / before_validate.
    def before_train(self, trainer: Trainer) -> None:
        self._hold_while_workers_start(trainer.state.train_loader)

    def before_batch(self, trainer: Trainer) -> None:
        self._release()  # the workers exist (and ignore the signals): a held signal arrives now

    def after_train(self, trainer: Trainer) -> None:
        self._release()

    def before_validate(self, trainer: Trainer) -> None:
        self._hold_while_workers_start(trainer.state.val_loader)

    def after_validate(self, trainer: Trainer) -> None:
        self._release()

    def _hold_while_workers_start(self, loader: Any) -> None:
        if not self._previous or not _workers_ignore(loader, self.signals) or not hasattr(signal, "pthread_sigmask"):
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        self._blocked = True

    def _release(self) -> None:
        if self._blocked:
            self._blocked = False
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)  # a pending signal runs _on_signal here

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: record only; the loop acts at a step boundary.
        if self.received is None:
            self.received = signum
            self.received_step = self._trainer.state.global_step if self._trainer else 0
            return
        self.restore()  # a second signal: stop now; a third gets the default behaviour
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise TrainingInterrupted(signum, None, self.received_step, None)

    def after_step(self, trainer: Trainer) -> None:
        if self._agreed(trainer) is not None:
            self._stop(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        if self._agreed(trainer) is not None:  # the signal came during validation: the epoch end is as clean
            self._stop(trainer)

    def _agreed(self, trainer: Trainer) -> int | None:
        """The signal to act on now. On several ranks every rank asks every step (one all-reduce of one
        number): a signal seen by any rank stops all of them at this same step, with one checkpoint;
        each rank otherwise meets its signal a step apart and the others wait in a collective."""
        if world_size() > 1:
            seen = max_over_ranks(self.received or 0)
            if seen and self.received is None:
                self.received, self.received_step = seen, trainer.state.global_step
        return self.received

    def after_fit(self, trainer: Trainer) -> None:
        received = self.received
        self.restore()
        if received is not None and trainer.state.batch_idx == 0:  # arrived after the last check
            self._stop(trainer)

    def exception(self, trainer: Trainer) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers that were installed before ``fit`` (and unblock the signals)."""
        if self._blocked:
            self._blocked = False
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _stop(self, trainer: Trainer) -> None:
        signum, self.received = self.received, None
        self.restore()
        path = self.checkpoint.save_now(trainer)
        barrier()  # no rank exits (and makes torchrun stop the rest) before rank zero has written the file
        requeued = (signum == getattr(signal, "SIGUSR1", None) and self.requeue and trainer.is_global_zero
                    and requeue_slurm_job())  # one requeue for the job, not one per rank
        error = TrainingInterrupted(signum, path, self.received_step, trainer.state.global_step, requeued)
        trainer.print(str(error))
        trainer.state.interrupt = error  # raised by the loop once every callback has seen this event


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array task included); False, with a warning, if it failed."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        warnings.warn(f"SignalHandler: could not run 'scontrol requeue {job}' ({error}); requeue the job by hand.")
        return False
    if result.returncode != 0:
        warnings.warn(f"SignalHandler: 'scontrol requeue {job}' failed with code {result.returncode}: "
                      f"{result.stderr.strip()}; requeue the job by hand.")
        return False
    return True


class _IgnoreInWorkers:
    """A DataLoader ``worker_init_fn``: workers ignore the handled signals, then the user's function runs.

    SLURM's time limit, ``kill -TERM -<pgid>`` and Ctrl-C in a terminal signal the whole process
    group: without this the workers die first and the main process fails ("DataLoader worker exited
    unexpectedly") before it can save. The trainer shuts its workers down itself when fit ends.
    The worker starts with the signals blocked (see the module docstring): ignoring them first
    discards one that came during the start, then they are unblocked.
    """

    def __init__(self, signals: tuple[int, ...], user_fn: Any) -> None:
        self.signals, self.user_fn = signals, user_fn

    def __call__(self, worker_id: int) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        if self.user_fn is not None:
            self.user_fn(worker_id)


def _workers_ignore(loader: Any, signals: tuple[int, ...]) -> bool:
    """Make ``loader``'s workers ignore ``signals``; True when it starts worker processes."""
    if getattr(loader, "num_workers", 0) <= 0 or not hasattr(loader, "worker_init_fn"):
        return False
    if not isinstance(loader.worker_init_fn, _IgnoreInWorkers):
        loader.worker_init_fn = _IgnoreInWorkers(signals, loader.worker_init_fn)
    return True
