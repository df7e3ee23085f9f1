"""Losses and metrics accumulated without a host-device sync per step, read at refresh points and epoch end.

torchmetrics ``Metric`` objects use their own update/compute/reset. Plain callables
``fn(outputs, targets) -> tensor`` return a batch mean; they are weighted by batch size, so the
epoch value is exact even when the last batch is smaller.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from typing import Any, Mapping

import torch

from adaptrain.core.batching import describe, select
from adaptrain.distributed.env import sum_over_ranks
from adaptrain.errors import MetricError


class WeightedMean:
    """A sample-weighted mean of per-batch values that costs no host-device sync per step.

    Each value may carry a ``tag`` (the batch index), so :meth:`flush` can say where the first
    NaN/Inf was, exactly, without a per-step check. Two ways to add, by where the values live:

    - ``defer=True`` (the default; values on an accelerator): ``update`` keeps a reference to the (detached)
      batch value; :meth:`flush` folds the pending values with one stack, one dot product and one
      read, at refresh points. Reading each value at once would be a sync per step.
    - ``defer=False`` (CPU values): ``update`` adds the value to the host total at once. Reading a
      CPU tensor is no sync, and one ``item()`` a step (~0.5 µs) costs less than keeping the value
      and folding it later (~6 µs a step on the tiny MLP of the peer benchmark). The sum is
      accumulated in float64, so it cannot overflow where the deferred float32 dot product would.

    Example:
        >>> for mean in WeightedMean(), WeightedMean.for_device(torch.device("cpu")):  # deferred, at once
        ...     mean.update(torch.tensor(1.0), 3); mean.update(torch.tensor(3.0), 1)
        ...     print(mean.defer, mean.compute())
        True 1.5
        False 1.5
    """

    def __init__(self, defer: bool = True) -> None:
        self.defer = defer
        self.total = 0.0  # the folded weighted sum, on the host (float64): read at every fold anyway
        self.count = 0
        self._pending: list[tuple[torch.Tensor, int, int]] = []  # (0-d value, weight, tag): one append a step
        self._weights_cache: tuple[list[int], torch.Tensor | None] = ([], None)  # the last flush's, on the device
        self._unflushed_bad: int | None = None  # defer=False: the first NaN/Inf tag added since the last flush

    @staticmethod
    def for_device(device: torch.device) -> WeightedMean:
        """Deferred on an accelerator, folded at once on the CPU (see the class docstring)."""
        return WeightedMean(defer=device.type != "cpu")

    def update(self, value: torch.Tensor, weight: int, tag: int = -1) -> None:
        self.count += weight
        if self.defer:
            if value.requires_grad:  # a kept value must not keep its graph (the window's losses come detached)
                value = value.detach()
            self._pending.append((value if value.dim() == 0 else value.reshape(()), weight, tag))  # 0-d: stacked as is
            return
        number = value.item()  # item() reads a value that requires grad as is: no detach() (~1 µs) needed
        if self._unflushed_bad is None and not math.isfinite(number):
            self._unflushed_bad = tag
        self.total += number * weight

    def flush(self, find_nonfinite: bool = False) -> int | None:
        """Fold pending values into the total (one stack, one dot product and one host-device read);
        with ``find_nonfinite``, return the tag of the first non-finite value, else None."""
        bad_tag, self._unflushed_bad = self._unflushed_bad, None
        if not self._pending:
            return bad_tag if find_nonfinite else None
        pending = self._pending
        values = torch.stack([value for value, _, _ in pending]).float()
        weights = self._weights_tensor([weight for _, weight, _ in pending], values.device)
        folded = float(torch.dot(values, weights))  # the sync a refresh point pays for its values
        self.total += folded
        # A NaN/Inf value always makes the weighted sum non-finite (times 0 too): the sum rules it
        # out; the per-value search (~35 µs on the CPU) runs only when it cannot.
        if find_nonfinite and bad_tag is None and not math.isfinite(folded):
            finite = torch.isfinite(values)
            if not bool(finite.all()):
                bad_tag = pending[int((~finite).nonzero()[0])][2]
        self._pending = []
        return bad_tag if find_nonfinite else None

    def _weights_tensor(self, weights: list[int], device: torch.device) -> torch.Tensor:
        """The weights as a float32 tensor on ``device``; the last one again when nothing changed (the
        batch sizes of a run repeat from one refresh point to the next: ~15 µs saved per flush)."""
        last, tensor = self._weights_cache
        if tensor is None or weights != last or tensor.device != device:
            tensor = torch.tensor(weights, dtype=torch.float32).to(device, non_blocking=True)
            self._weights_cache = (weights, tensor)
        return tensor

    def first_nonfinite(self) -> int | None:
        """The tag of the first NaN/Inf value (one added at once and not reported yet, a pending one, or
        -1 for one already folded into the total), without folding anything: on an accelerator a
        host-device sync that leaves the sums as they are."""
        if self._unflushed_bad is not None:
            return self._unflushed_bad
        if self._pending:
            finite = torch.isfinite(torch.stack([value for value, _, _ in self._pending]))
            if not bool(finite.all()):
                return self._pending[int((~finite).nonzero()[0])][2]
        if not math.isfinite(self.total):
            return -1
        return None

    def compute(self) -> float | None:
        """The mean over every sample seen; on several ranks, over every rank's samples (a collective)."""
        self.flush()
        total, count = sum_over_ranks([self.total, float(self.count)])
        if count == 0:
            return None
        return total / count

    def reset(self) -> None:
        self.total, self.count = 0.0, 0
        self._pending = []
        self._unflushed_bad = None

    def state_dict(self) -> dict[str, Any]:
        # Pending values are saved as they are, not folded: folding at another point than the
        # uninterrupted run would round differently, and a resumed run must match it exactly. So is
        # the tag of a NaN/Inf added at once but not reported yet (the next flush reports it).
        values = torch.stack([value for value, _, _ in self._pending]).float() if self._pending else None
        return {"total": self.total, "count": self.count, "pending": values,
                "weights": [weight for _, weight, _ in self._pending], "tags": [tag for _, _, tag in self._pending],
                "unflushed_bad": self._unflushed_bad}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        def to_device(value: Any) -> Any:
            return value.to(device) if isinstance(value, torch.Tensor) and device is not None else value

        self.reset()
        # a float; checkpoints before 2026-12-03 hold a 0-d tensor, or None for an empty sum
        self.total = float(state["total"]) if state["total"] is not None else 0.0
        self.count = int(state["count"])
        if state.get("pending") is not None:
            self._pending = list(zip(to_device(state["pending"]).unbind(), state["weights"], state["tags"]))
        self._unflushed_bad = state.get("unflushed_bad")  # absent before 2026-12-03
        if not self.defer and self._pending:  # a deferred mean's checkpoint resumed on the CPU: its values
            self._unflushed_bad = self.flush(find_nonfinite=True)  # come before any added from now on


