"""Checkpoint files: atomic saves, safe loads, and weights as safetensors.

A checkpoint is one ``torch.save`` file (a zip) holding a dict:

    model, optimizer, scheduler, precision   their state_dicts (scheduler None when there is none)
    counters    epoch, global_step, batch_idx and epoch_samples (train batches and samples done in the
                running epoch), samples_seen, skipped_*
    history     the records of the completed epochs
    rng         "now": python/numpy/torch/CUDA RNG and the train loader's own generators;
                "epoch_start": the same at the start of the running epoch (mid-epoch checkpoints),
                to replay the sampler's shuffle order on resume
    callbacks   {state_key: state_dict} of every callback with state
    progress    the running epoch's loss and metric sums (mid-epoch checkpoints), so the resumed
                epoch's train_loss / train_<metric> cover the whole epoch, not only the batches after resume
    meta        format version, class names, precision, accumulation (to explain mismatches)

The contents are built by :meth:`adaptrain.TrainState.state_dict` (``core``, above this layer) and
put back by ``fit(ckpt_path=...)``. Checkpoints are taken at a window boundary (``after_step`` /
``after_epoch``), so no half-accumulated gradient is ever saved. Writes are atomic (temporary file,
fsync, ``os.replace``, fsync of the folder): a save killed at any byte leaves the previous file intact. Every load uses
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

import os
import pickle
import secrets
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptrain.errors import CheckpointError

#: What a checkpoint contains, and nothing else: model, optimizer, scheduler, grad scaler,
#: counters, history, RNG states, every stateful callback's state, the running epoch's loss and
#: metric sums (mid-epoch checkpoints) and meta (format version, class names, settings).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "precision", "counters", "history", "rng", "callbacks",
                   "progress", "meta")
FORMAT, VERSION = "adaptrain.checkpoint", 1
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device)
_CHUNK = 1 << 16

#: Called with the bytes written so far after each write (64 KiB at most) of a checkpoint; None in
#: normal use. Fault-injection tests set it to slow writes down, so a SIGKILL lands inside one.
_write_hook: Callable[[int], None] | None = None


# ---------------------------------------------------------------------- files
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path`` atomically.

    Readers (and a later resume) see the old file or the new one, never half of one. The file gets
    the mode a plain ``open(path, "w")`` would give it (``0o666`` less the umask, usually 0644):
    writers such as safetensors create their files 0600, as for a private temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
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


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


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
    """Load safetensors weights into ``model`` (tied weights restored); CheckpointError on any mismatch.

    Every key, shape and dtype is checked before the first tensor is copied: a file of another
    model is refused with the model left exactly as it was. ``strict=False`` allows missing and
    unexpected keys, never a tensor of another shape or dtype.

    Example:
        >>> import tempfile, torch
        >>> path = save_weights(torch.nn.Linear(2, 3), tempfile.mkdtemp() + "/w.safetensors")
        >>> load_weights(torch.nn.Linear(2, 4), path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        adaptrain.errors.CheckpointError: ...w.safetensors: does not match Linear: shape mismatches: ... loaded.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "does not exist." if not path.exists() else "is not a file.")
    try:
        saved = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(path, f"is truncated or corrupt ({error}).") from None
    problem = _weights_mismatch(model, saved, strict)
    if problem:
        raise CheckpointError(path, f"does not match {type(model).__name__}: {problem}. Nothing was loaded.")
    model.load_state_dict(saved, strict=False)  # checked above: every key fits; tied names share a tensor


def _weights_mismatch(model: torch.nn.Module, saved: dict[str, torch.Tensor], strict: bool) -> str | None:
    """Missing and unexpected keys (with ``strict``), shape and dtype mismatches, or None."""
    own = model.state_dict()
    # Tied weights are saved under one of their names; the others are filled by the tie.
    groups: dict[tuple, list[str]] = {}
    for key, value in own.items():
        pointer = value.untyped_storage().data_ptr() if value.numel() else 0
        ident = (pointer, value.storage_offset(), tuple(value.shape), value.dtype) if pointer else (key,)
        groups.setdefault(ident, []).append(key)
    tied = {key: names for names in groups.values() for key in names}
    missing = [key for key in own if key not in saved and not any(name in saved for name in tied[key])]
    unexpected = [key for key in saved if key not in own]
    shapes = [f"{key}: file {list(saved[key].shape)}, model {list(value.shape)}" for key, value in own.items()
              if key in saved and saved[key].shape != value.shape]
    dtypes = [f"{key}: file {saved[key].dtype}, model {value.dtype}" for key, value in own.items()
              if key in saved and saved[key].shape == value.shape and saved[key].dtype != value.dtype]
    problems = [(label, items) for label, items in (("missing keys", missing if strict else []),
                                                    ("unexpected keys", unexpected if strict else []),
                                                    ("shape mismatches", shapes), ("dtype mismatches", dtypes))
                if items]
    if not problems:
        return None
    text = "; ".join(f"{label}: {_listed(items)}" for label, items in problems)
    if dtypes:
        text += " (convert the model first, e.g. model.to(torch.float32), to load these)"
    return text


def _listed(items: list[str], limit: int = 8) -> str:
    shown = "; ".join(items[:limit]) if any(":" in item for item in items) else ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------- writing a checkpoint
def write_checkpoint(contents: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write checkpoint ``contents`` (``TrainState.state_dict()``) to ``path`` atomically; returns the path.

    The contents are checked first: anything ``torch.load(weights_only=True)`` could not read back
    is a :class:`CheckpointError` before a byte is written.
    """
    plain = _plain(contents, "checkpoint")
    return atomic_write(path, lambda tmp: _torch_save(plain, tmp))


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
