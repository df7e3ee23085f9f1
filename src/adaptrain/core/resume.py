"""The trainer's state to and from a checkpoint file: ``save_checkpoint`` and ``fit(ckpt_path=...)``.

The contents come from :meth:`TrainState.state_dict`; the file work (atomic write, safe load) is
``adaptrain.checkpoint``'s. On resume every check runs before anything changes, so a refused
checkpoint leaves the trainer as it was.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from adaptrain.checkpoint.compat import (
    changed_settings,
    model_mismatch,
    onecycle_too_short,
    optimizer_mismatch,
    position_mismatch,
    scheduler_mismatch,
)
from adaptrain.checkpoint.io import load_checkpoint, write_checkpoint
from adaptrain.core.callback import CheckpointSaver
from adaptrain.data.loaders import loader_length
from adaptrain.errors import CheckpointError

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


def save_checkpoint(trainer: Trainer, path: str | os.PathLike) -> Path:
    """Write everything an exact resume needs (``trainer.state.state_dict()``) to ``path`` atomically.

    Take it at a window boundary (``after_step`` / ``after_epoch``), where no gradient is half-accumulated.
    """
    return write_checkpoint(trainer.state.state_dict(), path)


def restore_checkpoint(trainer: Trainer, ckpt_path: str | os.PathLike | Mapping[str, Any]) -> Path:
    """Put the trainer where the checkpoint left it; ``"last"`` means its checkpoint callback's last file.

    ``ckpt_path`` may also be the contents :func:`~adaptrain.load_checkpoint` already returned (the
    CLI reads a checkpoint once, to check it before it makes a run folder). Called by
    ``fit(ckpt_path=...)`` once precision and scheduler are built, before the loop.
    """
    return apply_checkpoint(trainer, *read_checkpoint(trainer, ckpt_path))


def read_checkpoint(trainer: Trainer, ckpt_path: str | os.PathLike | Mapping[str, Any]) -> tuple[Path, dict]:
    """The checkpoint's path and contents (a path, ``"last"``, or contents already read); nothing changes."""
    if isinstance(ckpt_path, Mapping):
        return Path("checkpoint"), dict(ckpt_path)
    path = _resolve(trainer, ckpt_path)
    return path, load_checkpoint(path, map_location="cpu")  # RNG states must be CPU tensors; weights are copied


def apply_checkpoint(trainer: Trainer, path: Path, ckpt: dict[str, Any]) -> Path:
    """Check that ``ckpt`` fits the trainer, then put the trainer's state where it left off."""
    state = trainer.state
    problems = (model_mismatch(state.model, ckpt["model"]),
                optimizer_mismatch(state.optimizer, ckpt["optimizer"], ckpt["meta"]["optimizer"]),
                scheduler_mismatch(state.scheduler, ckpt["meta"]["scheduler"]),
                position_mismatch(ckpt["counters"]["batch_idx"], loader_length(state.train_loader)),
                onecycle_too_short(state.scheduler, ckpt["scheduler"], ckpt["counters"], state.steps_per_epoch,
                                   state.max_epochs, state.accumulate_grad_batches))
    for problem in problems:
        if problem:
            raise CheckpointError(path, problem)
    for change in changed_settings(ckpt["meta"], state.meta()):
        warnings.warn(f"{path}: {change}")
    state.load_state_dict(ckpt)
    return path


def _resolve(trainer: Trainer, ckpt_path: str | os.PathLike) -> Path:
    if str(ckpt_path) != "last":
        return Path(ckpt_path)
    savers: list[Any] = trainer.callbacks.find(CheckpointSaver)
    if not savers:
        raise CheckpointError("fit(ckpt_path='last')", "needs a ModelCheckpoint callback, whose last.ckpt it "
                              "resumes from; add one, or pass the checkpoint's path.")
    path = savers[0].last_path(trainer)
    if not path.is_file():
        raise CheckpointError(path, "does not exist: fit(ckpt_path='last') found no checkpoint saved by this "
                              "run's ModelCheckpoint; start without ckpt_path, or pass the checkpoint's path.")
    return path
