"""Measuring primitives shared by :mod:`adaptrain.profiling.profile` and :mod:`adaptrain.profiling.bench`.

Tensor-tree helpers, calling a model with tuple/dict inputs, device resolution, leaving a model's
state as it was, CUDA-synchronised timing, peak memory (CUDA allocator or, on CPU,
:class:`LiveTensorMeter`), saved-activation bytes, FLOP counting and percentiles.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matmul-type ops
(mm, addmm, bmm, convolution, scaled-dot-product attention) as 2 FLOPs per multiply-add;
elementwise ops, norms and bias adds are not counted.

Example:
    >>> import torch.nn as nn
    >>> from adaptrain.profiling.measure import count_flops
    >>> f = count_flops(nn.Linear(10, 4), torch.randn(1, 10))
    >>> f.forward, f.train  # forward 2*10*4; backward adds grad_W only (the input needs no grad)
    (80, 160)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

MiB = 2**20
CPU_MEMORY_MEASURE = (
    "cpu: bytes of params+buffers+inputs, plus the peak of tensors created by ops during the call "
    "and alive at once (a TorchDispatchMode with storage weak refs; no allocator overhead)"
)
CUDA_MEMORY_MEASURE = "cuda: torch.cuda.max_memory_allocated during the call (everything on the device)"


# ---- tensor trees and calling a model ----
def tensor_leaves(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors inside nested tuples, lists and dicts (outputs, inputs, optimizer state)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensor_leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensor_leaves(v)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """A dict is passed as keyword args, a tuple/list as positional args, anything else as one arg.

    To pass a single list argument, wrap it: ``example_inputs=([a, b],)``.
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def output_loss(out: Any) -> torch.Tensor | None:
    """Sum of all floating outputs' ``.float().sum()``: a scalar to backpropagate through any output."""
    parts = [t.float().sum() for t in tensor_leaves(out) if t.is_floating_point() and t.requires_grad]
    return torch.stack(parts).sum() if parts else None


def tensor_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages of the tensors inside ``objs`` (views are counted once)."""
    seen: dict[int, int] = {}
    for obj in objs:
        for t in tensor_leaves(obj):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


# ---- devices and model state ----
def model_device(model: nn.Module) -> torch.device | None:
    """The device of the first parameter or buffer; None for a model without tensors."""
    t = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return t.device if t is not None else None


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``"auto"``: the model's accelerator if it is on one, else CUDA if available, else CPU."""
    if device in (None, "auto"):
        md = model_device(model) if model is not None else None
        if md is not None and md.type != "cpu":
            return md
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was requested but CUDA is not available")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
    return d


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore grads (the same tensor objects), buffers (BatchNorm stats) and every module's
    train/eval flag on exit, so profiling leaves the user's model exactly as it was."""
    grads = {p: p.grad for p in model.parameters()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    for p in grads:
        p.grad = None  # our backward then creates fresh grads instead of accumulating into theirs
    try:
        yield
    finally:
        for p, g in grads.items():
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training


# ---- time and memory ----
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync point: kernels are async, wait until they finish


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Wall time of each of ``runs`` calls after ``warmup`` calls, synchronising CUDA around each."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


class LiveTensorMeter(TorchDispatchMode):
    """CPU stand-in for ``torch.cuda.max_memory_allocated``: the peak bytes of tensors created by
    ops inside the context and alive at the same time (sampled after every op). Storages of
    ``resident`` tensors (params, inputs) are not counted as new. Kernel workspaces are not seen.

    >>> with LiveTensorMeter() as meter:
    ...     y = torch.ones(256) * 2  # 1 KiB of ones, alive during the multiply, + 1 KiB result
    >>> meter.peak_bytes
    2048
    """

    def __init__(self, resident: Any = ()) -> None:
        super().__init__()
        self._skip = {StorageWeakRef(t.untyped_storage()).cdata for t in tensor_leaves(resident)}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        for t in tensor_leaves(out):
            try:
                ref = StorageWeakRef(t.untyped_storage())
                nbytes = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # sparse/nested tensors have no plain storage
                continue
            if ref.cdata not in self._skip:
                old = self._live.get(ref.cdata)
                self._live[ref.cdata] = (ref, max(nbytes, old[1] if old else 0))
        self.peak_bytes = max(self.peak_bytes, sum(n for _, n in self._live.values()))
        return out


def peak_memory_mb(fn: Callable[[], Any], device: torch.device, resident: Any) -> float:
    """Peak memory of ``fn()`` in MiB: CUDA max allocated, or on CPU see :class:`LiveTensorMeter`."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / MiB
    with LiveTensorMeter(resident) as meter:
        fn()
    return (tensor_bytes(resident) + meter.peak_bytes) / MiB


@contextmanager
def saved_activation_bytes(exclude: Any) -> Iterator[list[int]]:
    """Yields a one-item list that ends up holding the bytes of distinct storages saved for
    backward inside the context, excluding those of ``exclude`` (params and buffers)."""
    skip = {t.untyped_storage().data_ptr() for t in tensor_leaves(exclude)}
    seen: dict[int, int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in skip:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())


# ---- FLOPs ----
@dataclass(frozen=True)
class FlopCounts:
    """What :func:`count_flops` found. ``train`` is None when no output needs a gradient."""

    forward: int
    train: int | None
    forward_by_module: dict[str, int]
    train_by_module: dict[str, int]


def _module_names(model: nn.Module, counts: Mapping[str, Any]) -> dict[str, int]:
    """FlopCounterMode keys ("Net", "Net.fc1") -> named_modules names ("", "fc1")."""
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, ops in counts.items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else key
        out[name] = int(sum(ops.values()))
    return out


def count_flops(model: nn.Module, inputs: Any, *, backward: bool = True) -> FlopCounts:
    """FLOPs of one forward (eval mode, no grad) and of forward+backward (train mode) of
    ``model(inputs)``, with FlopCounterMode. Grads, buffers and train/eval flags are restored.

    The backward pass starts from :func:`output_loss`. If the train-mode forward fails (BatchNorm
    with one value per channel, a model that wants targets in train mode), the backward is
    counted in eval mode, which gives the same matmul/conv FLOPs for most models.
    """
    with preserved_state(model):
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fwd:
            call_model(model, inputs)
        train, train_mod = None, {}
        for training in (True, False) if backward else ():
            model.train(training)
            try:
                with torch.enable_grad(), FlopCounterMode(display=False) as both:
                    loss = output_loss(call_model(model, inputs))
                    if loss is not None:
                        loss.backward()
            except (RuntimeError, ValueError):
                if not training:
                    raise
                continue
            if loss is not None:
                train, train_mod = both.get_total_flops(), _module_names(model, both.get_flop_counts())
            break
    return FlopCounts(fwd.get_total_flops(), train, _module_names(model, fwd.get_flop_counts()), train_mod)


# ---- statistics ----
def percentile(values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile, ``q`` in [0, 100] (numpy's default method).

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 90)
    (2.5, 3.7)
    """
    if not values:
        raise ValueError("percentile() of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return round(s[lo] + (s[hi] - s[lo]) * (pos - lo), 12)
