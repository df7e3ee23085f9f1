"""Checks run before the first step, so a mistake costs seconds, not an epoch.

- the optimizer updates this model's parameters (not those of a model built before it);
- a step-based schedule planned for a longer run than this one says so (it would stop half-way);
- a short sanity pass over a couple of validation batches: shapes, the criterion and the metrics
  on real val batches, and every monitored name (``ModelCheckpoint``, ``EarlyStopping``, the
  plateau scheduler, ...) checked against the keys the loaders really produce;
- a precision this CPU is known to run slowly gets one warning;
- the objects and the device ``Trainer`` is given are what it takes, and exist on this machine.

Each check is a function of plain values where it can be, so it is tested without training;
:func:`preflight` runs the pre-step ones at the start of ``fit``.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterable

import torch

from adaptrain.core.callback import overrides
from adaptrain.core.settings import setting_error
from adaptrain.distributed import env as distributed
from adaptrain.errors import ConfigError

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

MONITOR_PREFIXES = ("train_", "val_")


def check_optimizer_covers(model: torch.nn.Module, optimizer: torch.optim.Optimizer, criterion: Any) -> None:
    """Raise if the optimizer holds parameters of another model; warn for trainable ones it misses.

    Example:
        >>> model, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> check_optimizer_covers(model, torch.optim.SGD(other.parameters(), lr=0.1), None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Trainer(optimizer=...): none of the optimizer's 2 parameters belong to the model (Linear): ...
    """
    owned = {id(p) for p in model.parameters()}
    if isinstance(criterion, torch.nn.Module):
        owned |= {id(p) for p in criterion.parameters()}  # learnable loss weights are legitimate
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in optimized if id(p) not in owned]
    if foreign:
        how_many = "none" if len(foreign) == len(optimized) else f"{len(foreign)}"
        raise ValueError(
            f"Trainer(optimizer=...): {how_many} of the optimizer's {len(optimized)} parameters belong to the model "
            f"({type(model).__name__}): it was built over another model (re-created after the optimizer?); build it "
            f"from this model: torch.optim.{type(optimizer).__name__}(model.parameters(), ...).")
    optimized_ids = {id(p) for p in optimized}
    left_out = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in optimized_ids]
    if left_out:
        shown = ", ".join(left_out[:6]) + (f", ... (+{len(left_out) - 6} more)" if len(left_out) > 6 else "")
        warnings.warn(f"Trainer(optimizer=...): {len(left_out)} trainable parameter(s) of the model are not in the "
                      f"optimizer and will never change: {shown}. Freeze them (requires_grad_(False)) or add them.")


def schedule_too_long(scheduler: Any, run_steps: int | None, steps_per_epoch: int | None, interval: str) -> str | None:
    """Why a per-step schedule planned for more steps than this run takes will stop part-way, or None.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=800)
        >>> print(schedule_too_long(cycle, 100, 10, "step"))  # doctest: +ELLIPSIS
        scheduler is OneCycleLR planned for 800 optimizer steps, but this run takes 100 (10 per epoch); ...
    """
    if run_steps is None or interval != "step":
        return None
    planned = getattr(scheduler, "total_steps", None) or getattr(scheduler, "total_iters", None)
    if not isinstance(planned, int) or planned <= run_steps:
        return None
    phase = ""
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        warmup = getattr(scheduler, "_schedule_phases", [{}])[0].get("end_step", None)
        if isinstance(warmup, (int, float)) and run_steps <= warmup:
            phase = " with the lr still rising (the whole run is warm-up)"
    return (f"scheduler is {type(scheduler).__name__} planned for {planned} optimizer steps, but this run takes "
            f"{run_steps} ({steps_per_epoch} per epoch); it will stop at {100 * run_steps // planned}% of its "
            f"schedule{phase}. Count optimizer steps, not batches (accumulation divides them), or pass a factory "
            "such as functools.partial(OneCycleLR, max_lr=...) and the trainer fills in total_steps.")


def monitored_names(callbacks: Iterable[Any], scheduler_monitor: str | None) -> list[tuple[str, str]]:
    """(field, monitored key) of every callback with a ``monitor`` and of the plateau scheduler."""
    found = [(f"{type(cb).__name__}(monitor=...)", cb.monitor) for cb in callbacks
             if isinstance(getattr(cb, "monitor", None), str)]
    if scheduler_monitor:
        found.append(("scheduler.monitor", scheduler_monitor))
    return found


def writes_records(callback: Any) -> bool:
    """True for a callback of the user's own that could add values to an epoch's record (it implements
    ``after_train`` or ``after_validate``), so a monitored name it may provide cannot be checked before training."""
    hooks = ("after_train", "after_validate")
    return not type(callback).__module__.startswith("adaptrain.") and any(overrides(callback, h) for h in hooks)


def check_monitors(monitors: list[tuple[str, str]], produced: Iterable[str]) -> None:
    """Raise a ConfigError for the first monitored ``train_``/``val_`` key no loader produces.

    Example:
        >>> check_monitors([("ModelCheckpoint(monitor=...)", "val_los")], ["val_loss", "train_loss"])
        Traceback (most recent call last):
        ...
        adaptrain.errors.ConfigError: ModelCheckpoint(monitor=...) is "val_los", which no loader produces; ...
    """
    produced = sorted(set(produced))
    for field, name in monitors:
        if name.startswith(MONITOR_PREFIXES) and name not in produced:
            close = difflib.get_close_matches(name, produced, n=1)
            hint = f' Did you mean "{close[0]}"?' if close else ""
            raise ConfigError(field, f'is "{name}", which no loader produces; available: {produced}.{hint}')


def train_keys(val_keys: Iterable[str]) -> list[str]:
    """The train_ keys an epoch records, from the val_ keys of the same criterion and metrics."""
    return [f"train_{key[len('val_'):]}" for key in val_keys if key.startswith("val_")]


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Warn with ``message`` the first time only, in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def slow_cpu_precision(precision: str) -> str | None:
    """Why ``precision`` is known to be slow on this CPU, or None.

    CPUs have no fast float16 kernels (16-mixed runs 5-23x slower than fp32 on the machines measured);
    bfloat16 pays off only with AVX512-BF16 or AMX (0.4-0.9x fp32's step time with them, slower without).
    """
    if precision == "16-mixed":
        return ("precision 16-mixed on a CPU: CPUs have no fast float16 kernels, so steps are typically several "
                'times slower than "32" (measured 5-23x here); use "32", or "bf16-mixed" on a CPU with '
                "AVX512-BF16/AMX.")
    if precision == "bf16-mixed" and not _cpu_has_bf16():
        return ('precision bf16-mixed on a CPU without AVX512-BF16/AMX: bfloat16 is emulated, so steps are typically '
                'slower than "32"; use "32" here (adaptrain tune measures it).')
    return None


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return True  # cannot tell: do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_objects(model: Any, optimizer: Any, metrics: Any) -> None:
    """Raise if the model, optimizer or metrics are not what ``Trainer`` takes, naming the argument."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Trainer(model=...): expected a torch.nn.Module; received {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("Trainer(optimizer=...): expected a torch.optim.Optimizer; "
                        f"received {type(optimizer).__name__}.")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"Trainer(metrics=...): expected a dict of name -> metric, e.g. {{\"acc\": "
                        f"MulticlassAccuracy(num_classes=10)}}; received a {type(metrics).__name__}.")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` / MPS / CPU; other names are checked against this machine."""
    if str(device) == "auto":
        return distributed.default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise setting_error("device", str(device), 'expected "auto", "cpu", "cuda" or "cuda:N".') from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise setting_error("device", str(device), 'CUDA is not available on this machine; use "auto" or "cpu".')
    mps = getattr(torch.backends, "mps", None)
    if resolved.type == "mps" and not (mps and mps.is_available()):
        raise setting_error("device", str(device), 'MPS (Apple GPU) is not available on this machine; use "auto" '
                            'or "cpu".')
    return resolved


def check_loader(loader: Any, argument: str) -> None:
    """Raise if ``loader`` is a map-style data set without an ``__iter__`` of its own: iterated directly
    it yields one sample at a time (no batch dimension), and the model would fail on it with a
    message that hides why. Iterable data sets, and data sets that define how they iterate, pass.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> check_loader(TensorDataset(torch.zeros(4, 2)), "fit(train_loader=...)")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: fit(train_loader=...): received a TensorDataset, a data set (one sample per index), ...
    """
    if isinstance(loader, torch.utils.data.Dataset) and getattr(type(loader), "__iter__", None) is None:
        raise TypeError(f"{argument}: received a {type(loader).__name__}, a data set (one sample per index), not "
                        "batches; pass torch.utils.data.DataLoader(dataset, batch_size=...) (batch_size=None for "
                        "a data set whose items are whole batches).")


def preflight(trainer: Trainer, fresh: bool) -> None:
    """Checks before the first step: schedule length, a sanity pass over val batches, monitored names."""
    state = trainer.state
    run_steps = state.steps_per_epoch * state.max_epochs if state.steps_per_epoch else None
    problem = fresh and schedule_too_long(state.scheduler, run_steps, state.steps_per_epoch,
                                          state.scheduler_interval)
    if problem:
        warnings.warn(problem)
    slow = trainer.device.type == "cpu" and slow_cpu_precision(trainer.precision.name)
    if slow:
        warn_once(slow)
    val_keys = trainer._sanity_check() if state.val_loader is not None else []
    if any(writes_records(cb) for cb in trainer.callbacks):
        return  # a callback of the user's may add the monitored value: its owner checks it at the epoch end
    metric_keys = [f"train_{name}" for name, _, _ in trainer.train_metrics.entries]
    produced = [*val_keys, *train_keys(val_keys), "train_loss", *metric_keys]
    named = monitored_names(trainer.callbacks, trainer._schedule.plateau_monitor(state))
    monitors = [(field, name) for field, name in named
                if (name.startswith("val_") and val_keys) or (name.startswith("train_") and
                                                                (val_keys or not name.startswith("train_loss_")))]
    check_monitors(monitors, produced)  # without a val loader, the callbacks name that problem themselves