class MetricSet:
    """The metrics of one phase (train or val), each a copy of the user's object.

    ``metrics`` maps name -> metric, or output key -> {name: metric} for one output of a
    multi-output model (recorded as ``<output>_<name>``).
    """

    def __init__(self, metrics: Mapping[str, Any] | None, device: torch.device) -> None:
        self.device = device
        self.entries: list[tuple[str, Any, Any]] = []  # (name, metric or callable, output key)
        self.means: dict[str, WeightedMean] = {}
        self.updates = 0  # batches since reset; counted here, not read from torchmetrics' private counter
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
            metric.persistent(True)  # our own copy: its state_dict() now holds the accumulated state
        elif callable(metric):
            self.means[name] = WeightedMean.for_device(device)
        else:
            raise TypeError(
                f"metrics[{name!r}]: expected a torchmetrics.Metric or a callable fn(outputs, targets); "
                f"received {type(metric).__name__}."
            )
        self.entries.append((name, metric, output_key))

    def update(self, outputs: Any, targets: Any, batch_size: int) -> None:
        self.updates += 1
        for name, metric, key in self.entries:
            preds, target = select(outputs, key), select(targets, key)
            try:
                if _is_torchmetric(metric):
                    metric.update(_detach(preds), _detach(target))
                else:
                    value = torch.as_tensor(metric(_detach(preds), _detach(target)), device=self.device)
                    if value.numel() != 1:  # shape is host-side: no sync
                        raise ValueError(f"it returned a tensor of shape {list(value.shape)}; expected one number, "
                                         "the batch mean (reduce per-sample values with .mean())")
                    self.means[name].update(value, batch_size)
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
                if self.updates:
                    with warnings.catch_warnings():  # restored state without an update since: that is fine
                        warnings.filterwarnings("ignore", message=".*before the ``update``")
                        values[name] = float(metric.compute())
            else:
                value = self.means[name].compute()
                if value is not None:
                    values[name] = value
        return values

    def reset(self) -> None:
        self.updates = 0
        for name, metric, _ in self.entries:
            (metric if _is_torchmetric(metric) else self.means[name]).reset()

    def state_dict(self) -> dict[str, Any]:
        """The accumulated state of every metric (on the device: no sync), through public APIs only."""
        metrics: dict[str, Any] = {}
        for name, metric, _ in self.entries:
            if _is_torchmetric(metric):
                metrics[name] = {"state": dict(metric.state_dict()), "update_count": self.updates}
            else:
                metrics[name] = self.means[name].state_dict()
        return metrics

    def load_state_dict(self, saved: Mapping[str, Any], device: torch.device) -> None:
        """Put back :meth:`state_dict`; a metric added since it was saved covers the batches after it only."""
        self.reset()
        for name, metric, _ in self.entries:
            if name not in saved:
                continue
            if _is_torchmetric(metric):
                metric.load_state_dict(dict(saved[name]["state"]), strict=False)
                metric.to(device)
                self.updates = int(saved[name]["update_count"])
            else:
                self.means[name].load_state_dict(saved[name], device)


