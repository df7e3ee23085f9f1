"""Input checks for :func:`adaptrain.forecast`: what to refuse, where the fitted segment starts.

A forecast is refused (:class:`ForecastError`) only when there is no curve to extend: too few
points, a constant metric, a diverged last value, or a curve that clearly moves the wrong way for
``mode``. Malformed arguments raise ValueError. Messages name x by the caller's ``unit``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class ForecastError(ValueError):
    """The data cannot support a forecast; the message starts with ``"cannot forecast: "``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot forecast: {reason}")


def where(unit: str, x: float) -> str:
    """How a message names a point: ``x=1200`` for the bare unit "x", else ``epoch 12``.

    Example:
        >>> where("x", 1200.0), where("step", 1200.0)
        ('x=1200', 'step 1200')
    """
    return f"x={x:g}" if unit == "x" else f"{unit} {x:g}"


def last_lr_drop(lrs: Sequence[float], factor: float = 0.5, steady: float = 0.9) -> int | None:
    """Index of the first point after the last learning-rate drop, or None.

    A drop is a step change: the lr falls to ``factor`` of the previous one or less, after an lr
    that was steady (the one before changed by less than ``1 - steady``). The end of a cosine or
    OneCycle anneal also falls by more than half between the last points, but gradually, so it is
    not a drop: the curve it bends is still one curve.

    Example:
        >>> last_lr_drop([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
        4
        >>> last_lr_drop([0.1, 0.09, 0.08]) is None  # a gentle decay is not a drop
        True
        >>> last_lr_drop([1.0, 0.75, 0.43, 0.19, 0.05, 0.0]) is None  # a cosine anneal to zero is not either
        True
    """
    lr = [float(v) for v in lrs]
    for i in range(len(lr) - 1, 0, -1):
        before = lr[i - 1]
        was_steady = i == 1 or (lr[i - 2] > 0 and abs(before / lr[i - 2] - 1.0) <= 1.0 - steady)
        if before > 0 and lr[i] <= factor * before * (1 + 1e-6) and was_steady:
            return i
    return None


def mann_kendall_z(values: np.ndarray) -> float:
    """Mann-Kendall trend statistic: about N(0, 1) without a trend, positive when ``values`` rise.

    Example:
        >>> round(mann_kendall_z(np.array([1.0, 2, 3, 4, 5, 6])), 2)
        2.63
        >>> round(mann_kendall_z(np.array([3.0, 1, 2, 1, 3])), 2)
        0.0
    """
    values = np.asarray(values, float)
    if len(values) > 400:  # O(n^2) pairs: thin long curves evenly
        values = values[np.unique(np.linspace(0, len(values) - 1, 400).round().astype(int))]
    n = len(values)
    s = float(np.sum(np.triu(np.sign(values[None, :] - values[:, None]), 1)))
    return float((s - np.sign(s)) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18)) if n > 1 else 0.0


def wrong_way(oriented: np.ndarray) -> bool:
    """True when a curve (oriented: higher is better) ends worse than it started, with a clear trend.

    Both must hold: the mean of the last quarter below the median of the first tenth (at least 2
    points), and a Mann-Kendall trend the wrong way at the 5% level. A run that rose and then slid
    back (an overfitting loss, a long noisy decline after a fast rise) is still a curve to forecast.

    Example:
        >>> wrong_way(np.array([0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5]))
        True
        >>> wrong_way(np.array([0.1, 0.5, 0.6, 0.55, 0.5, 0.45]))  # rose, then slid back: still a curve
        False
    """
    start = float(np.median(oriented[:max(2, len(oriented) // 10)]))
    return float(np.mean(oriented[-max(2, len(oriented) // 4):])) < start and mann_kendall_z(oriented) < -1.96


def _schedule(x: np.ndarray, lr: np.ndarray | None, at: float, min_points: int, unit: str,
              notes: list[str]) -> tuple[int, list[str]]:
    """Where the fitted segment starts (after the last lr drop, if enough points follow it) and the
    reasons the lrs give to doubt the forecast; notes the drop it uses."""
    if lr is None or not np.all(np.isfinite(lr)):
        return 0, []
    start, reasons = 0, []
    if (drop := last_lr_drop(lr)) is not None:
        change = f"the learning rate dropped at {where(unit, x[drop])} ({lr[drop - 1]:.3g} -> {lr[drop]:.3g})"
        if len(x) - drop >= min_points:
            start = drop
            notes.append(f"{change}; fitting the {len(x) - drop} points since")
        else:
            reasons.append(f"{change}, {len(x) - drop} point(s) ago: the fit spans the drop until "
                           f"{min_points} points follow it")
    if lr.max() > 0 and lr[-1] <= 0.01 * lr.max() and at > x[-1]:
        reasons.append(f"the learning rate has annealed to {lr[-1] / lr.max():.2g} of its peak: past the end of this "
                       f"schedule the curve follows whatever schedule comes next")
    return start, reasons


def prepare(epochs: Sequence[float], values: Sequence[float], at: float, mode: str, lrs: Sequence[float] | None,
            level: float, min_points: int, metric: str,
            unit: str) -> tuple[np.ndarray, np.ndarray, int, list[str], list[str]]:
    """Check the inputs; return the finite points, where the fitted segment starts, notes, reasons.

    ``reasons`` (why the forecast will not be reliable) is filled here for an lr drop with too
    few points after it: the fit then spans the drop instead of refusing.
    """
    if mode not in ("max", "min"):
        raise ValueError(f'forecast: mode is {mode!r}; expected "max" (higher is better) or "min".')
    if not 0 < level < 1 or min_points < 4 or not math.isfinite(at):
        raise ValueError(f"forecast: need 0 < level < 1, min_points >= 4 and a finite `at`; "
                         f"got level={level}, min_points={min_points}, at={at}.")
    x_all, y_all = np.asarray(epochs, float).ravel(), np.asarray(values, float).ravel()
    if len(x_all) != len(y_all) or (lrs is not None and len(lrs) != len(y_all)):
        raise ValueError(f"forecast: got {len(x_all)} x values, {len(y_all)} values"
                         + (f", {len(lrs)} lrs" if lrs is not None else "") + "; expected one of each per point.")
    if len(y_all) and not np.isfinite(y_all[-1]):
        raise ForecastError(f"the last {metric} ({where(unit, x_all[-1])}) is {y_all[-1]}; "
                            f"a diverged run has no curve to extend.")
    keep = np.isfinite(y_all) & np.isfinite(x_all)
    x, y = x_all[keep], y_all[keep]
    notes = [f"skipped {int((~keep).sum())} non-finite point(s)"] if (~keep).any() else []
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"forecast: x values ({unit}) must be strictly increasing.")
    if len(y) < min_points:
        raise ForecastError(f"{len(y)} finite point(s); need at least {min_points}.")
    if np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())):
        raise ForecastError(f"{metric} is constant at {y[0]:.6g} over {len(y)} points; there is no trend to extend.")
    if wrong_way(y if mode == "max" else -y):
        better = "rise" if mode == "max" else "fall"
        raise ForecastError(f"{metric} moves the wrong way ({y[0]:.4g} -> {y[-1]:.4g}) while mode={mode!r} expects "
                            f"it to {better}; pass mode={'min' if mode == 'max' else 'max'!r} if that is the better "
                            f"direction.")
    lr = None if lrs is None else np.asarray(lrs, float)[keep]
    start, reasons = _schedule(x, lr, at, min_points, unit, notes)
    if at < x[start]:
        raise ForecastError(f"{where(unit, at)} lies before the fitted segment (from {where(unit, x[start])}).")
    return x, y, start, notes, reasons
