"""Checkpoint files: atomic saves, safe loads, exact resume, and weights as safetensors.

A checkpoint is one ``torch.save`` file (a zip) holding a dict:

    model, optimizer, scheduler, precision   their state_dicts (scheduler None when there is none)
    counters    epoch, global_step, batch_idx (train batches done in the running epoch), skipped_*
    history     the records of the completed epochs
    rng         "now": python/numpy/torch/CUDA RNG and the train loader's own generators;
                "epoch_start": the same at the start of the running epoch (mid-epoch checkpoints),
                to replay the sampler's shuffle order on resume
    callbacks   {state_key: state_dict} of every callback with state
    progress    the running epoch's loss and metric sums (mid-epoch checkpoints), so the resumed
                epoch's train_loss / train_<metric> cover the whole epoch, not only the batches after resume
    meta        format version, class names, precision, accumulation (to explain mismatches)

Checkpoints are taken at a window boundary (``after_step`` / ``after_epoch``), so no half-accumulated
gradient is ever saved. Writes are atomic (temporary file, fsync, ``os.replace``, fsync of the folder):
a save killed at any byte leaves the previous file intact. Every load uses
``torch.load(weights_only=True)`` and checks the zip's CRCs first: a file that would run code when
unpickled, or a damaged one, is refused with a :class:`CheckpointError` naming the file.

Example:
    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 1)
    >>> path = save_weights(model, tempfile.mkdtemp() + "/model.safetensors")
    >>> other = torch.nn.Linear(2, 1)
    >>> load_weights(other, path); torch.equal(other.weight, model.weight)
    True
"""

from __future__ import annotations

import math
import os
import pickle
import secrets
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from adaptrain.checkpoint.compat import (changed_settings, epoch_progress, loader_rng_state, model_mismatch,
                              optimizer_mismatch, position_mismatch, scheduler_mismatch, set_loader_rng_state)
from adaptrain.core.state import CHECKPOINT_KEYS, rng_state, set_rng_state

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

FORMAT, VERSION = "adaptrain.checkpoint.io", 1
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device)
_CHUNK = 1 << 16

#: Called with the bytes written so far after each write (64 KiB at most) of a checkpoint; None in
#: normal use. Fault-injection tests set it to slow writes down, so a SIGKILL lands inside one.
_write_hook: Callable[[int], None] | None = None


class CheckpointError(ValueError):
    """A checkpoint could not be saved, read or applied; names the file and what was wrong.

    Example:
        >>> str(CheckpointError("runs/x/last.ckpt", "does not exist."))
        'runs/x/last.ckpt: does not exist.'
    """

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


# ---------------------------------------------------------------------- files
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path`` atomically.

    Readers (and a later resume) see the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # and the rename itself survives a power cut
    return path


def link_atomic(source: Path, target: Path) -> Path:
    """Make ``target`` a hard link to ``source`` (a copy where links are not supported), atomically."""
    def write(tmp: Path) -> None:
        try:
            os.link(source, tmp)  # no second write of the same bytes
        except OSError:
            shutil.copyfile(source, tmp)
    return atomic_write(target, write)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return  # Windows cannot open a folder; NTFS journals the rename
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse it; the file itself was synced
    finally:
        os.close(fd)


class _HookedFile:
    """Writes through in 64 KiB chunks and calls ``_write_hook`` after each (tests only)."""

    def __init__(self, handle: Any, hook: Callable[[int], None]) -> None:
        self.handle, self.hook, self.written = handle, hook, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK):
            self.written += self.handle.write(view[start:start + _CHUNK])
            self.hook(self.written)
        return len(view)

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle if _write_hook is None else _HookedFile(handle, _write_hook))
        except RuntimeError as error:
            # torch's zip writer finishes the archive even when the save was interrupted, and its
            # complaint ("unexpected pos") would hide the cause (a Ctrl-C, a full disk): raise that.
            if error.__context__ is not None:
                raise error.__context__ from None
            raise


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The contents of an adaptrain checkpoint, read safely (``weights_only=True``, CRCs checked).

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, holds objects that could run
            code when unpickled, or is not an adaptrain checkpoint.

    Example:
        >>> ckpt = load_checkpoint("checkpoints/last.ckpt")  # doctest: +SKIP
        >>> ckpt["counters"]["global_step"], ckpt["model"].keys()  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist." if not path.exists() else "is not a file.")
    try:
        if zipfile.is_zipfile(path):
            _check_crcs(path)  # torch.load itself would read flipped bits without noticing
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as error:
        raise CheckpointError(path, f"cannot be read ({error.strerror}).") from None
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error) and "global" not in str(error):  # bytes that are no pickle at all
            raise CheckpointError(path, "is not a checkpoint or is corrupt (it is neither a torch.save zip nor a "
                                  "valid pickle).") from None
        reasons = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = (reasons or ["unknown pickle content"])[0].strip()
        raise CheckpointError(path, f"refused: it holds objects that torch.load(weights_only=True) does not allow "
                              f"({reason}); unpickling them could run code. Load only checkpoints you trust, "
                              "and then with weights_only=False.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise CheckpointError(path, f"is truncated or corrupt ({type(error).__name__}: {first_line}); it was not "
                              "written by a completed save, or was damaged since. Resume from another checkpoint."
                              ) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
    if missing or ckpt["meta"].get("format") != FORMAT:
        raise CheckpointError(path, f"is not an adaptrain checkpoint (missing {missing or ['meta.format']}); "
                              "use load_weights() for .safetensors files and torch's own loader for others.")
    if ckpt["meta"].get("version", 0) > VERSION:
        raise CheckpointError(path, f"has format version {ckpt['meta']['version']}, written by a newer adaptrain; "
                              f"this one reads up to {VERSION}. Upgrade adaptrain.")
    return ckpt


