"""How a batch becomes model inputs and targets: structure checks, micro-batches, device moves, model calls.

A loader yields ``(inputs, targets)`` (a tuple or list of two) or a dict with keys
``"inputs"`` and ``"targets"``. ``inputs`` is a tensor, a tuple/list (the model is called
``model(*inputs)``) or a dict (``model(**inputs)``). ``targets`` mirrors the model's outputs:
a tensor, or a tuple/list/dict of tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from adaptrain.errors import BatchStructureError


def unpack_batch(batch: Any, loader_name: str) -> tuple[Any, Any]:
    """Unpack a batch into (inputs, targets), or raise an error naming the loader and what it yielded."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # the common case first: this runs every batch
        return batch[0], batch[1]
    if isinstance(batch, dict) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    raise BatchStructureError(
        f"{loader_name} yielded {describe(batch)}; expected (inputs, targets) - a tuple or list of two, "
        f"or a dict with keys 'inputs' and 'targets'."
    )


def describe(obj: Any) -> str:
    """A short description of a (nested) batch for error messages: types and shapes."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in list(obj.items())[:6]) + "}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(describe(v) for v in obj[:6])
        return f"{type(obj).__name__} of {len(obj)} ({inner})"
    return type(obj).__name__


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a nested structure; ``non_blocking`` overlaps the copy when memory is pinned."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return rebuild(obj, [to_device(v, device) for v in obj])
    return obj


def rebuild(seq: tuple | list, items: list) -> Any:
    """A sequence of the same type; namedtuples take their fields as arguments."""
    return type(seq)(*items) if isinstance(seq, tuple) and hasattr(seq, "_fields") else type(seq)(items)


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, torch.Tensor):  # the common case first: one check per forward
        return model(inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size_of(inputs: Any, targets: Any = None) -> int:
    """The number of samples: dim 0 of the first tensor found (targets first, then inputs)."""
    for obj in (targets, inputs):
        tensor = obj if isinstance(obj, torch.Tensor) else _first_tensor(obj)  # a tensor: no call (every batch)
        if tensor is not None and tensor.dim() > 0:
            return int(tensor.shape[0])
    raise BatchStructureError(f"cannot tell the batch size: no tensor with a batch dimension in {describe(inputs)}.")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def select(obj: Any, key: Any) -> Any:
    """Pick one output (or target) by dict key or sequence index (an int, or its digits); ``None`` keeps the whole."""
    if key is None:
        return obj
    if isinstance(key, str) and key.isdigit() and isinstance(obj, (tuple, list)):
        key = int(key)  # YAML mapping keys are strings: "0" names the first output of a tuple
    try:
        return obj[key]
    except (KeyError, IndexError, TypeError) as error:
        raise BatchStructureError(f"cannot select {key!r} from {describe(obj)}.") from error


def detach_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: detach_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return rebuild(obj, [detach_cpu(v) for v in obj])
    return obj


def split_micro_batches(inputs: Any, targets: Any, micro_batch_size: int | None) -> list[tuple[Any, Any]]:
    """Cut (inputs, targets) into consecutive micro-batches of at most ``micro_batch_size`` samples.

    Every tensor with a batch dimension is sliced along dim 0 (views, no copies), through tuples,
    lists, namedtuples and dicts; other leaves (flags, strings) are passed to every micro-batch.
    ``None``, or a size >= the batch, gives the batch itself as the only micro-batch.

    Example:
        >>> x, y = torch.arange(10).reshape(5, 2), {"label": torch.arange(5)}
        >>> [(a.shape[0], b["label"].tolist()) for a, b in split_micro_batches(x, y, 2)]
        [(2, [0, 1]), (2, [2, 3]), (1, [4])]
    """
    if micro_batch_size is None:
        return [(inputs, targets)]
    size = batch_size_of(inputs, targets)
    if micro_batch_size >= size:
        return [(inputs, targets)]
    bounds = [(start, start + micro_batch_size) for start in range(0, size, micro_batch_size)]
    return [(_slice(inputs, start, stop, size), _slice(targets, start, stop, size)) for start, stop in bounds]


def _slice(obj: Any, start: int, stop: int, size: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() > 0 and obj.shape[0] == size else obj
    if isinstance(obj, dict):
        return {k: _slice(v, start, stop, size) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return rebuild(obj, [_slice(v, start, stop, size) for v in obj])
    return obj


def reraise_naming(error: Exception, where: str) -> None:
    """Raise the same kind of error with the place named. Subclasses (OOM, adaptrain's own errors)
    pass unchanged, with a note, so handlers that catch them (an OOM back-off) still can."""
    if type(error) in (RuntimeError, ValueError, TypeError, IndexError, KeyError):
        raise type(error)(f"{where}: {error}") from error
    if hasattr(error, "add_note"):
        error.add_note(where)
    raise error


def name_of(obj: Any) -> str:
    return getattr(obj, "__name__", type(obj).__name__)


def detached(outputs: Any) -> Any:
    """Outputs without their autograd graph (metrics only read them)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, dict):
        return {k: detached(v) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(detached(v) for v in outputs) if not hasattr(outputs, "_fields") else \
            type(outputs)(*(detached(v) for v in outputs))
    return outputs
