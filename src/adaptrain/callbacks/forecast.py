"""Forecast the monitored metric at the last epoch while training; stop runs that cannot reach a target."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

from adaptrain.callbacks.early_stopping import missing_monitor_error
from adaptrain.core.callback import Callback
from adaptrain.tuning.forecasting import Forecast, ForecastError, default_limits, forecast

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


def hopeless(fc: Forecast, stop_if_below: float | None = None, stop_if_above: float | None = None) -> str | None:
    """Why the forecast says the target is out of reach (even its optimistic end misses it), or None.

    This looks at the interval only; :class:`ForecastCallback` also requires ``fc.reliable``.

    Example:
        >>> fc = Forecast(0.60, 0.55, 0.66, 40, "max", 0.9, {}, [], [], 1.0)
        >>> hopeless(fc, stop_if_below=0.9)
        'even the optimistic end of the 90% interval, 0.66, is below the target 0.9'
        >>> hopeless(fc, stop_if_below=0.65) is None
        True
    """
    end = f"even the optimistic end of the {fc.level:.0%} interval, {fc.optimistic:.4g},"
    if stop_if_below is not None and fc.mode == "max" and fc.optimistic < stop_if_below:
        return f"{end} is below the target {stop_if_below:g}"
    if stop_if_above is not None and fc.mode == "min" and fc.optimistic > stop_if_above:
        return f"{end} is above the target {stop_if_above:g}"
    return None


class ForecastCallback(Callback):
    """After each epoch that has ``monitor``, forecasts its value at the last epoch (or ``at``).

    Adds ``forecast_<monitor>``, ``forecast_<monitor>_low`` and ``forecast_<monitor>_high`` to the
    epoch's record (``order = -5``: loggers and checkpoints see them). Epochs where the data cannot
    support a forecast (see :func:`adaptrain.forecast`) get no keys; the reason is in ``last_error``.
    The learning rate of each record is passed along, so the fit starts after the last lr drop.

    Changes training only with ``stop_if_below`` (mode "max") or ``stop_if_above`` (mode "min"):
    once ``min_epochs`` values exist and ``patience`` reliable forecasts in a row say that even the
    interval's optimistic end misses the target, it sets ``state.should_stop`` and prints why. A
    forecast flagged unreliable (few points, an interval wider than the observed range, an lr drop
    just before; see ``Forecast.reasons``) is logged but never counts toward stopping.

    Example:
        >>> cb = ForecastCallback(monitor="val_acc", stop_if_below=0.9, min_epochs=5)
    """

    order = -5

    def __init__(self, monitor: str = "val_acc", mode: str | None = None, at: int | None = None,
                 min_epochs: int = 5, stop_if_below: float | None = None, stop_if_above: float | None = None,
                 patience: int = 2, level: float = 0.9, every: int = 1,
                 limits: tuple[float | None, float | None] | None = None, use_lr: bool = True) -> None:
        self.monitor = monitor
        self.mode = mode or ("min" if "loss" in monitor.lower() else "max")
        if self.mode not in ("min", "max"):
            raise ValueError(f'ForecastCallback(mode="{mode}"): expected "min" or "max".')
        if stop_if_below is not None and self.mode != "max":
            raise ValueError(f"ForecastCallback(stop_if_below=...) needs mode='max' (higher is better); {monitor} "
                             f"uses mode='min': pass stop_if_above instead.")
        if stop_if_above is not None and self.mode != "min":
            raise ValueError(f"ForecastCallback(stop_if_above=...) needs mode='min' (lower is better); {monitor} "
                             f"uses mode='max': pass stop_if_below instead.")
        for name, value in (("min_epochs", min_epochs), ("patience", patience), ("every", every)):
            if not isinstance(value, int) or value < (4 if name == "min_epochs" else 1):
                raise ValueError(f"ForecastCallback({name}={value!r}): expected an integer >= "
                                 f"{4 if name == 'min_epochs' else 1}.")
        self.at, self.min_epochs, self.patience, self.every = at, min_epochs, patience, every
        self.stop_if_below, self.stop_if_above, self.level = stop_if_below, stop_if_above, level
        self.limits, self.use_lr = limits, use_lr
        self.forecasts: list[dict[str, float]] = []  # one per forecast: epoch, value, low, high, reliable
        self.strikes = 0  # consecutive forecasts that missed the target
        self.stopped_epoch: int | None = None
        self.last: Forecast | None = None  # the latest forecast, with its families and curves
        self.last_error: str | None = None  # why the latest epoch got no forecast

    def after_epoch(self, trainer: Trainer) -> None:
        state = trainer.state
        record = state.history.records[-1]
        if record.get(self.monitor) is None:
            if self.monitor.startswith("val_") and not any(k.startswith("val_") for k in record):
                return  # no validation this epoch
            raise missing_monitor_error(self.monitor, [k for k in record if k != "epoch"], "ForecastCallback")
        points = [r for r in state.history.records if _finite(r.get(self.monitor))]
        at = self.at or state.max_epochs
        if len(points) < self.min_epochs or record["epoch"] >= at or len(points) % self.every:
            return
        values = [float(r[self.monitor]) for r in points]
        lrs = [r.get("lr") for r in points]
        limits = self.limits if self.limits is not None else default_limits(self.monitor, values)
        try:
            fc = forecast([r["epoch"] for r in points], values, at=at, mode=self.mode, level=self.level,
                          lrs=lrs if self.use_lr and all(_finite(lr) for lr in lrs) else None,
                          limits=limits, metric=self.monitor, min_points=min(self.min_epochs, 5), unit="epoch")
        except ForecastError as error:
            self.last_error, self.strikes = str(error), 0
            return
        self.last, self.last_error = fc, None
        key = f"forecast_{self.monitor}"
        record.update({key: fc.value, f"{key}_low": fc.low, f"{key}_high": fc.high})
        self.forecasts.append({"epoch": record["epoch"], "value": fc.value, "low": fc.low, "high": fc.high,
                               "reliable": fc.reliable})
        # An unreliable forecast says little about where the run ends: it neither counts toward
        # stopping nor clears the strikes of reliable ones before it.
        reason = hopeless(fc, self.stop_if_below, self.stop_if_above) if fc.reliable else None
        if fc.reliable:
            self.strikes = self.strikes + 1 if reason else 0
        if reason and self.strikes >= self.patience:
            self.stopped_epoch = record["epoch"]
            state.should_stop = True
            state.stop_reason = f"ForecastCallback: {self.monitor} at epoch {at} cannot reach the target: {reason}"
            message = (f"ForecastCallback: stopping at epoch {record['epoch']} of {at}. {self.monitor} is "
                       f"{values[-1]:.4g} now and forecast to be {fc.value:.4g} at epoch {at} "
                       f"({fc.level:.0%} interval {fc.low:.4g} to {fc.high:.4g}); {reason} "
                       f"({self.patience} forecasts in a row). Saves {at - record['epoch']} epochs.")
            printer = getattr(trainer, "print", None)
            printer(message) if callable(printer) else warnings.warn(message, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"forecasts": [dict(f) for f in self.forecasts], "strikes": self.strikes,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forecasts = [dict(f) for f in state["forecasts"]]
        self.strikes, self.stopped_epoch = state["strikes"], state["stopped_epoch"]

    def __repr__(self) -> str:
        target = (f", stop_if_below={self.stop_if_below}" if self.stop_if_below is not None else
                  f", stop_if_above={self.stop_if_above}" if self.stop_if_above is not None else "")
        return f"ForecastCallback(monitor={self.monitor!r}, mode={self.mode!r}{target})"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
