"""Stop training when a monitored value stops improving."""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any

from adaptrain.core.callback import Callback
from adaptrain.errors import ConfigError

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in ``mode`` ("min" or "max").

    Example:
        >>> improved(0.5, 0.6, "min", 0.05), improved(0.58, 0.6, "min", 0.05)
        (True, False)
    """
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


def missing_monitor_error(monitor: str, available: list[str], owner: str) -> ConfigError:
    close = difflib.get_close_matches(monitor, available, n=1)
    hint = f' Did you mean "{close[0]}"?' if close else ""
    return ConfigError(f"{owner}(monitor=...)", f'is "{monitor}", which no loader produces; '
                       f"available: {sorted(available)}.{hint}")


class EarlyStopping(Callback):
    """Stops ``fit`` after ``patience`` validations without improvement of ``monitor``.

    Changes training: sets ``state.should_stop``. Patience counts epochs that have the monitored
    value, so a run that validates every k epochs waits ``patience`` validations, not epochs.

    Example:
        >>> stopper = EarlyStopping(monitor="val_loss", mode="min", patience=3, min_delta=1e-4)
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f'EarlyStopping(mode="{mode}"): expected "min" or "max".')
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"EarlyStopping(patience={patience!r}): expected an integer >= 1.")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping(min_delta={min_delta!r}): expected a number >= 0.")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def before_fit(self, trainer: Trainer) -> None:
        if self.monitor.startswith("val_") and trainer.state.val_loader is None:
            raise ConfigError("EarlyStopping(monitor=...)", f'is "{self.monitor}", but fit() got no val_loader; '
                              "pass val_loader or monitor a train_ value.")

    def after_epoch(self, trainer: Trainer) -> None:
        record = trainer.state.history.records[-1]
        value = record.get(self.monitor)
        if value is None:
            validated = any(k.startswith("val_") for k in record)
            if self.monitor.startswith("val_") and not validated:
                return  # validation skipped this epoch: nothing to compare
            raise missing_monitor_error(self.monitor, [k for k in record if k != "epoch"], "EarlyStopping")
        if improved(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = record["epoch"]
            trainer.state.should_stop = True
            trainer.state.stop_reason = (f"EarlyStopping: {self.monitor} did not improve for {self.patience} "
                                         f"validations (best {self.best:.4g}) at epoch {record['epoch']}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.stopped_epoch = state["best"], state["wait"], state["stopped_epoch"]
