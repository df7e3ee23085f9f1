"""Learning-curve forecasting: where will this metric be at x = N (an epoch, a step)?

How (``adaptrain/tuning/curve_fits.py`` has the candidate curves):

1. x is measured from the segment's origin (0, or the last point before a learning-rate drop)
   and divided by the last seen x; the metric is oriented (higher is better) and scaled to its
   seen range. Everything below works in these units, so the forecast is the same whether x
   counts epochs or steps (x -> k*x with ``at`` scaled gives the same answer).
2. Nine candidates are fitted: five global shapes (power law, exponential saturation,
   log-linear, MMF, Janoschek) and four that look only at the end of the curve (last value,
   recent level, recent trend damped like a power law with exponent 1 or 2).
3. Backtests weight them: each is refitted on the first 40/55/70/85% of the seen points and
   scored on how well it predicts the level at the end of the seen points. Weights are 1/error,
   with errors below the noise (or 2% of the range) counted as a tie.
4. The interval runs between two scenarios: pessimistic, the curve stalls now (recent level, or
   continues a recent decline) minus the noise; optimistic, it keeps its recent slope (plus its
   standard errors) decaying like a power law with exponent 0.5, and at least a floor above the
   forecast that grows with the log of the horizon, plus the noise (:class:`IntervalRule`). The
   multipliers were chosen on two thirds of 23 public learning curves and checked on the rest
   (``benchmarks/forecast.py --tune``; figures in ``benchmarks/README.md``).

It refuses (:class:`ForecastError`, message starting with ``"cannot forecast: "``) only when
there is nothing to extend: too few points, a constant curve, one that clearly moves the wrong
way for ``mode``, or a diverged last value. Every other case gets a forecast whose ``reliable``
says whether to act on it, with ``reasons`` when not (few points, an interval wider than the
observed range, a learning-rate drop with too few points after it, a forecast past the end of an
annealed schedule).

Example:
    >>> import numpy as np
    >>> epochs = np.arange(1, 21)
    >>> fc = forecast(epochs, 0.9 - 0.5 * epochs ** -0.8, at=50, mode="max")
    >>> abs(fc.value - (0.9 - 0.5 * 50 ** -0.8)) < 0.01 and fc.low <= fc.value <= fc.high and fc.reliable
    True
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from adaptrain.tuning.curve_fits import MEMBERS, MemberFit, noise_sd, theil_sen
from adaptrain.tuning.forecast_checks import ForecastError, last_lr_drop, mann_kendall_z, prepare, where

__all__ = ["Forecast", "ForecastError", "FamilyFit", "IntervalRule", "FAMILIES", "forecast",
           "forecast_history_file", "default_limits", "last_lr_drop", "mann_kendall_z"]

FAMILIES = MEMBERS  # the candidate curves by name (kept under the old name)
BACKTEST_ORIGINS = (0.4, 0.55, 0.7, 0.85)  # shares of the seen points each candidate is refitted on
ERROR_FLOOR = 0.02  # backtest errors below 2% of the seen range do not rank candidates
MIN_WEIGHT = 0.02  # candidates whose share of the weight falls below this get none: they failed the backtest
# No candidate may predict beyond these, in units of the seen range (0 = its worst, 1 = its best seen
# value): a steep sigmoid fitted to a bend can run off to +-1e4. Real curves on the benchmark went
# at most 3.4 seen ranges further (a run that kept rising long after 25% of it was seen).
Z_RANGE = (-1.0, 6.0)
RELIABLE_POINTS = 8  # fewer points in the fitted segment: the forecast is flagged unreliable


@dataclass(frozen=True)
class IntervalRule:
    """The interval's multipliers, for a 90% interval (other levels scale them by the normal quantile).

    ``up_noise``/``down_noise``: noise standard deviations added above/below; ``up_slope``/
    ``down_slope``: standard errors of the recent slope added to the optimistic/pessimistic trend;
    ``damping``: the optimistic trend decays like a power law with this exponent; ``window``: share
    of the points (at least 5) the recent slope is measured on; ``floor``: the optimistic end lies
    at least this many seen ranges per e-fold of the remaining horizon above the forecast (runs
    often end better than their seen points suggest: an lr anneal, a warm-down, a late switch of
    augmentation); ``noise_floor`` adds this many noise standard deviations per e-fold to that
    floor (annealing the lr removes the noise it caused, which often lifts the curve).
    """

    up_noise: float = 1.0
    down_noise: float = 2.0
    up_slope: float = 3.0
    down_slope: float = 0.0
    damping: float = 0.5
    window: float = 0.33
    floor: float = 0.1
    noise_floor: float = 4.0


RULE = IntervalRule()


@dataclass
class FamilyFit:
    """One candidate: its params (normalized units), prediction at ``at``, backtest error, weight."""

    name: str
    params: dict[str, float]
    prediction: float
    holdout_error: float  # RMS backtest error, in the metric's units
    weight: float
    formula: str = ""


@dataclass
class Forecast:
    """The forecast ``value`` of the metric at x = ``at`` and its ``level`` interval [low, high].

    ``epochs``/``values`` are the finite points seen (x may be steps: see ``unit``).
    ``reliable`` is False when the data cannot back the forecast firmly; ``reasons`` say why.
    """

    value: float
    low: float
    high: float
    at: float
    mode: str
    level: float
    families: dict[str, FamilyFit]
    epochs: list[float]
    values: list[float]
    segment_start: float  # first x of the fitted segment (after the last learning-rate drop)
    metric: str = "value"
    notes: list[str] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict, repr=False)  # x grid, band, candidate curves
    reliable: bool = True
    reasons: list[str] = field(default_factory=list)
    unit: str = "x"

    @property
    def optimistic(self) -> float:
        """The interval's optimistic end: ``high`` when higher is better, else ``low``."""
        return self.high if self.mode == "max" else self.low

    @property
    def width(self) -> float:
        """``high - low``, in the metric's units."""
        return self.high - self.low

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no curves)."""
        keys = ("value", "low", "high", "at", "mode", "level", "metric", "segment_start", "notes", "epochs",
                "values", "reliable", "reasons", "unit")
        return {**{k: getattr(self, k) for k in keys}, "width": self.width,
                "families": {n: vars(f).copy() for n, f in self.families.items()}}

    def plot(self, path: str | Path, truth: Any = None) -> Path:
        """Write a PNG: seen points, fitted curve, forecast with its band, and ``truth`` if given.

        ``truth`` is the real value at ``at`` (a number) or the later points as ``(xs, values)``.
        """
        from adaptrain.tuning.forecast_plot import plot_forecast  # lazy: matplotlib

        return plot_forecast(self, path, truth)


def forecast(epochs: Sequence[float], values: Sequence[float], at: float = 50, mode: str = "max", *,
             lrs: Sequence[float] | None = None, level: float = 0.9, min_points: int = 5,
             limits: tuple[float | None, float | None] | None = None, families: Sequence[str] | None = None,
             metric: str = "value", unit: str = "x", rule: IntervalRule | None = None) -> Forecast:
    """Forecast ``values`` (one per x in ``epochs``: epochs or steps) at x = ``at``; see the module docstring.

    ``mode`` is "max" when higher is better, "min" otherwise. ``lrs`` (one lr per point) makes the
    fit start after the last learning-rate drop (a halving or more after a steady lr; the end of a
    cosine or OneCycle anneal is not a drop). NaN values (no validation that epoch) are skipped.
    ``limits`` (e.g. (0, 1) for accuracy) clips the forecast and caps the asymptotes. ``families``
    picks a subset of :data:`FAMILIES`. ``unit`` names x in messages ("epoch", "step").
    Raises :class:`ForecastError` when there is no curve to extend, ValueError for malformed
    arguments.

    Example:
        >>> fc = forecast([1, 2, 3, 4, 5, 6], [0.5, 0.7, 0.78, 0.82, 0.84, 0.85], at=20, limits=(0, 1))
        >>> 0.85 < fc.value <= 1.0, fc.reliable, fc.reasons[0]
        (True, False, 'only 6 points in the fitted segment (8 or more back a firm forecast)')
    """
    rule = rule or RULE
    names = list(families) if families is not None else list(FAMILIES)
    if unknown := sorted(set(names) - set(FAMILIES)):
        raise ValueError(f"forecast: unknown families {unknown}; known: {sorted(FAMILIES)}.")
    x, y, start, notes, reasons = prepare(epochs, values, at, mode, lrs, level, min_points, metric, unit)
    if len(x) - start < RELIABLE_POINTS:
        reasons.insert(0, f"only {len(x) - start} points in the fitted segment ({RELIABLE_POINTS} or more back a "
                          f"firm forecast)")
    limits = None if limits is None or all(v is None for v in limits) else tuple(limits)
    sign = 1.0 if mode == "max" else -1.0
    seg_y = sign * y[start:]
    offset = float(seg_y.min())
    scale = float(np.ptp(seg_y)) or float(np.ptp(y))  # a flat segment after an lr drop: the whole range
    z = (seg_y - offset) / scale
    origin = _origin(x, start)
    span = x[-1] - origin
    u, ua = (x[start:] - origin) / span, (at - origin) / span
    best = None if limits is None else limits[1 if mode == "max" else 0]
    cap = None if best is None else (sign * best - offset) / scale

    fits, errors = _fit_and_backtest(names, u, z, cap)
    sigma = _noise(u, z, fits)
    floor = max(ERROR_FLOOR, sigma / math.sqrt(_target_points(len(z))))
    raw = np.array([1.0 / max(errors[k], floor) for k in fits])
    raw = np.where(raw / raw.sum() < MIN_WEIGHT, 0.0, raw)
    wts = dict(zip(fits, raw / raw.sum()))

    grid = np.unique(np.concatenate([np.linspace(min(u[0], 1.0), max(ua, 1.0), 160), [ua, 1.0]]))
    i_at = int(np.searchsorted(grid, ua))
    lo_lim = -np.inf if limits is None or limits[0] is None else float(limits[0])
    hi_lim = np.inf if limits is None or limits[1] is None else float(limits[1])

    def to_y(v: np.ndarray) -> np.ndarray:
        return np.clip(sign * (offset + scale * np.clip(np.asarray(v, float), *Z_RANGE)), lo_lim, hi_lim)

    # Average the candidates after clipping each to the limits: a log-linear fit far past 1.0 would
    # otherwise drag the ensemble there even though it is clipped when shown.
    clipped = {k: to_y(f.predict(grid)) for k, f in fits.items()}
    value_y = _ensemble(fits, wts, clipped, grid)
    stretch = NormalDist().inv_cdf((1 + level) / 2) / NormalDist().inv_cdf(0.95)
    ends = [to_y(b) for b in _band(u, z, (sign * value_y - offset) / scale, grid, sigma, rule, stretch)]
    future = grid >= min(1.0, ua) - 1e-12  # the band is drawn from the last point on (or from `at` before it)
    lo_y = np.where(future, np.fmin(np.fmin(*ends), value_y), np.nan)
    hi_y = np.where(future, np.fmax(np.fmax(*ends), value_y), np.nan)
    xs_grid = origin + span * grid
    curves = {"x": xs_grid, "value": value_y, "low": lo_y, "high": hi_y, **clipped,
              "starts": {k: origin + span * f.start for k, f in fits.items()}}
    family_fits = {k: FamilyFit(k, f.params, float(clipped[k][i_at]), errors[k] * scale, float(wts[k]),
                                FAMILIES[k].formula) for k, f in fits.items()}
    value, low, high = float(value_y[i_at]), float(lo_y[i_at]), float(hi_y[i_at])
    if high - low > np.ptp(y):
        reasons.append(f"the {level:.0%} interval [{low:.4g}, {high:.4g}] is wider than the observed range of "
                       f"{metric} ({np.ptp(y):.4g})")
    if ua > 4:
        notes.append(f"{where(unit, at)} is over 4x as far from the start as the last point "
                     f"({where(unit, x[-1])}): a long extrapolation")
    return Forecast(value, low, high, float(at), mode, level, family_fits, x.tolist(), y.tolist(), float(x[start]),
                    metric, notes, curves, not reasons, reasons, unit)


def _origin(x: np.ndarray, start: int) -> float:
    """Where x counts from: 0 (or one step before a first x <= 0), or the last point before an lr drop."""
    if start > 0:
        return float(x[start - 1])
    return 0.0 if x[0] > 0 else float(x[0] - (x[1] - x[0]))


def _noise(u: np.ndarray, z: np.ndarray, fits: dict[str, MemberFit]) -> float:
    """The noise of one point: the smaller of the point-to-point spread (over the last half) and the
    best global shape's residual spread. Successive differences overstate the noise of a curve that
    still bends fast (few points); residuals overstate it where no shape fits (a hump)."""
    spread = noise_sd(z[-max(6, len(z) // 2):])
    for name, fit in fits.items():
        k = FAMILIES[name].n_params
        if k and len(z) > k:
            spread = min(spread, float(np.sqrt(np.sum((fit.predict(u) - z) ** 2) / (len(z) - k))))
    return spread


def _target_points(n: int) -> int:
    return max(1, int(round(0.1 * n)))


def _fit_and_backtest(names: list[str], u: np.ndarray, z: np.ndarray,
                      cap: float | None) -> tuple[dict[str, MemberFit], dict[str, float]]:
    """Fit each candidate on all points; its RMS error predicting the end level from earlier prefixes."""
    n = len(z)
    target = float(np.mean(z[-_target_points(n):]))
    prefixes = [p for p in (int(round(f * n)) for f in BACKTEST_ORIGINS) if p >= 4] or [n - 1]
    fits, errors = {}, {}
    for name in names:
        member = FAMILIES[name]
        with np.errstate(all="ignore"):
            early = [float(member.fit(u[:p], z[:p], cap).predict(u[-1:])[0]) for p in prefixes]
        err = float(np.sqrt(np.mean((np.array(early) - target) ** 2)))
        fit = member.fit(u, z, cap)
        if np.isfinite(err) and np.all(np.isfinite(fit.predict(np.array([1.0])))):
            fits[name], errors[name] = fit, err
    if not fits:
        raise ForecastError(f"no curve family could be fitted to the {n} points.")
    return fits, errors


def _ensemble(fits: dict[str, MemberFit], wts: dict[str, float], member_z: dict[str, np.ndarray],
              grid: np.ndarray) -> np.ndarray:
    """Weighted mean of the candidates along the grid; before a local candidate's window it has no say."""
    total, weight = np.zeros_like(grid), np.zeros_like(grid)
    for k, f in fits.items():
        active = (grid >= f.start - 1e-12) & np.isfinite(member_z[k])
        total += np.where(active, wts[k] * np.nan_to_num(member_z[k]), 0.0)
        weight += np.where(active, wts[k], 0.0)
    return np.where(weight > 0, total / np.where(weight > 0, weight, 1.0), np.nan)


