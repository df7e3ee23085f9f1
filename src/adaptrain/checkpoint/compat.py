"""The pieces of exact resume that live outside :class:`~adaptrain.TrainState`, and compatibility checks.

- the train loader's own ``torch.Generator`` states (a loader built with ``generator=...`` shuffles
  from it, not from the global RNG that ``TrainState.epoch_start_rng`` covers);
- the running epoch's loss and metric accumulators, so a resumed epoch's ``train_loss`` and
  ``train_<metric>`` cover all of its batches, not only those after the resume;
- checks that a checkpoint fits this model, optimizer and scheduler: each returns the problem as
  text (or None); :func:`adaptrain.checkpoint.io.restore_trainer` raises it with the file's name.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> loader = DataLoader(range(8), shuffle=True, generator=torch.Generator().manual_seed(0))
    >>> saved = loader_rng_state(loader)
    >>> first = list(loader)
    >>> set_loader_rng_state(loader, saved); list(loader) == first
    True
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


# ---------------------------------------------------------------------- the loader's own RNG
def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader's shuffling draws from (its own, its sampler's)."""
    owners = (loader, getattr(loader, "sampler", None),
              getattr(getattr(loader, "batch_sampler", None), "sampler", None))
    found: list[torch.Generator] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def loader_rng_state(loader: Any) -> list[torch.Tensor] | None:
    """States of the loader's own generators (None when it draws from the global torch RNG only)."""
    generators = _loader_generators(loader)
    return [g.get_state() for g in generators] or None


def set_loader_rng_state(loader: Any, states: list[torch.Tensor] | None) -> None:
    """Inverse of :func:`loader_rng_state`; warns when the loader's generators do not match the saved ones."""
    generators = _loader_generators(loader)
    if states is None and not generators:
        return
    if states is None or len(states) != len(generators):
        warnings.warn(f"resume: the checkpoint holds {len(states or [])} train-loader generator state(s), this "
                      f"loader has {len(generators)}; its shuffle order will differ from the interrupted run's.")
        return
    for generator, saved in zip(generators, states):
        generator.set_state(saved)


# ---------------------------------------------------------------------- the running epoch's sums
def epoch_progress(trainer: "Trainer") -> dict[str, Any]:
    """The running epoch's loss and metric accumulators, as they are (on the device: no sync)."""
    metric_set, metrics = trainer.train_metrics, {}
    for name, metric, _ in metric_set.entries:
        if name in metric_set.means:  # a plain callable, averaged by a WeightedMean
            metrics[name] = _mean_state(metric_set.means[name])
        else:  # a torchmetrics Metric (not imported here: it takes seconds)
            metrics[name] = {"state": dict(metric.metric_state), "update_count": metric.update_count}
    losses = {name: _mean_state(mean) for name, mean in getattr(trainer, "_losses", {}).items()}
    return {"losses": losses, "metrics": metrics}


def load_epoch_progress(trainer: "Trainer", progress: dict[str, Any]) -> None:
    """Put saved accumulators back, after the trainer reset them for the resumed epoch."""
    from adaptrain.core.metrics import WeightedMean

    def mean(saved: dict[str, Any]) -> WeightedMean:
        restored = WeightedMean()
        restored.load_state_dict(saved, trainer.device)
        return restored

    trainer._losses = {name: mean(saved) for name, saved in progress["losses"].items()}
    metric_set = trainer.train_metrics
    for name, metric, _ in metric_set.entries:
        saved = progress["metrics"].get(name)
        if saved is None:
            continue  # a metric added since the checkpoint: it covers the batches after resume only
        if name in metric_set.means:
            metric_set.means[name] = mean(saved)
        else:
            for attr, value in saved["state"].items():
                setattr(metric, attr, _to(value, trainer.device))
            metric._update_count, metric._computed = saved["update_count"], None  # as Metric.update leaves them


def _mean_state(mean: Any) -> dict[str, Any]:
    return mean.state_dict()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return [_to(v, device) for v in value] if isinstance(value, list) else value


# ---------------------------------------------------------------------- does the checkpoint fit?
def model_mismatch(model: torch.nn.Module, saved: dict[str, Any]) -> str | None:
    """Missing keys, unexpected keys and shape mismatches between ``saved`` and ``model``, or None.

    Example:
        >>> model_mismatch(torch.nn.Linear(2, 1), torch.nn.Linear(3, 1).state_dict())  # doctest: +ELLIPSIS
        '...different model than this Linear; shape mismatches: weight: checkpoint [1, 3], model [1, 2].'
    """
    own = model.state_dict()
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    shapes = [f"{key}: checkpoint {list(saved[key].shape)}, model {list(value.shape)}" for key, value in own.items()
              if key in saved and isinstance(value, torch.Tensor) and saved[key].shape != value.shape]
    problems = [f"{label}: {_few(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    if not problems:
        return None
    return f"holds the weights of a different model than this {type(model).__name__}; " + "; ".join(problems) + "."


def optimizer_mismatch(optimizer: torch.optim.Optimizer, saved: dict[str, Any], saved_type: str) -> str | None:
    """Type, param-group count, group sizes or state shapes that differ, or None."""
    problem = _optimizer_problem(optimizer, saved, saved_type)
    return problem and problem + "; build the optimizer the same way as the run that saved the checkpoint."


def _optimizer_problem(optimizer: torch.optim.Optimizer, saved: dict[str, Any], saved_type: str) -> str | None:
    groups, own_groups = saved["param_groups"], optimizer.param_groups
    if saved_type != type(optimizer).__name__:
        return f"was saved with a {saved_type} optimizer; this trainer's is {type(optimizer).__name__}"
    if len(groups) != len(own_groups):
        return f"has {len(groups)} optimizer param group(s); this optimizer has {len(own_groups)}"
    for i, (group, own) in enumerate(zip(groups, own_groups)):
        if len(group["params"]) != len(own["params"]):
            return f"has {len(group['params'])} parameters in optimizer param group {i}; this optimizer has " \
                   f"{len(own['params'])}"
        for index, param in zip(group["params"], own["params"]):
            for name, value in saved["state"].get(index, {}).items():  # e.g. Adam's exp_avg, shaped like the param
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    return (f"has optimizer state {name!r} of shape {list(value.shape)} for a parameter of shape "
                            f"{list(param.shape)} (param group {i})")
    return None


def scheduler_mismatch(scheduler: Any, saved_type: str | None) -> str | None:
    own_type = type(scheduler).__name__ if scheduler is not None else None
    if saved_type == own_type:
        return None
    return (f"was saved with scheduler {saved_type}; this trainer has {own_type}. Exact resume needs the same "
            "scheduler (Trainer(scheduler=...)).")


def position_mismatch(batch_idx: int, loader: Any) -> str | None:
    """A mid-epoch position the train loader cannot reach (it got shorter), or None."""
    try:
        length = len(loader)
    except TypeError:
        return None
    if batch_idx <= length:
        return None
    return (f"was saved after batch {batch_idx} of an epoch, but this train loader has {length} batches; "
            "resume with the same data and batch size.")


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Settings that differ from the saving run's and break exactness without breaking the resume."""
    return [f"was saved with {key}={saved.get(key)!r}; resuming with {now[key]!r}. Training continues, but "
            "will not match the uninterrupted run." for key in ("precision", "accumulate_grad_batches",
                                                                 "steps_per_epoch") if saved.get(key) != now[key]]


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