def _check_crcs(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC or not info.file_size:  # a CRC of 0 on data means the writer skipped it
                with archive.open(info) as member:  # raises BadZipFile on a CRC mismatch at the end
                    while member.read(1 << 20):
                        pass


# ---------------------------------------------------------------------- weights (safetensors)
def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's weights as safetensors (tied weights stored once), atomically."""
    from safetensors.torch import save_model

    return atomic_write(path, lambda tmp: save_model(model, str(tmp), force_contiguous=True))


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load safetensors weights into ``model`` (tied weights restored); CheckpointError on any mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist.")
    try:
        load_model(model, str(path), strict=strict)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(path, f"is truncated or corrupt ({error}).") from None
    except RuntimeError as error:
        raise CheckpointError(path, f"does not match {type(model).__name__}: {' '.join(str(error).split())}") from None


# ---------------------------------------------------------------------- what a checkpoint holds
def checkpoint_state(trainer: "Trainer") -> dict[str, Any]:
    """Everything :func:`restore_trainer` needs, weights_only-safe. Take it at a window boundary."""
    state = trainer.state
    callbacks: dict[str, Any] = {}
    for callback in trainer.callbacks.callbacks:
        cb_state = callback.state_dict()
        if cb_state:
            if callback.state_key in callbacks:
                raise CheckpointError("checkpoint", f"two callbacks share state_key {callback.state_key!r}; give "
                                      "one of them its own state_key so both states are saved.")
            callbacks[callback.state_key] = cb_state
    mid_epoch = state.batch_idx > 0
    ckpt = {
        "meta": _meta(trainer),
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "precision": state.precision.state_dict() if state.precision is not None else {},
        "counters": state.counters(),
        "history": state.history.state_dict(),
        "rng": {"now": {**rng_state(), "loader": loader_rng_state(state.train_loader)},
                "epoch_start": state.epoch_start_rng if mid_epoch else None},
        "callbacks": callbacks,
        "progress": epoch_progress(trainer) if mid_epoch else None,
    }
    return _plain(ckpt, "checkpoint")


def save_checkpoint(trainer: "Trainer", path: str | os.PathLike) -> Path:
    """Write :func:`checkpoint_state` to ``path`` atomically; returns the path."""
    ckpt = checkpoint_state(trainer)
    return atomic_write(path, lambda tmp: _torch_save(ckpt, tmp))


def _meta(trainer: "Trainer") -> dict[str, Any]:
    state = trainer.state
    return {"format": FORMAT, "version": VERSION, "model": type(state.model).__name__,
            "optimizer": type(state.optimizer).__name__,
            "scheduler": type(state.scheduler).__name__ if state.scheduler is not None else None,
            "precision": trainer.precision_name, "accumulate_grad_batches": state.accumulate_grad_batches,
            "steps_per_epoch": state.steps_per_epoch}


def _plain(obj: Any, where: str) -> Any:
    """``obj`` with numpy scalars made Python numbers; CheckpointError for what weights_only cannot load."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _LEAVES) or type(obj) is torch.Size:
        return obj
    if isinstance(obj, dict):
        items = {key: _plain(value, f"{where}[{key!r}]") for key, value in obj.items()}
        # unchanged dicts are kept as they are: a state_dict's OrderedDict carries _metadata
        return obj if all(items[key] is value for key, value in obj.items()) else type(obj)(items)
    if type(obj) in (list, tuple, set, frozenset):
        items = [_plain(value, f"{where}[{i}]") for i, value in enumerate(obj)]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    raise CheckpointError(where, f"is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                          "torch.load(weights_only=True) cannot read back; store tensors, numbers, strings, "
                          "and lists/tuples/dicts of them instead.")


# ---------------------------------------------------------------------- resume
def restore_trainer(trainer: "Trainer", ckpt_path: str | os.PathLike) -> Path:
    """Put the trainer where the checkpoint left it; ``ckpt_path="last"`` means ModelCheckpoint's last.ckpt.

    Every check runs before anything changes: on a CheckpointError the trainer is untouched.
    Called by ``fit(ckpt_path=...)`` once precision and scheduler are built, before the loop.
    """
    path = _resolve(trainer, ckpt_path)
    ckpt = load_checkpoint(path, map_location="cpu")  # RNG states must be CPU tensors; weights are copied over
    state = trainer.state
    problems = (model_mismatch(state.model, ckpt["model"]),
                optimizer_mismatch(state.optimizer, ckpt["optimizer"], ckpt["meta"]["optimizer"]),
                scheduler_mismatch(state.scheduler, ckpt["meta"]["scheduler"]),
                position_mismatch(ckpt["counters"]["batch_idx"], state.train_loader),
                _onecycle_too_short(state, ckpt["scheduler"], ckpt["counters"]))
    for problem in problems:
        if problem:
            raise CheckpointError(path, problem)
    for change in changed_settings(ckpt["meta"], _meta(trainer)):
        warnings.warn(f"{path}: {change}")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    state.precision.load_state_dict(ckpt["precision"])
    state.load_counters(ckpt["counters"])
    state.history.load_state_dict(ckpt["history"])
    by_key = {callback.state_key: callback for callback in trainer.callbacks.callbacks}
    for key, cb_state in ckpt["callbacks"].items():
        if key in by_key:
            by_key[key].load_state_dict(cb_state)
        else:
            warnings.warn(f"{path}: holds the state of callback {key!r}, which this trainer does not have; "
                          "it is ignored.")
    rng = ckpt["rng"]
    if state.batch_idx:  # mid-epoch: the loop replays the epoch's shuffle, skips batch_idx batches, then
        state.epoch_start_rng, state.resume_rng = rng["epoch_start"], rng["now"]  # restores resume_rng
        trainer._resume_progress = ckpt["progress"]
    else:
        set_rng_state(rng["now"])
        set_loader_rng_state(state.train_loader, rng["now"]["loader"])
    return path


def _onecycle_too_short(state: Any, saved: Any, counters: dict[str, Any]) -> str | None:
    """A OneCycle schedule cannot stretch: resuming it for more steps than it has left fails mid-run in torch."""
    if not isinstance(state.scheduler, torch.optim.lr_scheduler.OneCycleLR) or not isinstance(saved, dict):
        return None
    total, done, per_epoch = saved.get("total_steps"), saved.get("last_epoch"), state.steps_per_epoch
    if total is None or done is None or not per_epoch:
        return None
    steps_into_epoch = math.ceil(counters["batch_idx"] / state.accumulate_grad_batches)
    remaining = (state.max_epochs - counters["epoch"]) * per_epoch - steps_into_epoch
    if done + remaining > total:
        return (f"holds a OneCycleLR schedule of {total} steps with {total - done} left, but this run has {remaining} "
                f"more optimizer steps to take ({per_epoch} per epoch up to epoch {state.max_epochs}); a one-cycle "
                "schedule cannot be extended: resume with the original settings, or start a new run from the weights.")
    return None


def _resolve(trainer: "Trainer", ckpt_path: str | os.PathLike) -> Path:
    if str(ckpt_path) != "last":
        return Path(ckpt_path)
    from adaptrain.callbacks.checkpointing import ModelCheckpoint

    savers = trainer.callbacks.find(ModelCheckpoint)
    if not savers:
        raise CheckpointError("fit(ckpt_path='last')", "needs a ModelCheckpoint callback, whose last.ckpt it "
                              "resumes from; add one, or pass the checkpoint's path.")
    path = savers[0].last_path(trainer)
    if not path.is_file():
        raise CheckpointError(path, "does not exist: fit(ckpt_path='last') found no checkpoint saved by this "
                              "run's ModelCheckpoint; start without ckpt_path, or pass a checkpoint's path.")
    return path
