"""The options of the adaptive batch-size search, checked when they are given (``Trainer(...)``, YAML).

What the search does with them is in :mod:`adaptrain.core.batch_sizing` (the thin layer) and
:mod:`adaptrain.tuning.batch_size` (the pure decisions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from adaptrain.tuning.batch_size import LR_RULES, MODES


@dataclass(frozen=True)
class AdaptiveBatchSize:
    """Options of the batch-size search (``Trainer(adaptive_batch_size=AdaptiveBatchSize(...))``).

    Args:
        mode: ``"safe"`` only shrinks (the configured batch is kept when it fits: one probe);
            ``"full"`` grows while samples/s improves by ``min_gain`` per doubling.
        lr_scaling: ``"sqrt"`` (default, as OTX), ``"linear"`` or ``None`` (LR unchanged).
        memory_fraction: a batch fits when its peak memory stays under this share of the device's
            (CUDA: of free + already held memory; CPU: the process's peak RSS growth over available RAM).
        max_batch_size: the largest batch ``"full"`` may choose (also capped by the data set size).
        max_trials: probes at most (each a few real steps).
        min_gain: growth continues while a doubling is at least this much faster.
        steps_per_trial: timed steps per probe (after one warm-up step).

    Example:
        >>> AdaptiveBatchSize.parse("full").mode, AdaptiveBatchSize.parse({"mode": "safe", "max_trials": 4}).max_trials
        ('full', 4)
        >>> AdaptiveBatchSize(mode="huge")
        Traceback (most recent call last):
        ...
        ValueError: AdaptiveBatchSize(mode='huge'): expected "safe" or "full".
    """

    mode: str = "safe"
    lr_scaling: str | None = "sqrt"
    memory_fraction: float = 0.9
    max_batch_size: int | None = None
    max_trials: int = 10
    min_gain: float = 0.05
    steps_per_trial: int = 3

    def __post_init__(self) -> None:
        checks = {
            "mode": (self.mode in MODES, 'expected "safe" or "full"'),
            "lr_scaling": (self.lr_scaling in LR_RULES, 'expected "sqrt", "linear" or None'),
            "memory_fraction": (_number(self.memory_fraction) and 0 < self.memory_fraction <= 1,
                                "expected a fraction in (0, 1]"),
            "max_batch_size": (self.max_batch_size is None or _count(self.max_batch_size),
                               "expected an integer >= 1 or None"),
            "max_trials": (_count(self.max_trials), "expected an integer >= 1"),
            "min_gain": (_number(self.min_gain) and 0 <= self.min_gain < 1, "expected a fraction in [0, 1)"),
            "steps_per_trial": (_count(self.steps_per_trial), "expected an integer >= 1"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"AdaptiveBatchSize({name}={getattr(self, name)!r}): {expected}.")

    @classmethod
    def parse(cls, value: Any) -> AdaptiveBatchSize | None:
        """``None``, a mode string, an :class:`AdaptiveBatchSize`, or a mapping of its fields (YAML)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value not in MODES:
                raise ValueError(f'Trainer(adaptive_batch_size="{value}"): expected "safe", "full", None or an '
                                 "adaptrain.AdaptiveBatchSize(...).")
            return cls(mode=value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"Trainer(adaptive_batch_size={{...}}): unknown option(s) {', '.join(unknown)}; "
                                 f"expected some of {', '.join(f.name for f in fields(cls))}.")
            return cls(**value)
        raise TypeError(f"Trainer(adaptive_batch_size=...): expected \"safe\", \"full\", None or an "
                        f"adaptrain.AdaptiveBatchSize; received {type(value).__name__}.")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
