"""Save checkpoints: every N epochs and/or optimizer steps, the best k by a monitored value, and last.ckpt."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptrain.callbacks.early_stopping import missing_monitor_error
from adaptrain.callbacks.signals import SignalHandler
from adaptrain.checkpoint.io import link_atomic, write_checkpoint
from adaptrain.core.callback import CheckpointSaver
from adaptrain.errors import ConfigError, NonFiniteWeightsError

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

LAST = "last.ckpt"


class ModelCheckpoint(CheckpointSaver):
    """Writes everything a resume needs (see :mod:`adaptrain.checkpoint.io`), atomically.

    - Every ``every_n_epochs`` epochs (at the epoch's end, after validation) and/or every
      ``every_n_train_steps`` optimizer steps (right after the step: no accumulation window is
      ever half done in a checkpoint).
    - ``last.ckpt`` always points at the newest one: ``fit(..., ckpt_path="last")`` resumes from it.
    - With ``monitor``, the ``save_top_k`` best epochs by that value are kept as
      ``epoch=3-step=120-val_loss=0.1234.ckpt``; without, the ``save_top_k`` newest checkpoints as
      ``epoch=3-step=120.ckpt`` (-1 keeps all, 0 none). Files that drop out are deleted only after
      the new file is in place. Step checkpoints carry no monitored value, so with ``monitor`` they
      update ``last.ckpt`` only.
    - ``handle_signals``: SIGTERM / SIGINT (SIGUSR1 under SLURM) save and stop ``fit`` at the next
      step boundary; see :mod:`adaptrain.callbacks.signals` for the exit codes.
    - Never a NaN checkpoint: before each write the losses tracked since the last sync are checked
      (a NaN/Inf one raises :class:`~adaptrain.NonFiniteLossError` naming its batch) and so are the
      weights (:class:`NonFiniteWeightsError`), so nothing is written and nothing rotated out: the
      last good checkpoint, and ``last.ckpt``, stay on disk to resume from. The check costs one
      reduction over the parameters and one host-device sync per save.

    Only rank zero writes. Changes training only through the signal handling.

    Args:
        dirpath: the folder; default ``<trainer.run_dir>/checkpoints``, else ``./checkpoints``.
        monitor: a value of the epoch record, e.g. ``"val_loss"``; None ranks by recency.
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
        save_top_k: how many named checkpoints to keep (-1: all).
        save_last: keep ``last.ckpt``.
        every_n_epochs: save at the end of every N-th epoch (None or 0: never).
        every_n_train_steps: save after every N-th optimizer step (None or 0: never).
        handle_signals: save and stop on SIGTERM / SIGINT (unless a SignalHandler was added).

    Example:
        >>> checkpoint = ModelCheckpoint(monitor="val_loss", save_top_k=2, every_n_train_steps=500)
        >>> # Trainer(..., callbacks=[checkpoint]).fit(train, val)     then, after a crash or preemption:
        >>> # Trainer(..., callbacks=[checkpoint]).fit(train, val, ckpt_path="last")
    """

    order = 90  # after callbacks that update their state at an epoch's end, so the checkpoint holds it

    def __init__(self, dirpath: str | os.PathLike | None = None, monitor: str | None = None, mode: str = "min",
                 save_top_k: int = 1, save_last: bool = True, every_n_epochs: int | None = 1,
                 every_n_train_steps: int | None = None, handle_signals: bool = True) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f'ModelCheckpoint(mode="{mode}"): expected "min" or "max".')
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k!r}): expected an integer >= -1.")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"ModelCheckpoint({name}={value!r}): expected an integer >= 0, or None.")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.monitor, self.mode, self.save_top_k, self.save_last = monitor, mode, save_top_k, save_last
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs or 0, every_n_train_steps or 0
        self.handle_signals = handle_signals
        self.best: dict[str, float] = {}  # file name -> monitored value (with monitor)
        self.recent: list[str] = []  # file names, oldest first (without monitor)
        self.superseded: list[str] = []  # dropped by the latest save: deleted once it was in place
        self._saved_at: tuple[int, int, int] | None = None  # (epoch, global_step, batch_idx) of the last save
        self._dir = self.dirpath or Path("checkpoints")  # resolved against the trainer in before_fit
        self._signals: SignalHandler | None = None

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint[monitor={self.monitor},mode={self.mode}]"  # two differently ranked ones coexist

    def directory(self, trainer: Trainer) -> Path:
        """Where the checkpoints go: ``dirpath``, or the run folder's ``checkpoints/``."""
        if self.dirpath is not None:
            return self.dirpath
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is None:
            return Path("checkpoints")
        return Path(getattr(run_dir, "checkpoints", Path(run_dir) / "checkpoints"))

    def last_path(self, trainer: Trainer) -> Path:
        return self.directory(trainer) / LAST

    @property
    def best_model_path(self) -> str | None:
        """The best checkpoint by ``monitor`` (the newest without one), or None before the first save."""
        names = self._ranked(self.best) if self.monitor else self.recent[::-1]
        return str(self._dir / names[0]) if names else None

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer: Trainer) -> None:
        if self.monitor and self.monitor.startswith("val_") and trainer.state.val_loader is None:
            raise ConfigError("ModelCheckpoint(monitor=...)", f'is "{self.monitor}", but fit() got no val_loader; '
                              "pass val_loader or monitor a train_ value.")
        self._dir = self.directory(trainer)
        self._saved_at = None
        if trainer.is_global_zero:
            self._delete(self.superseded)  # a run killed between its save and the clean-up left these
            _remove_stale_temporaries(self._dir)
        self._signals = None
        if self.handle_signals and not trainer.callbacks.find(SignalHandler):
            self._signals = SignalHandler(self)  # driven from this callback's hooks: one callback to add
            self._signals.before_fit(trainer)

    # The signal handler's hooks around loader workers' start (see adaptrain.callbacks.signals).
    def before_train(self, trainer: Trainer) -> None:
        if self._signals:
            self._signals.before_train(trainer)

    def before_batch(self, trainer: Trainer) -> None:
        if self._signals:
            self._signals.before_batch(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self._signals:
            self._signals.after_train(trainer)

    def before_validate(self, trainer: Trainer) -> None:
        if self._signals:
            self._signals.before_validate(trainer)

    def after_validate(self, trainer: Trainer) -> None:
        if self._signals:
            self._signals.after_validate(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if self.every_n_train_steps and trainer.state.global_step % self.every_n_train_steps == 0:
            self._save(trainer, value=None)
        if self._signals:
            self._signals.after_step(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        state = trainer.state
        if self.every_n_epochs and state.epoch % self.every_n_epochs == 0:
            record = state.history.records[-1]
            value = record.get(self.monitor) if self.monitor else None
            validated = any(key.startswith("val_") for key in record)
            if self.monitor and value is None and (validated or not self.monitor.startswith("val_")):
                self._save(trainer, value=None)  # keep the epoch, then say what is wrong
                raise missing_monitor_error(self.monitor, [k for k in record if k != "epoch"], "ModelCheckpoint")
            self._save(trainer, value=float(value) if value is not None else None)
        if self._signals:
            self._signals.after_epoch(trainer)

    def after_fit(self, trainer: Trainer) -> None:
        # A clean end that no save covered (e.g. every_n_epochs=2 after 3 epochs): last.ckpt gets it.
        # Not when fit was cancelled mid-epoch: the accumulation window may be half done.
        if self.save_last and trainer.state.batch_idx == 0 and self._saved_at != _position(trainer):
            self._save(trainer, value=None)
        if self._signals:
            self._signals.after_fit(trainer)

    def exception(self, trainer: Trainer) -> None:
        if self._signals:
            self._signals.exception(trainer)

    def save_now(self, trainer: Trainer) -> Path:
        """Write last.ckpt for the current point (a step or epoch boundary) unless it was just written."""
        if self._saved_at != _position(trainer) or not self.save_last:
            self._save(trainer, value=None, force_last=True)
        return self.last_path(trainer)

    # ------------------------------------------------------------------ saving and ranking
    def _save(self, trainer: Trainer, value: float | None, force_last: bool = False) -> None:
        self._check_finite(trainer)  # on every rank: they all stop together, none waits in a collective
        contents = trainer.state.state_dict()  # on every rank: under FSDP, gathering the state is a collective
        if not trainer.is_global_zero:
            self._saved_at = _position(trainer)  # every rank agrees on what is saved (after_fit asks)
            return
        state, folder = trainer.state, self.directory(trainer)
        name = self._file_name(state, value)
        before = (dict(self.best), list(self.recent), list(self.superseded))
        keep = self._rank(name, value)
        try:
            # The checkpoint holds this callback's state after the save, superseded files included,
            # so a run killed before deleting them deletes them when it resumes.
            target = write_checkpoint(contents, folder / name) if name in keep else None
            if self.save_last or force_last:
                if target is not None:
                    link_atomic(target, folder / LAST)  # a hard link: the same bytes are not written twice
                else:
                    write_checkpoint(contents, folder / LAST)
        except BaseException:
            self.best, self.recent, self.superseded = before
            raise
        self._saved_at = _position(trainer)
        self._delete(self.superseded)

    def _check_finite(self, trainer: Trainer) -> None:
        """Raise before writing a state that a NaN/Inf loss or weight has corrupted."""
        trainer.check_finite()  # NonFiniteLossError naming the batch; folds nothing (one sync)
        bad = _nonfinite_weights(trainer.state.model)
        if bad:
            state, last = trainer.state, self.last_path(trainer)
            where = f"in epoch {state.epoch + 1}" if state.batch_idx else f"at the end of epoch {state.epoch}"
            kept = f"{last} still holds the last good state" if last.is_file() else "no checkpoint was saved yet"
            raise NonFiniteWeightsError(
                f"ModelCheckpoint: the model's weights hold NaN or Inf {where}, after optimizer step "
                f"{state.global_step} (first: {', '.join(bad[:3])}); not saved: {kept}. Lower the learning rate, "
                "clip gradients (gradient_clip_val=...), or look for a division by zero in the model.")

    def _rank(self, name: str, value: float | None) -> list[str]:
        """Update best/recent/superseded for a new candidate ``name``; returns the names kept."""
        if self.save_top_k == 0 or (self.monitor and (value is None or math.isnan(value))):
            return []  # a NaN monitored value is never "best": only last.ckpt gets this point
        if self.monitor:
            scores = {**self.best, name: value}
            kept = self._ranked(scores) if self.save_top_k < 0 else self._ranked(scores)[:self.save_top_k]
            self.superseded = [n for n in scores if n not in kept and n != name]
            self.best = {n: scores[n] for n in kept}
        else:
            order = [n for n in self.recent if n != name] + [name]  # the same point saved twice keeps one file
            kept = order if self.save_top_k < 0 else order[-self.save_top_k:]
            self.superseded = [n for n in order if n not in kept]
            self.recent = kept
        return kept

    def _ranked(self, scores: dict[str, float]) -> list[str]:
        """Best first; NaN ranks last."""
        def key(name: str) -> float:
            score = scores[name]
            if math.isnan(score):
                return math.inf
            return score if self.mode == "min" else -score
        return sorted(scores, key=key)

    def _file_name(self, state: Any, value: float | None) -> str:
        epoch = state.epoch if state.batch_idx == 0 else state.epoch + 1  # the epoch the weights are in
        monitored = f"-{self.monitor}={value:.4f}" if self.monitor and value is not None else ""
        return f"epoch={epoch}-step={state.global_step}{monitored}.ckpt"

    def _delete(self, names: list[str]) -> None:
        for name in names:
            (self._dir / name).unlink(missing_ok=True)
        self.superseded = []

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best), "recent": list(self.recent), "superseded": list(self.superseded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.recent = dict(state["best"]), list(state["recent"])
        self.superseded = list(state["superseded"])


def _nonfinite_weights(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and float buffers holding NaN/Inf; [] (the usual case) after one sync.

    One fused norm per device (``torch._foreach_norm``, as ``clip_grad_norm_`` uses) in float32:
    a norm is NaN/Inf exactly when a value is, or when it exceeds 3e38 (weights of 1e19 are broken
    too). Only when that fails are the tensors looked at one by one, to name them.
    """
    named = [(name, t.detach()) for name, t in [*model.named_parameters(), *model.named_buffers()]
             if (t.is_floating_point() or t.is_complex()) and t.numel()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in named:
        by_device.setdefault(tensor.device, []).append(tensor)
    finite = [torch.stack(torch._foreach_norm(group, 2.0, dtype=torch.float32)).isfinite().all()
              for group in by_device.values()]
    if all(bool(flag) for flag in finite):
        return []
    return [name for name, tensor in named if not bool(torch.isfinite(tensor).all())] or ["(norm overflow)"]


def _position(trainer: Trainer) -> tuple[int, int, int]:
    state = trainer.state
    return state.epoch, state.global_step, state.batch_idx


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-<hex>`` files whose writer is gone (a run killed mid-save)."""
    if not folder.is_dir():
        return
    for path in folder.glob(".*.tmp-*"):
        pid = path.name.rsplit("-", 2)[-2]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
