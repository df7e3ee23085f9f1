"""Profile a model: size, MACs/FLOPs, latency and peak memory, without changing it.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts matmul-type ops
(mm, addmm, bmm, convolution, scaled-dot-product attention) as 2 FLOPs per multiply-add, so
``macs == flops // 2``; elementwise ops, norms and bias adds are not counted. The measuring
primitives (timing, memory, FLOP counting) live in :mod:`adaptrain.profiling.measure`, shared with
:mod:`adaptrain.profiling.bench`.

Example:
    >>> import torch.nn as nn
    >>> from adaptrain.profiling.profile import profile
    >>> p = profile(nn.Linear(10, 4), input_shapes=(10,), device="cpu", warmup=1, runs=3)
    >>> p.flops, p.macs, p.train_flops  # one sample: forward 2*10*4; backward adds grad_W only
    (80, 40, 160)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from adaptrain.core.trainer import Trainer
from adaptrain.profiling.measure import (
    CPU_MEMORY_MEASURE,
    CUDA_MEMORY_MEASURE,
    MiB,
    call_model,
    count_flops,
    map_tensors,
    model_device,
    output_loss,
    peak_memory_mb,
    percentile,
    preserved_state,
    resolve_device,
    saved_activation_bytes,
    tensor_leaves,
    time_ms,
)


# ---- results ----
@dataclass(frozen=True)
class LatencyStats:
    """Latency of repeated runs in milliseconds.

    >>> LatencyStats.from_samples([1.0, 2.0, 3.0, 10.0]).p50
    2.5
    """

    mean: float
    p50: float
    p90: float
    min: float
    max: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        return cls(sum(samples_ms) / len(samples_ms), percentile(samples_ms, 50),
                   percentile(samples_ms, 90), min(samples_ms), max(samples_ms), len(samples_ms))


@dataclass(frozen=True)
class ModuleStats:
    """One row of the per-module breakdown; FLOPs of a sample (batch 1), summed over calls."""

    name: str  # as in model.named_modules(); "" is the whole model
    type: str
    params: int
    macs: int
    flops: int
    train_flops: int | None  # forward + backward


def _human(n: float | None) -> str:
    """A count with a K/M/G/T suffix.

    >>> _human(1234567), _human(12), _human(None)
    ('1.23 M', '12', '-')
    """
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:g}"


# ---- inputs and shape errors ----
def _is_shape(x: Any) -> bool:
    return isinstance(x, (tuple, list, torch.Size)) and all(isinstance(d, int) for d in x)


def _shapes(inputs: Any) -> Any:
    return map_tensors(inputs, lambda t: tuple(t.shape))


def make_inputs(example_inputs: Any, input_shapes: Any, batch_size: int,
                dtype: torch.dtype = torch.float32) -> Any:
    """Inputs at ``batch_size``: random tensors of ``(batch_size, *shape)`` for per-sample
    ``input_shapes``, or ``example_inputs`` re-batched by repeating their first sample."""
    if (example_inputs is None) == (input_shapes is None):
        raise ValueError("pass exactly one of example_inputs= or input_shapes=")
    if input_shapes is not None:
        def rand(shape: Any) -> torch.Tensor:
            if not _is_shape(shape) or any(d <= 0 for d in shape):
                raise ValueError(f"input shape {shape!r} must be a tuple of positive ints "
                                 "(per sample, without the batch dimension)")
            return torch.randn(batch_size, *shape, dtype=dtype)
        if _is_shape(input_shapes):
            return rand(input_shapes)
        if isinstance(input_shapes, Mapping):
            return {k: rand(s) for k, s in input_shapes.items()}
        return tuple(rand(s) for s in input_shapes)
    b0 = _leading_batch(example_inputs)
    if b0 == batch_size:
        return example_inputs
    return map_tensors(example_inputs, lambda t: t[:1].repeat(batch_size, *([1] * (t.dim() - 1)))
                       if t.dim() >= 1 and t.shape[0] == b0 else t)


def _leading_batch(inputs: Any) -> int:
    first = next((t for t in tensor_leaves(inputs) if t.dim() >= 1), None)
    return int(first.shape[0]) if first is not None else 1



def _expected_input(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return f"(*, {m.in_features}): its first Linear '{name}' has in_features={m.in_features}"
        if isinstance(m, nn.modules.conv._ConvNd):
            dims = ", ".join(("D", "H", "W")[3 - len(m.kernel_size):]) if len(m.kernel_size) > 1 else "L"
            return (f"(N, {m.in_channels}, {dims}): its first {type(m).__name__} '{name}' has "
                    f"in_channels={m.in_channels}")
    return None


def checked_call(model: nn.Module, inputs: Any, per_sample_shapes: bool = False) -> Any:
    """``call_model``, but an error of the forward (RuntimeError: typically a shape mismatch;
    TypeError: wrong argument names or count) becomes a ValueError naming the given shapes,
    the expected input and the module that raised."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[nn.Module, tuple[Any, ...]]] = []

    def enter(mod: nn.Module, args: tuple[Any, ...]) -> None:  # hooks must return None: a value
        stack.append((mod, args))  # would replace the module's inputs or output

    def leave(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        stack.pop()

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        return call_model(model, inputs)
    except (RuntimeError, TypeError, ValueError) as e:
        msg = f"the model's forward failed for input shapes {_shapes(inputs)}"
        if per_sample_shapes:
            msg += " (input_shapes are per sample; the batch dimension is added in front)"
        if (expected := _expected_input(model)) is not None:
            msg += f". The model expects input of shape {expected}"
        if stack:
            mod, args = stack[-1]
            got = _shapes(args[0] if len(args) == 1 else args)
            msg += (f". The error was raised in '{names.get(id(mod), '?')}' ({type(mod).__name__}), "
                    f"which received {got}")
        raise ValueError(f"{msg}. Original error: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()


# ---- result ----
@dataclass
class ModelProfile:
    """What :func:`profile` measured. MACs/FLOPs are per sample (batch 1); ``batch_*`` at ``batch_size``."""

    model: str
    device: str
    batch_size: int
    input_shapes: Any  # shapes at batch_size
    params: int
    trainable_params: int
    size_mb: float  # params + buffers, MiB
    size_by_dtype_mb: dict[str, float]
    macs: int
    flops: int
    train_flops: int | None
    batch_macs: int
    batch_flops: int
    batch_train_flops: int | None
    latency_ms: LatencyStats
    train_latency_ms: LatencyStats | None  # fit's step: forward, backward, an SGD step at lr 0
    peak_mem_forward_mb: float
    peak_mem_train_mb: float | None
    activation_mb: float | None  # saved for backward at batch_size, params/buffers excluded
    memory_measure: str
    modules: list[ModuleStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> Any:
        """The summary as a ``rich.table.Table``."""
        from rich.table import Table

        def lat(s: LatencyStats | None) -> str:
            return "-" if s is None else f"mean {s.mean:.3f} | p50 {s.p50:.3f} | p90 {s.p90:.3f} ms"

        def mb(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g} MiB"

        t = Table(title=f"{self.model} on {self.device} (batch {self.batch_size})", show_header=False)
        t.add_column("what", style="bold")
        t.add_column("value")
        rows = [
            ("params (trainable)", f"{self.params:,} ({self.trainable_params:,})"),
            ("size", mb(self.size_mb) + "".join(f", {k}: {mb(v)}" for k, v in self.size_by_dtype_mb.items())),
            ("MACs / FLOPs (1 sample)", f"{_human(self.macs)} / {_human(self.flops)}"),
            ("train FLOPs (1 sample, fwd+bwd)", _human(self.train_flops)),
            (f"FLOPs at batch {self.batch_size} (fwd / fwd+bwd)",
             f"{_human(self.batch_flops)} / {_human(self.batch_train_flops)}"),
            ("inference latency", lat(self.latency_ms)),
            ("train step latency", lat(self.train_latency_ms)),
            ("peak memory forward / train", f"{mb(self.peak_mem_forward_mb)} / {mb(self.peak_mem_train_mb)}"),
            ("saved activations", mb(self.activation_mb)),
        ]
        for k, v in rows:
            t.add_row(k, v)
        t.caption = "memory: " + self.memory_measure + "".join(f"\nnote: {n}" for n in self.notes)
        return t

    def module_table(self, depth: int = 2) -> Any:
        """Per-module FLOPs (one sample) down to ``depth`` levels, as a ``rich.table.Table``."""
        from rich.table import Table

        t = Table(title="per-module FLOPs (1 sample)")
        for col in ("module", "type", "params", "MACs", "FLOPs", "% FLOPs", "train FLOPs"):
            t.add_column(col, justify="left" if col in ("module", "type") else "right")
        for m in self.modules:
            level = 0 if not m.name else m.name.count(".") + 1
            if level <= depth:
                share = f"{100 * m.flops / self.flops:.1f}%" if self.flops else "-"
                t.add_row("  " * level + (m.name or "(model)"), m.type, f"{m.params:,}",
                          _human(m.macs), _human(m.flops), share, _human(m.train_flops))
        return t

    def __rich__(self) -> Any:
        from rich.console import Group

        return Group(self.table(), self.module_table())

    def print(self, console: Any = None) -> None:
        from rich.console import Console

        (console or Console()).print(self)


# ---- entry point ----
def profile(model: nn.Module, example_inputs: Any = None, input_shapes: Any = None,
            device: str | torch.device = "auto", batch_size: int | None = None, *,
            warmup: int = 10, runs: int = 50, input_dtype: torch.dtype = torch.float32) -> ModelProfile:
    """Profile ``model`` on ``device`` and return a :class:`ModelProfile`.

    Give ``example_inputs`` (a tensor, a tuple/list of positional args or a dict of keyword
    args; their leading dim is the batch) or per-sample ``input_shapes`` (a shape tuple, a list of
    them, or a dict of them). ``batch_size`` defaults to the examples' batch, or 1.
    The model's weights, grads, buffers, train/eval flags and device are left as they were, and
    so is the global RNG state. If ``device`` differs from the model's, a copy is profiled.
    Latency: ``warmup`` untimed calls, then ``runs`` timed ones, CUDA-synchronised, of an
    eval-mode no-grad forward and of a train-mode training step: fit's own step (``Trainer.run_step``)
    on the sum of the floating outputs, with an SGD step at lr 0.
    Memory: ``CUDA_MEMORY_MEASURE``/``CPU_MEMORY_MEASURE``.

    Example:
        >>> p = profile(nn.Conv1d(1, 8, 3), input_shapes=(1, 40), device="cpu", warmup=1, runs=3)
        >>> p.macs  # 8 out channels * 38 positions * 3 taps
        912
    """
    dev = resolve_device(device, model)
    work = model if model_device(model) in (None, dev) else copy.deepcopy(model).to(dev)
    if batch_size is None:
        batch_size = 1 if example_inputs is None else _leading_batch(example_inputs)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cuda_rng = [dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_rng), preserved_state(work):
        to_dev = lambda x: map_tensors(x, lambda t: t.to(dev))  # noqa: E731
        one = to_dev(make_inputs(example_inputs, input_shapes, 1, input_dtype))
        batch = to_dev(make_inputs(example_inputs, input_shapes, batch_size, input_dtype))
        work.eval()
        with torch.no_grad():
            checked_call(work, batch, per_sample_shapes=input_shapes is not None)
        per_sample = count_flops(work, one)
        at_batch = per_sample if batch_size == 1 else count_flops(work, batch)
        state = (list(work.parameters()), list(work.buffers()))

        def infer() -> None:
            with torch.no_grad():
                call_model(work, batch)

        work.eval()
        latency = LatencyStats.from_samples(time_ms(infer, dev, warmup, runs))
        mem_fwd = peak_memory_mb(infer, dev, (state, batch))

        # fit's own step (Trainer.run_step, fp32 plugin) on a synthetic loss, with an SGD step at lr 0:
        # the cheapest optimizer step, which leaves the weights as they are (and they are restored anyway).
        loss = _OutputSum().to(dev)
        params = list(work.parameters()) or list(loss.parameters())  # a model without weights steps the anchor
        stepper = Trainer(work, torch.optim.SGD(params, lr=0.0), loss, device=dev, progress=False)

        def train_step() -> None:
            stepper.run_step((batch, None))

        notes: list[str] = []
        train_lat = mem_train = act_mb = None
        if per_sample.train is None:
            notes.append("no floating output requires grad: training step not measured")
        else:
            work.train()
            try:
                train_lat = LatencyStats.from_samples(time_ms(train_step, dev, warmup, runs))
                with saved_activation_bytes(state) as act:
                    mem_train = peak_memory_mb(train_step, dev, (state, batch))
                act_mb = act[0] / MiB
            except (RuntimeError, ValueError) as e:  # e.g. BatchNorm in train mode with batch 1
                notes.append(f"training step failed in train mode at batch_size={batch_size}: {e}")
    params = list(model.parameters())
    by_dtype: dict[str, float] = {}
    for t in params + list(model.buffers()):
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0.0) + t.numel() * t.element_size() / MiB
    modules = [ModuleStats(n, type(m).__name__, sum(p.numel() for p in m.parameters()),
                           per_sample.forward_by_module.get(n, 0) // 2, per_sample.forward_by_module.get(n, 0),
                           per_sample.train_by_module.get(n, 0) if per_sample.train is not None else None)
               for n, m in model.named_modules()]
    return ModelProfile(
        model=type(model).__name__, device=str(dev), batch_size=batch_size, input_shapes=_shapes(batch),
        params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in params if p.requires_grad),
        size_mb=sum(by_dtype.values()), size_by_dtype_mb=by_dtype,
        macs=per_sample.forward // 2, flops=per_sample.forward, train_flops=per_sample.train,
        batch_macs=at_batch.forward // 2, batch_flops=at_batch.forward, batch_train_flops=at_batch.train,
        latency_ms=latency, train_latency_ms=train_lat, peak_mem_forward_mb=mem_fwd,
        peak_mem_train_mb=mem_train, activation_mb=act_mb,
        memory_measure=CUDA_MEMORY_MEASURE if dev.type == "cuda" else CPU_MEMORY_MEASURE,
        modules=modules, notes=notes)


class _OutputSum(nn.Module):
    """The synthetic loss of a profiled training step (the sum of the floating outputs). It holds an
    empty parameter, so that a model without weights still has something for the optimizer to step."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(0))

    def forward(self, outputs: Any, targets: Any) -> torch.Tensor | None:
        return output_loss(outputs)
