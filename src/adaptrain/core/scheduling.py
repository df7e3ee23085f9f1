"""The trainer's LR schedule: built from an object, a factory or a dict; stepped per step or per epoch.

A factory ``f(optimizer, total_steps=...)`` (e.g. ``functools.partial(OneCycleLR, max_lr=0.1)``) is
built at ``fit`` from the loader length, epochs and accumulation, so a schedule never overruns; when
the adaptive batch size changes the steps per epoch, :func:`rescale_schedule` adapts the LR and the
schedule's length before the first step.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch.optim.lr_scheduler import ConstantLR, CyclicLR, LinearLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from adaptrain.core.state import TrainState
from adaptrain.errors import ConfigError

#: Schedulers whose schedule is counted in optimizer steps, not epochs.
STEP_SCHEDULERS = (OneCycleLR, CyclicLR)


class LRSchedule:
    """Holds the user's scheduler spec; :meth:`setup` builds and checks it, :meth:`step_epoch` steps it.

    The per-step call (``state.scheduler.step()`` after an optimizer step that was not skipped)
    stays in the loop, where it is one line.

    Example:
        >>> import functools
        >>> schedule = LRSchedule({"scheduler": functools.partial(OneCycleLR, max_lr=0.1), "interval": "step"})
        >>> schedule.spec["interval"]
        'step'
    """

    def __init__(self, scheduler: Any) -> None:
        self.spec = parse_scheduler(scheduler)
        self.monitor = "val_loss"

    def setup(self, state: TrainState) -> None:
        """Build (or keep) the scheduler for this fit and check it fits the run; raises before any step."""
        spec = self.spec
        scheduler = spec["scheduler"]
        total_steps = state.steps_per_epoch * state.max_epochs if state.steps_per_epoch else None
        if state.epoch > 0 and state.scheduler is not None:
            scheduler = state.scheduler  # fit() called again: continue the schedule, do not restart it
        elif scheduler is not None and not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
            scheduler = build_from_factory(scheduler, state.optimizer, total_steps)
        state.scheduler = scheduler
        state.scheduler_interval = spec["interval"] or (
            "step" if isinstance(scheduler, STEP_SCHEDULERS) else "epoch")
        if isinstance(scheduler, OneCycleLR) and total_steps and scheduler.total_steps < total_steps:
            raise ConfigError(
                "scheduler", f"is OneCycleLR with total_steps={scheduler.total_steps}, but this run takes "
                f"{total_steps} optimizer steps ({state.steps_per_epoch} per epoch x {state.max_epochs} epochs); "
                "pass functools.partial(OneCycleLR, max_lr=...) and the trainer computes total_steps.")
        if isinstance(scheduler, ReduceLROnPlateau) and state.scheduler_interval == "step":
            raise ConfigError("scheduler.interval", 'is "step", but ReduceLROnPlateau steps once per epoch with its '
                              'monitored value; use "epoch".')
        self.monitor = spec["monitor"] or ("val_loss" if state.val_loader is not None else "train_loss")

    def plateau_monitor(self, state: TrainState) -> str | None:
        """The value a ReduceLROnPlateau scheduler is fed (None for other schedulers)."""
        return self.monitor if isinstance(state.scheduler, ReduceLROnPlateau) else None

    def step_epoch(self, state: TrainState) -> None:
        """Step an epoch-interval scheduler; ReduceLROnPlateau gets its monitored value."""
        if state.scheduler is None or state.scheduler_interval != "epoch":
            return
        if isinstance(state.scheduler, ReduceLROnPlateau):
            value = state.epoch_logs.get(self.monitor)
            if value is None:
                if self.monitor.startswith("val_") and not state.validated:
                    return  # validation was skipped this epoch: nothing to feed the plateau scheduler
                raise ConfigError("scheduler.monitor", f'is "{self.monitor}", which no loader produced; '
                                  f"available: {sorted(k for k in state.epoch_logs if k != 'epoch')}.")
            state.scheduler.step(value)
        else:
            state.scheduler.step()


def parse_scheduler(scheduler: Any) -> dict[str, Any]:
    spec = {"scheduler": scheduler, "interval": None, "monitor": None}
    if isinstance(scheduler, Mapping):
        unknown = set(scheduler) - set(spec)
        if unknown or "scheduler" not in scheduler:
            raise ValueError(f"Trainer(scheduler={{...}}): expected keys 'scheduler', 'interval', 'monitor'; "
                             f"received {sorted(scheduler)}.")
        spec.update(scheduler)
    if spec["interval"] not in (None, "step", "epoch"):
        raise ValueError(f'Trainer(scheduler={{"interval": "{spec["interval"]}"}}): expected "step" or "epoch".')
    if spec["scheduler"] is not None and not callable(spec["scheduler"]) and \
            not isinstance(spec["scheduler"], (LRScheduler, ReduceLROnPlateau)):
        raise TypeError(f"Trainer(scheduler=...): expected an LR scheduler or a factory f(optimizer); "
                        f"received {type(spec['scheduler']).__name__}.")
    return spec


def build_from_factory(factory: Callable, optimizer: torch.optim.Optimizer, total_steps: int | None) -> Any:
    """Call ``factory(optimizer)``, passing ``total_steps`` when the factory accepts it."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "total_steps" in params:
        if total_steps is None:
            raise ValueError("Trainer(scheduler=...): the factory needs total_steps, but the train loader has "
                             "no len().")
        return factory(optimizer, total_steps=total_steps)
    return factory(optimizer)


