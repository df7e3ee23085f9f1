"""The candidate curves behind :func:`adaptrain.forecast`, fitted in normalized units.

Every member sees ``u`` (x divided by the last seen x, measured from the segment's origin, so
u = 1 at the last point and a forecast does not depend on the unit of x) and ``z`` (the metric
oriented so that higher is better and scaled to the seen range, so 0..1). Two kinds:

- global families ``a + b*phi(u; theta)`` (power law, exponential saturation, log-linear, MMF,
  Janoschek). ``a`` and ``b`` are solved exactly for every ``theta`` on a fixed grid (variable
  projection): the best grid point is a global fit, deterministic, and costs one vectorized
  least-squares pass, about what one ``curve_fit`` call costs. ``b >= 0``: the curve never gets
  worse. Points are weighted by ``u`` so the end of the curve, which the forecast extends, counts
  most;
- local members that look only at the end of the curve: the last value, the recent level, and the
  recent trend damped like a power law (exponent 1 or 2). On curves that have flattened or are
  mostly noise, these beat every global shape.

Example:
    >>> import numpy as np
    >>> u = np.linspace(0.1, 1.0, 10)
    >>> fit = MEMBERS["power_law"].fit(u, 1 - 0.2 * u ** -0.5)
    >>> abs(float(fit.predict(np.array([2.0]))[0]) - (1 - 0.2 * 2 ** -0.5)) < 0.002  # extrapolated to u = 2
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

_C_POWER = np.logspace(-2, math.log10(4.0), 120)  # exponents: 0.01 (nearly log) .. 4
_C_EXP = np.logspace(-1, 2.5, 120)  # rates per unit u: from barely bending to saturated at u = 0.02
_K, _D = (g.ravel() for g in np.meshgrid(np.logspace(-1.5, 2.5, 25), np.logspace(-1, 0.9, 16)))
_MOST_POINTS = 1000  # global shapes are fitted to at most this many points


@dataclass
class MemberFit:
    """One member fitted to (u, z): ``predict(u)`` in z units, its parameters, and ``start``.

    ``start`` is the first u the member describes (local members ignore earlier points); the plot
    draws it from there.
    """

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    params: dict[str, float] = field(default_factory=dict)
    start: float = 0.0


@dataclass(frozen=True)
class Member:
    """A candidate curve: ``fit(u, z, cap)`` returns a :class:`MemberFit`; ``cap`` bounds an asymptote."""

    name: str
    formula: str
    fit: Callable[..., MemberFit]
    n_params: int = 0  # free parameters of a global family (0: a local member, fitted to the end only)


def _grid_fit(name: str, basis: Callable[[np.ndarray], np.ndarray], thetas: dict[str, np.ndarray],
              saturating: bool) -> Callable[..., MemberFit]:
    """A variable-projection fitter for ``a + b*basis(u)[j]`` over the rows j of the theta grid."""

    def fit(u: np.ndarray, z: np.ndarray, cap: float | None = None) -> MemberFit:
        if len(u) > _MOST_POINTS:  # a step-level log: evenly thinned, the grid costs grid x points
            keep = np.unique(np.linspace(0, len(u) - 1, _MOST_POINTS).round().astype(int))
            u, z = u[keep], z[keep]
        with np.errstate(all="ignore"):
            phi = basis(u)  # (grid, n)
        w = u / u.sum()  # recency: a point at the end weighs 1/u_first times one at the start
        pm, zm = phi @ w, float(z @ w)
        dp = phi - pm[:, None]
        var, cov = (dp ** 2) @ w, dp @ (w * (z - zm))
        b = np.maximum(np.where(var > 1e-15, cov / np.where(var > 1e-15, var, 1.0), 0.0), 0.0)
        a = zm - b * pm
        if cap is not None and saturating:  # the asymptote a may not pass a known limit (accuracy <= 1)
            over = a > cap
            num, den = (phi * (z - cap)) @ w, (phi ** 2) @ w
            b = np.where(over, np.maximum(num / np.where(den > 0, den, 1.0), 0.0), b)
            a = np.where(over, cap, a)
        with np.errstate(all="ignore"):
            sse = ((z - a[:, None] - b[:, None] * phi) ** 2) @ w
        j = int(np.argmin(np.where(np.isfinite(sse), sse, np.inf)))
        aj, bj = float(a[j]), float(b[j])
        params = {"a": aj, "b": bj, **{k: float(v[j]) for k, v in thetas.items()}}

        def predict(x: np.ndarray) -> np.ndarray:
            with np.errstate(all="ignore"):
                return aj + bj * basis(np.asarray(x, float))[j]

        return MemberFit(name, predict, params, 0.0)

    return fit


def _window(n: int, share: float, least: int) -> int:
    return min(n, max(least, int(round(share * n))))


def _last(u: np.ndarray, z: np.ndarray, cap: float | None = None) -> MemberFit:
    value = float(z[-1])
    return MemberFit("last", lambda x: np.full(np.shape(x), value), {"a": value}, float(u[-1]))


def _level(u: np.ndarray, z: np.ndarray, cap: float | None = None) -> MemberFit:
    m = _window(len(z), 0.15, 2)  # ~15% of the points: averages noise, lags a rising curve a little
    value = float(np.mean(z[-m:]))
    return MemberFit("level", lambda x: np.full(np.shape(x), value), {"a": value}, float(u[-m]))


def _damped(c: float, name: str) -> Callable[..., MemberFit]:
    """Recent level and slope (a line through the last 30% of points), the slope decaying as u^-(c+1)."""

    def fit(u: np.ndarray, z: np.ndarray, cap: float | None = None) -> MemberFit:
        m = _window(len(z), 0.3, 3)
        us, zs = u[-m:], z[-m:]
        slope, intercept = np.polyfit(us, zs, 1) if np.ptp(us) > 0 else (0.0, float(zs.mean()))
        end, slope = float(intercept + slope * us[-1]), max(float(slope), 0.0)  # never a trend the wrong way

        def predict(x: np.ndarray) -> np.ndarray:
            ratio = np.maximum(np.asarray(x, float), 1e-12) / us[-1]
            # a power law a - b*u^-c with this slope at the end gains slope*u_end*(1 - ratio^-c)/c;
            # before the end the member is its line
            ahead = end + slope * us[-1] * (1.0 - ratio ** -c) / c
            return np.where(ratio >= 1.0, ahead, end + slope * (np.asarray(x, float) - us[-1]))

        return MemberFit(name, predict, {"level": end, "slope": slope, "c": c}, float(us[0]))

    return fit


MEMBERS: dict[str, Member] = {m.name: m for m in [
    Member("power_law", "a - b*u^-c", _grid_fit("power_law", lambda u: -u[None, :] ** -_C_POWER[:, None],
                                                {"c": _C_POWER}, True), 3),
    Member("exp_saturation", "a - b*exp(-c*u)", _grid_fit(
        "exp_saturation", lambda u: -np.exp(-_C_EXP[:, None] * u[None, :]), {"c": _C_EXP}, True), 3),
    Member("log_linear", "a + b*ln(u)", _grid_fit("log_linear", lambda u: np.log(u)[None, :], {}, False), 2),
    Member("mmf", "a - b/(1 + (k*u)^d)", _grid_fit(
        "mmf", lambda u: -1.0 / (1.0 + (_K[:, None] * u[None, :]) ** _D[:, None]), {"k": _K, "d": _D}, True), 4),
    Member("janoschek", "a - b*exp(-k*u^d)", _grid_fit(
        "janoschek", lambda u: -np.exp(-_K[:, None] * u[None, :] ** _D[:, None]), {"k": _K, "d": _D}, True), 4),
    Member("last", "the last value", _last),
    Member("level", "mean of the last 15% of points", _level),
    Member("damped_trend", "recent trend, decaying as u^-2", _damped(1.0, "damped_trend")),
    Member("damped_trend_fast", "recent trend, decaying as u^-3", _damped(2.0, "damped_trend_fast")),
]}


def theil_sen(u: np.ndarray, z: np.ndarray, most: int = 400) -> float:
    """Median of the pairwise slopes: a trend that a few outliers cannot move.

    Example:
        >>> round(theil_sen(np.arange(6.0), np.array([0, 1, 2, 30, 4, 5.0])), 6)
        1.0
    """
    if len(u) > most:  # O(n^2) pairs: thin long curves evenly
        keep = np.unique(np.linspace(0, len(u) - 1, most).round().astype(int))
        u, z = u[keep], z[keep]
    i, j = np.triu_indices(len(u), 1)
    du = u[j] - u[i]
    ok = du > 0
    return float(np.median((z[j] - z[i])[ok] / du[ok])) if ok.any() else 0.0


def noise_sd(z: np.ndarray) -> float:
    """Point-to-point noise: the robust spread of successive differences / sqrt(2).

    Runs of repeated values (a logger that repeats the last evaluation) count once: otherwise the
    many zero differences would say the curve has no noise at all.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> 0.07 < noise_sd(np.linspace(0, 1, 400) + rng.normal(0, 0.1, 400)) < 0.13
        True
    """
    z = np.asarray(z, float)
    z = z[np.concatenate([[True], np.diff(z) != 0])]
    d = np.diff(z)
    if len(d) < 3:
        return float(np.std(z))
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2))