def _band(u: np.ndarray, z: np.ndarray, value: np.ndarray, grid: np.ndarray, sigma: float, rule: IntervalRule,
          stretch: float) -> tuple[np.ndarray, np.ndarray]:
    """The interval along ``grid`` (normalized units): pessimistic and optimistic scenarios +- noise."""
    n = len(z)
    m = min(n, max(5, int(round(rule.window * n))))
    us, zs = u[-m:], z[-m:]
    slope = theil_sen(us, zs)
    se = sigma * math.sqrt(12.0 / m) / max(float(np.ptp(us)), 1e-12)  # a least-squares slope's standard error
    level = float(np.mean(z[-min(n, max(2, int(round(0.15 * n)))):]))
    ratio = np.maximum(grid, 1.0)
    c = rule.damping
    gain = np.log(ratio) if c == 0 else (1.0 - ratio ** -c) / c  # of a unit slope at u = 1, decaying as u^-(c+1)
    up = level + (max(slope, 0.0) + stretch * rule.up_slope * se) * gain
    down = level + (min(slope, 0.0) - stretch * rule.down_slope * se) * gain
    value = np.where(np.isfinite(value), value, level)
    floor = (rule.floor + rule.noise_floor * sigma) * np.log(ratio)
    high = np.maximum(value + stretch * floor, up) + stretch * rule.up_noise * sigma
    low = np.minimum(value, down) - stretch * rule.down_noise * sigma
    return low, high


