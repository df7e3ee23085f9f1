"""Criteria: one callable over (outputs, targets), or one loss per output with weights."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from adaptrain.core.batching import describe

LossFn = Callable[[Any, Any], Any]


class MultiLoss:
    """One loss per output, summed with weights; each part is recorded in the history.

    Outputs and targets are matched by dict key (dict outputs) or position (tuple outputs).

    Example:
        >>> import torch.nn as nn
        >>> loss = MultiLoss({"digit": nn.CrossEntropyLoss(), "size": nn.MSELoss()}, weights={"size": 0.5})
        >>> out = {"digit": torch.zeros(4, 10), "size": torch.zeros(4)}
        >>> sorted(loss(out, {"digit": torch.zeros(4, dtype=torch.long), "size": torch.ones(4)}))
        ['loss', 'loss_digit', 'loss_size']
    """

    def __init__(self, losses: Mapping[Any, LossFn] | Sequence[LossFn],
                 weights: Mapping[Any, float] | Sequence[float] | None = None) -> None:
        items = list(losses.items()) if isinstance(losses, Mapping) else list(enumerate(losses))
        if not items:
            raise ValueError("MultiLoss(losses=...): expected at least one loss.")
        if weights is None:
            weight_of = {key: 1.0 for key, _ in items}
        elif isinstance(weights, Mapping):
            unknown = set(weights) - {key for key, _ in items}
            if unknown:
                raise ValueError(f"MultiLoss(weights=...): keys {sorted(map(str, unknown))} have no loss.")
            weight_of = {key: float(weights.get(key, 1.0)) for key, _ in items}
        else:
            if len(weights) != len(items):
                raise ValueError(f"MultiLoss(weights=...): expected {len(items)} weights; received {len(weights)}.")
            weight_of = {key: float(w) for (key, _), w in zip(items, weights)}
        self.items = items
        self.weights = weight_of

    def __call__(self, outputs: Any, targets: Any) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        total = None
        for key, loss_fn in self.items:
            try:
                part = loss_fn(outputs[key], targets[key])
            except (KeyError, IndexError, TypeError) as error:
                raise ValueError(
                    f"MultiLoss: output {key!r} has no match in outputs {describe(outputs)} "
                    f"and targets {describe(targets)}."
                ) from error
            parts[f"loss_{key}"] = part
            weighted = part * self.weights[key]
            total = weighted if total is None else total + weighted
        return {"loss": total, **parts}


def as_criterion(criterion: Any) -> LossFn:
    """Accept a callable, or a dict/list of per-output losses (wrapped in :class:`MultiLoss`)."""
    if isinstance(criterion, (Mapping, list, tuple)):
        return MultiLoss(criterion)
    if not callable(criterion):
        raise TypeError("Trainer(criterion=...): expected a callable loss or a dict of them; "
                        f"received {type(criterion).__name__}.")
    return criterion


def split_loss(value: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts) from a criterion's result: a tensor, or a dict with "loss" (or parts to sum)."""
    if isinstance(value, torch.Tensor):
        return value, {}
    if isinstance(value, Mapping):
        parts = {k if str(k).startswith("loss") else f"loss_{k}": v for k, v in value.items() if k != "loss"}
        total = value["loss"] if "loss" in value else sum(parts.values())
        return total, parts
    raise TypeError(f"the criterion returned {type(value).__name__}; expected a scalar tensor or a dict of them.")