class RunningSums:
    """The running epoch's loss, loss parts and train metrics (losses: :meth:`WeightedMean.for_device`).

    Values are added once their optimizer step succeeded (the windowed path keeps them in
    ``Window.tracked`` until then); reading them (:meth:`values`) is a host-device sync on an
    accelerator, paid at refresh points only.

    Example:
        >>> sums = RunningSums({}, torch.device("cpu"))
        >>> sums.add(torch.tensor(2.0), {}, None, None, batch_size=3, tag=1)
        >>> sums.add(torch.tensor(4.0), {}, None, None, batch_size=1, tag=2)
        >>> sums.values()
        {'loss': 2.5}
    """

    def __init__(self, metrics: Mapping[str, Any] | None, device: torch.device) -> None:
        self.device = device
        self.losses: dict[str, WeightedMean] = {"loss": WeightedMean.for_device(device)}
        self.metrics = MetricSet(metrics, device)

    def reset(self) -> None:
        self.losses = {"loss": WeightedMean.for_device(self.device)}
        self.metrics.reset()

    def add(self, loss: torch.Tensor, parts: Mapping[str, torch.Tensor], outputs: Any, targets: Any,
            batch_size: int, tag: int) -> None:
        """Track one batch; ``tag`` (its batch index) lets :meth:`fold` say where a loss first went NaN/Inf."""
        self.losses["loss"].update(loss, batch_size, tag)
        if parts:  # most criteria return a bare loss: no parts to walk
            for name, part in parts.items():
                self.losses.setdefault(name, WeightedMean.for_device(self.device)).update(part, batch_size)
        if self.metrics.entries:
            self.metrics.update(outputs, targets, batch_size)

    def fold(self, find_nonfinite: bool) -> int | None:
        """Fold pending loss values; with ``find_nonfinite``, the tag of the first NaN/Inf loss (a sync)."""
        return self.losses["loss"].flush(find_nonfinite=find_nonfinite)

    def values(self) -> dict[str, float]:
        """Current loss, parts and metric values (a host-device sync)."""
        values = {name: mean.compute() for name, mean in self.losses.items()}
        values = {k: v for k, v in values.items() if v is not None}
        values.update(self.metrics.compute())
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"losses": {name: mean.state_dict() for name, mean in self.losses.items()},
                "metrics": self.metrics.state_dict()}

    def load_state_dict(self, saved: Mapping[str, Any], device: torch.device) -> None:
        def mean(state: dict[str, Any]) -> WeightedMean:
            restored = WeightedMean.for_device(device)
            restored.load_state_dict(state, device)
            return restored

        self.losses = {name: mean(state) for name, state in saved["losses"].items()}
        self.metrics.load_state_dict(saved["metrics"], device)


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
