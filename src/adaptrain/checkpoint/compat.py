"""Does a checkpoint fit this run? Pure checks over state dicts, each returning the problem as text (or None).

``fit(ckpt_path=...)`` runs every check before anything changes and raises the first problem as a
:class:`~adaptrain.CheckpointError` naming the file, so a refused checkpoint leaves the trainer untouched.
"""

from __future__ import annotations

import math
from typing import Any

import torch


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


def position_mismatch(batch_idx: int, length: int | None) -> str | None:
    """A mid-epoch position a train loader of ``length`` batches cannot reach (it got shorter), or None."""
    if length is None or batch_idx <= length:
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


def onecycle_too_short(scheduler: Any, saved: Any, counters: dict[str, Any], steps_per_epoch: int | None,
                       max_epochs: int, accumulate_grad_batches: int) -> str | None:
    """A OneCycle schedule cannot stretch: resuming it for more steps than it has left fails mid-run in torch."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) or not isinstance(saved, dict):
        return None
    total, done = saved.get("total_steps"), saved.get("last_epoch")
    if total is None or done is None or not steps_per_epoch:
        return None
    steps_into_epoch = math.ceil(counters["batch_idx"] / accumulate_grad_batches)
    remaining = (max_epochs - counters["epoch"]) * steps_per_epoch - steps_into_epoch
    if done + remaining > total:
        return (f"holds a OneCycleLR schedule of {total} steps with {total - done} left, but this run has {remaining} "
                f"more optimizer steps to take ({steps_per_epoch} per epoch up to epoch {max_epochs}); a one-cycle "
                "schedule cannot be extended: resume with the original settings, or start a new run from the weights.")
    return None