# ---------------------------------------------------------------------- a new batch size
def rescale_schedule(scheduler: Any, optimizer: torch.optim.Optimizer, lr_factor: float, step_ratio: float,
                     interval: str | None) -> None:
    """Adapt the LR (every param group) and a schedule built for the old batch size to the new one.

    ``lr_factor``: the LR rule's multiplier (:func:`adaptrain.tuning.batch_size.scale_lr`).
    ``step_ratio``: new optimizer steps per epoch over the old. A factory (not built yet) needs
    only the LR: it is built later for the new step count. An instance has its base LRs scaled;
    one counted in steps (OneCycleLR, CyclicLR, a LinearLR/ConstantLR warm-up stepped per step)
    has its length scaled too, so it spans the same epochs and never overruns. Any other
    per-step schedule cannot be rebuilt: :class:`ConfigError` (raised before anything changes).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> one_cycle = OneCycleLR(optimizer, max_lr=0.1, total_steps=100)
        >>> rescale_schedule(one_cycle, optimizer, lr_factor=2.0, step_ratio=0.25, interval=None)
        >>> one_cycle.total_steps, optimizer.param_groups[0]["max_lr"]
        (25, 0.2)
    """
    per_step = check_rescalable(scheduler, interval)
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= lr_factor
    if not isinstance(scheduler, (LRScheduler, ReduceLROnPlateau)):
        return  # a factory: built later, from the rescaled LR, for the new step count
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr * lr_factor for lr in scheduler.base_lrs]
    if isinstance(scheduler, CyclicLR):
        scheduler.max_lrs = [lr * lr_factor for lr in scheduler.max_lrs]
    if per_step:
        _stretch(scheduler, step_ratio)


def check_rescalable(scheduler: Any, interval: str | None) -> bool:
    """Whether ``scheduler`` is a built per-step schedule (its length must follow the new step count);
    :class:`ConfigError` for one that cannot be rebuilt (checked before any work)."""
    built = isinstance(scheduler, (LRScheduler, ReduceLROnPlateau))
    per_step = built and (interval == "step" or (interval is None and isinstance(scheduler, STEP_SCHEDULERS)))
    if per_step and not isinstance(scheduler, (OneCycleLR, CyclicLR, LinearLR, ConstantLR)):
        raise ConfigError("scheduler", f"is a {type(scheduler).__name__} stepped per optimizer step, built for the "
                          "configured batch size; the adaptive batch size changes the steps per epoch and it cannot "
                          "be rebuilt: pass a factory f(optimizer, total_steps=...) (e.g. functools.partial), "
                          "or step it per epoch.")
    return per_step


def _stretch(scheduler: Any, ratio: float) -> None:
    """Scale a per-step schedule's length by ``ratio`` (it has not taken a step of the run yet)."""
    if isinstance(scheduler, OneCycleLR):
        old, new = scheduler.total_steps, max(2, round(scheduler.total_steps * ratio))
        phases = scheduler._schedule_phases  # end steps are pct * total - k (torch's own formula): re-derive
        pct = (float(phases[0]["end_step"]) + 1) / old
        ends = [pct * new - 1, 2 * pct * new - 2, new - 1] if len(phases) == 3 else [pct * new - 1, new - 1]
        for phase, end in zip(phases, ends):
            phase["end_step"] = float(end)
        scheduler.total_steps = new
    elif isinstance(scheduler, CyclicLR):
        scheduler.total_size = max(2.0, round(scheduler.total_size * ratio))
    else:  # LinearLR / ConstantLR warm-up
        scheduler.total_iters = max(1, round(scheduler.total_iters * ratio))
