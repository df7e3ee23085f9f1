"""Metrics accumulated on the device and read only when asked (at refresh points and epoch end).

torchmetrics ``Metric`` objects use their own update/compute/reset. Plain callables
``fn(outputs, targets) -> tensor`` return a batch mean; they are weighted by batch size, so the
epoch value is exact even when the last batch is smaller.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Mapping

import torch

from adaptrain.batch import describe, select


class MetricError(RuntimeError):
    """A metric raised; names the metric and the shapes it was given."""


class WeightedMean:
    """A sample-weighted running mean kept on the device: no host sync until :meth:`compute`."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, value: torch.Tensor, weight: int) -> None:
        value = value.detach().float() * weight
        self.total = value if self.total is None else self.total + value
        self.count += weight

    def compute(self) -> float | None:
        if self.total is None or self.count == 0:
            return None
        return float(self.total) / self.count  # a host-device sync point

    def reset(self) -> None:
        self.total, self.count = None, 0


class MetricSet:
    """The metrics of one phase (train or val), each a copy of the user's object.

    ``metrics`` maps name -> metric, or output key -> {name: metric} for one output of a
    multi-output model (recorded as ``<output>_<name>``).
    """

    def __init__(self, metrics: Mapping[str, Any] | None, device: torch.device) -> None:
        self.entries: list[tuple[str, Any, Any]] = []  # (name, metric or callable, output key)
        self.means: dict[str, WeightedMean] = {}
        for name, metric in (metrics or {}).items():
            if isinstance(metric, Mapping):
                for sub_name, sub_metric in metric.items():
                    self._add(f"{name}_{sub_name}", sub_metric, name, device)
            else:
                self._add(str(name), metric, None, device)

    def _add(self, name: str, metric: Any, output_key: Any, device: torch.device) -> None:
        if _is_torchmetric(metric):
            metric = copy.deepcopy(metric).to(device)
            metric.reset()
        elif callable(metric):
            self.means[name] = WeightedMean()
        else:
            raise TypeError(
                f"metrics[{name!r}]: expected a torchmetrics.Metric or a callable fn(outputs, targets); "
                f"received {type(metric).__name__}."
            )
        self.entries.append((name, metric, output_key))

    def update(self, outputs: Any, targets: Any, batch_size: int) -> None:
        for name, metric, key in self.entries:
            preds, target = select(outputs, key), select(targets, key)
            try:
                if _is_torchmetric(metric):
                    metric.update(_detach(preds), _detach(target))
                else:
                    self.means[name].update(torch.as_tensor(metric(_detach(preds), _detach(target))), batch_size)
            except Exception as error:
                raise MetricError(
                    f"metric {name!r} ({_name_of(metric)}) raised {type(error).__name__}: {error} "
                    f"(outputs {describe(preds)}, targets {describe(target)})"
                ) from error

    def compute(self) -> dict[str, float]:
        """Current values (a sync point); metrics with no update yet are left out."""
        values: dict[str, float] = {}
        for name, metric, _ in self.entries:
            if _is_torchmetric(metric):
                if metric.update_count:
                    values[name] = float(metric.compute())
            else:
                value = self.means[name].compute()
                if value is not None:
                    values[name] = value
        return values

    def reset(self) -> None:
        for name, metric, _ in self.entries:
            (metric if _is_torchmetric(metric) else self.means[name]).reset()


def _is_torchmetric(obj: Any) -> bool:
    # torchmetrics takes over a second to import; a Metric object means the user imported it already.
    torchmetrics = sys.modules.get("torchmetrics")
    return torchmetrics is not None and isinstance(obj, torchmetrics.Metric)


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    return obj


def _name_of(metric: Any) -> str:
    return getattr(metric, "__name__", type(metric).__name__)
