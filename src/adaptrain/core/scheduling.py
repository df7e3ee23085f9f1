"""The trainer's LR schedule: built from an object, a factory or a dict; stepped per step or per epoch.

A factory ``f(optimizer, total_steps=...)`` (e.g. ``functools.partial(OneCycleLR, max_lr=0.1)``) is
built at ``fit`` from the loader length, epochs and accumulation, so a schedule never overruns; the
roadmap's adaptive batch size rebuilds it the same way when the steps per epoch change.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

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
