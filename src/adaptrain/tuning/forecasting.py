"""Learning-curve forecasting: where will this metric be at epoch N?

Six parametric families are fitted with :func:`scipy.optimize.curve_fit` (bounded, several starts,
on normalized data). Each is scored on the last 25% of points held back (fit the prefix, predict
the suffix), weighted by 1/error, refitted on all points and averaged. The interval is a weighted
mixture of each family's residual-bootstrap refits, plus one observation's noise and a term that
grows with the extrapolation horizon: it covers "which shape" as well as "which parameters".
With ``lrs``, the fit starts after the last learning-rate drop, which bends the curve.

Design: when the data cannot support a forecast (too few points, a constant curve, a trend the
wrong way for ``mode``, an interval wider than 3x the observed range because the families disagree,
too few points since an lr drop) :func:`forecast` raises :class:`ForecastError`, whose message
starts with ``"cannot forecast: "``; it never returns a forecast flagged as unreliable. So a caller
that acts on forecasts (stopping a run) needs to catch one exception, and acts only on real ones.

Example:
    >>> import numpy as np
    >>> epochs = np.arange(1, 21)
    >>> fc = forecast(epochs, 0.9 - 0.5 * epochs ** -0.8, at=50, mode="max")
    >>> abs(fc.value - (0.9 - 0.5 * 50 ** -0.8)) < 0.01 and fc.low <= fc.value <= fc.high
    True
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


class ForecastError(ValueError):
    """The data cannot support a forecast; the message starts with ``"cannot forecast: "``."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot forecast: {reason}")


@dataclass(frozen=True)
class Family:
    """A curve ``fn(x, *params)`` rising to an asymptote, fitted on x = 1, 2, ... and y scaled to [0, 1]."""

    name: str
    formula: str
    params: tuple[str, ...]
    fn: Callable[..., np.ndarray]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    starts: tuple[tuple[float, ...], ...]  # starting points, relative: "a" is added to the last value
    saturating: bool = True  # params[0] is the asymptote "a"


# Fits run on normalized data (x from 1, z rising from 0 to 1), so one set of bounds and starts fits
# every metric; the bounds keep exponents and asymptotes in a range where extrapolation stays sane.
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("power_law", "a - b*x^-c", ("a", "b", "c"), lambda x, a, b, c: a - b * x ** -c,
           (-1, 0, 1e-3), (10, 100, 4), ((0.2, 1, 0.5), (1.0, 1, 0.2), (0.05, 1, 1.5))),
    Family("logarithmic", "a - b/ln(x+1)", ("a", "b"), lambda x, a, b: a - b / np.log(x + 1.0),
           (-10, 0), (10, 100), ((0.3, 1),)),
    Family("log_linear", "a + b*ln(x)", ("a", "b"), lambda x, a, b: a + b * np.log(x),
           (-10, 0), (10, 100), ((-1.0, 0.3),), saturating=False),
    Family("exp_saturation", "a - b*exp(-c*x)", ("a", "b", "c"), lambda x, a, b, c: a - b * np.exp(-c * x),
           (-1, 0, 1e-3), (10, 1e3, 5), ((0.05, 1.5, 0.3), (0.3, 1, 0.05))),
    Family("mmf", "a - (a-b)/(1+(k*x)^d)", ("a", "b", "k", "d"),
           lambda x, a, b, k, d: a - (a - b) / (1.0 + (k * x) ** d),
           (-1, -10, 1e-4, 0.05), (10, 2, 10, 8), ((0.1, -0.5, 0.5, 1.0), (0.5, -1, 0.1, 0.7))),
    Family("janoschek", "a - (a-b)*exp(-k*x^d)", ("a", "b", "k", "d"),
           lambda x, a, b, k, d: a - (a - b) * np.exp(-k * x ** d),
           (-1, -10, 1e-4, 0.05), (10, 2, 10, 8), ((0.1, -0.3, 0.3, 0.8), (0.5, -1, 0.05, 1.0))),
]}