def default_limits(metric: str, values: Sequence[float]) -> tuple[float | None, float | None] | None:
    """Limits a metric cannot pass, guessed from its name: (0, 1) for accuracies seen in [0, 1],
    (0, None) for losses never seen below 0, else None.

    Example:
        >>> default_limits("val_acc", [0.5, 0.9]), default_limits("val_loss", [2.0, 0.3])
        ((0.0, 1.0), (0.0, None))
        >>> default_limits("val_acc", [50.0, 91.5]) is None  # a percentage: no known limit
        True
    """
    seen = [float(v) for v in values if math.isfinite(float(v))]
    if not seen:
        return None
    if "acc" in metric.lower() and 0 <= min(seen) and max(seen) <= 1:
        return (0.0, 1.0)
    if "loss" in metric.lower() and min(seen) >= 0:
        return (0.0, None)
    return None


def forecast_history_file(path: str | Path, metric: str, at: float, mode: str | None = None,
                          plot: str | Path | None = None) -> Forecast:
    """Forecast ``metric`` from a run's ``history.csv`` (columns ``epoch``, the metric, optional ``lr``).

    ``mode`` defaults to "min" for names containing "loss", else "max"; accuracies in [0, 1] are
    clipped to that range, losses that are never negative at 0 (:func:`default_limits`). Rows with
    an empty metric cell are skipped. Writes ``plot`` if given.

    Example:
        >>> fc = forecast_history_file("runs/mnist1d/history.csv", "val_acc", at=50)  # doctest: +SKIP
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0]) if rows else []
    for needed in ("epoch", metric):
        if needed not in columns:
            raise ForecastError(f"{path} has no column {needed!r}; columns: {', '.join(columns) or '(none)'}.")
    rows = [r for r in rows if (r.get(metric) or "").strip()]  # empty cell: no validation that epoch
    try:
        epochs, values = [float(r["epoch"]) for r in rows], [float(r[metric]) for r in rows]
        lrs = [float(r["lr"]) for r in rows] if rows and all((r.get("lr") or "").strip() for r in rows) else None
    except ValueError as error:
        raise ValueError(f"{path}: a cell of epoch, {metric} or lr is not a number ({error}).") from None
    mode = mode or ("min" if "loss" in metric.lower() else "max")
    fc = forecast(epochs, values, at=at, mode=mode, lrs=lrs, limits=default_limits(metric, values), metric=metric,
                  unit="epoch")
    if plot is not None:
        fc.plot(plot)
    return fc