# Scales the interval's extrapolation term (held-out error x sqrt(horizon / held-out points)); set
# so the 90% interval covers ~90% of the seed-0 curves in benchmarks/forecast.py (seed 1 checks it).
HORIZON_WIDEN = 0.75
# Held-out errors below 1% of the observed range do not rank families (smooth curves fit many shapes).
ERROR_FLOOR = 0.01


@dataclass
class FamilyFit:
    """One family's fit on all points: params (normalized units), prediction, held-out error, weight."""

    name: str
    params: dict[str, float]
    prediction: float
    holdout_error: float  # RMSE on the held-back suffix, in the metric's units
    weight: float


@dataclass
class Forecast:
    """The forecast ``value`` of the metric at epoch ``at`` and its ``level`` interval [low, high]."""

    value: float
    low: float
    high: float
    at: float
    mode: str
    level: float
    families: dict[str, FamilyFit]
    epochs: list[float]
    values: list[float]
    segment_start: float  # first epoch of the fitted segment (after the last learning-rate drop)
    metric: str = "value"
    notes: list[str] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict, repr=False)  # x grid, band, family curves

    @property
    def optimistic(self) -> float:
        """The interval's optimistic end: ``high`` when higher is better, else ``low``."""
        return self.high if self.mode == "max" else self.low

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no curves)."""
        keys = ("value", "low", "high", "at", "mode", "level", "metric", "segment_start", "notes", "epochs", "values")
        return {**{k: getattr(self, k) for k in keys}, "families": {n: vars(f).copy() for n, f in self.families.items()}}

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: observed points, each family's fit, the combined forecast and its band."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

        if not self.curves:
            raise ValueError("Forecast.plot needs the curves that forecast() computes; this Forecast has none.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        c = self.curves
        ax.fill_between(c["x"], c["low"], c["high"], alpha=0.2, label=f"{self.level:.0%} band")
        for name, fit in self.families.items():
            ax.plot(c["x"], c[name], lw=0.8, ls="--", label=f"{name} (w={fit.weight:.2f})")
        ax.plot(c["x"], c["value"], color="k", lw=1.6, label="forecast")
        ax.plot(self.epochs, self.values, "o", ms=3, color="C3", label="observed")
        ax.errorbar([self.at], [self.value], [[max(0.0, self.value - self.low)], [max(0.0, self.high - self.value)]],
                    fmt="s", color="k", capsize=4)
        if self.segment_start > self.epochs[0]:
            ax.axvline(self.segment_start - 0.5, color="grey", ls=":", label="lr drop")
        ax.set(xlabel="epoch", ylabel=self.metric,
               title=f"{self.metric} at epoch {self.at:g}: {self.value:.4g} [{self.low:.4g}, {self.high:.4g}]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path


def last_lr_drop(lrs: Sequence[float], factor: float = 0.5) -> int | None:
    """Index of the first point after the last learning-rate drop (lr <= factor * previous lr), or None.

    Example:
        >>> last_lr_drop([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
        4
        >>> last_lr_drop([0.1, 0.09, 0.08]) is None  # a gentle decay is not a drop
        True
    """
    for i in range(len(lrs) - 1, 0, -1):
        if lrs[i - 1] > 0 and lrs[i] <= factor * lrs[i - 1]:
            return i
    return None


def mann_kendall_z(values: np.ndarray) -> float:
    """Mann-Kendall trend statistic: about N(0, 1) without a trend, positive when ``values`` rise.

    Example:
        >>> round(mann_kendall_z(np.array([1.0, 2, 3, 4, 5, 6])), 2), round(mann_kendall_z(np.array([3.0, 1, 2, 1, 3])), 2)
        (2.63, 0.0)
    """
    n = len(values)
    s = float(np.sum(np.triu(np.sign(values[None, :] - values[:, None]), 1)))
    return float((s - np.sign(s)) / math.sqrt(n * (n - 1) * (2 * n + 5) / 18)) if n > 1 else 0.0


def fit_family(family: Family, x: np.ndarray, z: np.ndarray, starts: Sequence[Sequence[float]],
               maxfev: int = 2000) -> np.ndarray | None:
    """Best least-squares params over ``starts`` (absolute), or None if every start fails."""
    from scipy.optimize import OptimizeWarning, curve_fit  # lazy: keeps `import adaptrain` fast

    lo, hi = np.array(family.lower, float), np.array(family.upper, float)
    best, best_sse = None, math.inf
    for p0 in starts:
        p0 = np.clip(np.asarray(p0, float), lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
        try:
            # OptimizeWarning only says the covariance is unknown (we never use it): the fit stands.
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(family.fn, x, z, p0=p0, bounds=(lo, hi), method="trf", maxfev=maxfev,
                                  ftol=1e-6, xtol=1e-6, gtol=1e-6)
        except (RuntimeError, ValueError, FloatingPointError):  # no convergence, or NaN in the model
            continue
        with np.errstate(all="ignore"):
            sse = float(np.sum((family.fn(x, *p) - z) ** 2))
        if np.isfinite(sse) and sse < best_sse:
            best, best_sse = p, sse
    return best


def _capped(family: Family, cap: float | None) -> Family:
    """``family`` with its asymptote ``a`` bounded by ``cap`` (normalized units); unbounded families unchanged."""
    if cap is None or not family.saturating:
        return family
    return replace(family, upper=(min(family.upper[0], cap),) + family.upper[1:])


def _starts(family: Family, z: np.ndarray) -> list[tuple[float, ...]]:
    return [(z[-1] + s[0],) + tuple(s[1:]) for s in family.starts]


def _wquantile(samples: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """Weighted quantile along axis 0 of ``samples`` (n, m) with ``weights`` (n,)."""
    order = np.argsort(samples, axis=0)
    cum = np.cumsum(weights[order], axis=0) / weights.sum()
    idx = np.minimum((cum < q).sum(axis=0), len(weights) - 1)
    return np.take_along_axis(samples, order, axis=0)[idx, np.arange(samples.shape[1])]


def forecast(epochs: Sequence[float], values: Sequence[float], at: float = 50, mode: str = "max", *,
             lrs: Sequence[float] | None = None, level: float = 0.9, holdout: float = 0.25,
             min_points: int = 5, n_boot: int = 100, limits: tuple[float | None, float | None] | None = None,
             families: Sequence[str] | None = None, metric: str = "value", seed: int = 0) -> Forecast:
    """Forecast ``values`` (one per epoch in ``epochs``) at epoch ``at``; see the module docstring.

    ``mode`` is "max" when higher is better, "min" otherwise. ``lrs`` (one lr per point) makes the
    fit start after the last learning-rate drop (a halving or more between two points). NaN values
    (epochs without validation) are skipped. ``limits`` (e.g. (0, 1) for accuracy) clips the
    forecast and caps the families' asymptotes. ``families`` picks a subset of :data:`FAMILIES`;
    ``holdout`` is the share of points held back to weight them; ``n_boot`` bootstrap refits per
    family (seeded by ``seed``) set the interval's precision. Raises :class:`ForecastError` when the
    data cannot support a forecast, ValueError for malformed arguments.

    Example:
        >>> fc = forecast([1, 2, 3, 4, 5, 6], [0.5, 0.7, 0.78, 0.82, 0.84, 0.85], at=20, limits=(0, 1))
        >>> 0.85 < fc.value <= 1.0
        True
    """
    x, y, start, notes = _segment(epochs, values, at, mode, lrs, level, min_points, metric)
    limits = None if limits is None or all(v is None for v in limits) else tuple(limits)
    names = list(families) if families is not None else list(FAMILIES)
    if unknown := sorted(set(names) - set(FAMILIES)):
        raise ValueError(f"forecast: unknown families {unknown}; known: {sorted(FAMILIES)}.")
    sign = 1.0 if mode == "max" else -1.0
    oriented = sign * y[start:]
    offset, scale = oriented.min(), float(np.ptp(oriented))
    xs, z = x[start:] - x[start] + 1.0, (oriented - offset) / scale  # each fit sees epochs 1, 2, ...
    best = None if limits is None else limits[1 if mode == "max" else 0]
    # A known limit (accuracy <= 1) also caps the asymptotes: no family may saturate beyond it.
    cap = None if best is None else max(1.0, (sign * best - offset) / scale)
    fams = {k: _capped(FAMILIES[k], cap) for k in names}
    fits, errors, n_hold = _fit_and_score(fams, xs, z, holdout)
    if not fits:
        raise ForecastError(f"no curve family could be fitted to the {len(z)} points.")
    n = len(z)
    # Noise floor: the best family's residual spread; held-out errors below it do not rank families either.
    noise = min(np.sqrt(np.sum((z - fams[k].fn(xs, *p)) ** 2) / max(1, n - len(p))) for k, p in fits.items())
    w = np.array([1.0 / max(errors[k], noise, ERROR_FLOOR) for k in fits])  # 1/err: a few points are weak evidence
    w = np.where(w / w.sum() < 0.02, 0.0, w)  # families that failed the held-out test get no say
    wts = dict(zip(fits, w / w.sum()))
    used = [k for k in fits if wts[k] > 0]
    at_x = at - x[start] + 1.0
    grid = np.unique(np.concatenate([np.linspace(1.0, max(at_x, xs[-1]), 120), [at_x]]))
    i_at = int(np.searchsorted(grid, at_x))
    with np.errstate(all="ignore"):
        curves_z = {k: fams[k].fn(grid, *fits[k]) for k in fits}
    value_z = sum(wts[k] * curves_z[k] for k in used)
    low_z, high_z = _band({k: fams[k] for k in used}, fits, wts, errors, xs, z, grid, n_hold, level, n_boot, seed)

    def to_y(v: np.ndarray) -> np.ndarray:
        out = sign * (offset + scale * np.asarray(v, float))
        return np.clip(out, *limits) if limits is not None else out

    lo_y, hi_y = np.minimum(to_y(low_z), to_y(high_z)), np.maximum(to_y(low_z), to_y(high_z))
    # The shapes (or one shape's params) disagree too much when the interval is wider than 3x the
    # whole curve's range (not the segment's: a flat segment after an lr drop may have a tiny one).
    if hi_y[i_at] - lo_y[i_at] > 3.0 * np.ptp(y):
        preds = ", ".join(f"{k} {to_y(curves_z[k][i_at]):.4g}" for k in used)
        raise ForecastError(f"at epoch {at:g} the {level:.0%} interval [{lo_y[i_at]:.4g}, {hi_y[i_at]:.4g}] spans over "
                            f"3x the observed range of {metric} (families: {preds}); forecast a nearer epoch or "
                            f"wait for more points.")
    # Average the families after clipping each to the limits: an unbounded family (log-linear) far
    # past the limit would otherwise drag the ensemble there even though it is clipped when shown.
    value_y = sum(wts[k] * to_y(curves_z[k]) for k in used) if limits is not None else to_y(value_z)
    curves = {"x": grid + x[start] - 1.0, "value": value_y, "low": lo_y, "high": hi_y}
    curves.update({k: to_y(c) for k, c in curves_z.items()})
    family_fits = {k: FamilyFit(k, dict(zip(fams[k].params, map(float, fits[k]))), float(curves[k][i_at]),
                                errors[k] * scale, float(wts[k])) for k in fits}
    if at > 3 * x[-1]:
        notes.append(f"epoch {at:g} is over 3x beyond the last observed epoch {x[-1]:g}: a long extrapolation")
    return Forecast(float(curves["value"][i_at]), float(lo_y[i_at]), float(hi_y[i_at]), float(at), mode, level,
                    family_fits, x.tolist(), y.tolist(), float(x[start]), metric, notes, curves)


def _segment(epochs: Sequence[float], values: Sequence[float], at: float, mode: str, lrs: Sequence[float] | None,
             level: float, min_points: int, metric: str) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """Check the inputs; return the finite points, the index where the fitted segment starts, notes."""
    if mode not in ("max", "min"):
        raise ValueError(f'forecast: mode is {mode!r}; expected "max" (higher is better) or "min".')
    if not 0 < level < 1 or min_points < 4 or not math.isfinite(at) or at <= 0:
        raise ValueError(f"forecast: need 0 < level < 1, min_points >= 4 and a positive epoch `at`; "
                         f"got level={level}, min_points={min_points}, at={at}.")
    x_all, y_all = np.asarray(epochs, float).ravel(), np.asarray(values, float).ravel()
    if len(x_all) != len(y_all) or (lrs is not None and len(lrs) != len(y_all)):
        raise ValueError(f"forecast: got {len(x_all)} epochs, {len(y_all)} values"
                         + (f", {len(lrs)} lrs" if lrs is not None else "") + "; expected one of each per point.")
    if len(y_all) and not np.isfinite(y_all[-1]):
        raise ForecastError(f"the last {metric} (epoch {x_all[-1]:g}) is {y_all[-1]}; a diverged run has no curve to extend.")
    keep = np.isfinite(y_all) & np.isfinite(x_all)
    x, y = x_all[keep], y_all[keep]
    notes = [f"skipped {int((~keep).sum())} non-finite point(s)"] if (~keep).any() else []
    if np.any(np.diff(x) <= 0):
        raise ValueError("forecast: epochs must be strictly increasing.")
    start, lr = 0, None if lrs is None else np.asarray(lrs, float)[keep]
    if lr is not None and (drop := last_lr_drop(lr)) is not None:
        start = drop
        notes.append(f"learning rate dropped at epoch {x[drop]:g} ({lr[drop - 1]:.3g} -> {lr[drop]:.3g}); "
                     f"fitting the {len(x) - drop} points since")
    seg = y[start:]
    if len(seg) < min_points:
        where = f" since the learning-rate drop at epoch {x[start]:g}" if start else ""
        raise ForecastError(f"{len(seg)} finite point(s){where}; need at least {min_points}.")
    if at < x[start]:
        raise ForecastError(f"epoch {at:g} lies before the fitted segment (from epoch {x[start]:g}).")
    if np.ptp(seg) <= 1e-12 * max(1.0, float(np.abs(seg).max())):
        raise ForecastError(f"{metric} is constant at {seg[0]:.6g} over {len(seg)} points; there is no trend to extend.")
    if mann_kendall_z(seg if mode == "max" else -seg) < -1.96:  # a significant trend the wrong way, not noise
        better = "rise" if mode == "max" else "fall"
        raise ForecastError(f"{metric} moves the wrong way ({seg[0]:.4g} -> {seg[-1]:.4g}) while mode={mode!r} expects "
                            f"it to {better}; pass mode={'min' if mode == 'max' else 'max'!r} if that is the better direction.")
    return x, y, start, notes


def _fit_and_score(fams: dict[str, Family], xs: np.ndarray, z: np.ndarray,
                   holdout: float) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
    """Fit each family on the prefix and score it (RMSE) on the held-back suffix, then refit on all."""
    n = len(z)
    n_hold = max(1, round(holdout * n))
    fits, errors = {}, {}
    for name, fam in fams.items():
        if n - n_hold < len(fam.params) + 1:  # too few points to score this family on the prefix
            continue
        pre = fit_family(fam, xs[:-n_hold], z[:-n_hold], _starts(fam, z[:-n_hold]))
        full = None if pre is None else fit_family(fam, xs, z, [pre] + _starts(fam, z)[:1])  # warm start
        if full is not None:
            errors[name] = float(np.sqrt(np.mean((fam.fn(xs[-n_hold:], *pre) - z[-n_hold:]) ** 2)))
            fits[name] = full
    return fits, errors, n_hold


def _band(fams: dict[str, Family], fits: dict[str, np.ndarray], wts: dict[str, float], errors: dict[str, float],
          xs: np.ndarray, z: np.ndarray, grid: np.ndarray, n_hold: int, level: float, n_boot: int,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` band on ``grid``: quantiles of a weighted mixture of each family's bootstrap fits."""
    rng = np.random.default_rng(seed)
    n = len(z)
    ens = sum(wts[k] * fams[k].fn(xs, *fits[k]) for k in fams)
    resid = (z - ens) - np.mean(z - ens)
    draws = [rng.integers(0, n, n) for _ in range(n_boot)]
    eps = resid[rng.integers(0, n, n_boot)] * math.sqrt(n / max(1, n - 3))  # one observation's noise
    # Beyond the data the shape may change: widen by the held-out error, growing with the horizon.
    horizon = np.sqrt(np.clip(grid - xs[-1], 0, None) / n_hold)
    spread = HORIZON_WIDEN * sum(wts[k] * errors[k] for k in fams) * horizon
    samples, weights = [], []
    for k, fam in fams.items():
        params = _refit_batch(fam, fits[k], xs, fam.fn(xs, *fits[k]) + resid[np.array(draws)])
        with np.errstate(all="ignore"):
            curves = fam.fn(grid[None, :], *(params[:, j:j + 1] for j in range(params.shape[1])))
        samples.append(curves + eps[:, None] + spread[None, :] * rng.standard_normal((n_boot, 1)))
        weights.append(np.full(n_boot, wts[k] / n_boot))
    s, sw = np.concatenate(samples), np.concatenate(weights)
    ok = np.all(np.isfinite(s), axis=1)
    return _wquantile(s[ok], sw[ok], (1 - level) / 2), _wquantile(s[ok], sw[ok], (1 + level) / 2)


def _refit_batch(fam: Family, p: np.ndarray, xs: np.ndarray, ys: np.ndarray, steps: int = 20) -> np.ndarray:
    """Refit ``fam`` to every row of ``ys`` at once: projected Levenberg-Marquardt warm-started at ``p``.

    The bootstrap needs dozens of refits per family; one vectorized solver costs about what a single
    curve_fit call does. Steps that raise the error are refused (and damped harder), row by row.
    """
    lo, hi = np.array(fam.lower, float), np.array(fam.upper, float)
    rows, k = ys.shape[0], len(p)
    P, lam = np.tile(p, (rows, 1)), np.full(rows, 1e-3)

    def model(params: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return fam.fn(xs[None, :], *(params[:, j:j + 1] for j in range(k)))

    F = model(P)
    sse = np.sum((ys - F) ** 2, axis=1)
    for _ in range(steps):
        h = 1e-6 * np.maximum(1.0, np.abs(P))
        h = np.where(P + h <= hi, h, -h)  # step inward at an upper bound
        J = np.stack([(model(P + h[:, j:j + 1] * (np.arange(k) == j)) - F) / h[:, j:j + 1] for j in range(k)], axis=2)
        A = np.einsum("rni,rnj->rij", J, J)
        A += lam[:, None, None] * (np.eye(k) * (np.diagonal(A, axis1=1, axis2=2)[:, :, None] + 1e-12))
        g = np.einsum("rni,rn->ri", J, ys - F)
        try:
            with np.errstate(all="ignore"):
                step = np.linalg.solve(A, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a degenerate row: keep the params reached so far
            break
        trial = np.clip(P + np.nan_to_num(step), lo, hi)
        F_trial = model(trial)
        sse_trial = np.sum((ys - F_trial) ** 2, axis=1)
        better = np.isfinite(sse_trial) & (sse_trial < sse)
        P[better], F[better], sse[better] = trial[better], F_trial[better], sse_trial[better]
        lam = np.where(better, lam / 3, lam * 4)
    return P


def forecast_history_file(path: str | Path, metric: str, at: float, mode: str | None = None,
                          plot: str | Path | None = None) -> Forecast:
    """Forecast ``metric`` from a run's ``history.csv`` (columns ``epoch``, the metric, optional ``lr``).

    ``mode`` defaults to "min" for names containing "loss", else "max"; accuracies in [0, 1] are
    clipped to that range. Rows with an empty metric cell are skipped. Writes ``plot`` if given.

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
    limits = (0.0, 1.0) if "acc" in metric.lower() and values and 0 <= min(values) and max(values) <= 1 else None
    fc = forecast(epochs, values, at=at, mode=mode, lrs=lrs, limits=limits, metric=metric)
    if plot is not None:
        fc.plot(plot)
    return fc
