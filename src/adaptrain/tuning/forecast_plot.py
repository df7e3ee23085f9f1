"""The forecast plot: seen points, the fitted curve, the forecast with its band, the truth if known."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adaptrain.tuning.forecast_checks import where

if TYPE_CHECKING:
    from adaptrain.tuning.forecasting import Forecast


def plot_forecast(fc: Forecast, path: str | Path, truth: Any = None) -> Path:
    """Write ``fc`` as a PNG at ``path`` (folders created); see :meth:`Forecast.plot`.

    ``truth``: the real value at ``fc.at`` (a number) or the points after the forecast, ``(xs, values)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

    if not fc.curves:
        raise ValueError("Forecast.plot needs the curves that forecast() computes; this Forecast has none.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7.5, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    c = fc.curves
    x = np.asarray(c["x"])
    future = np.isfinite(c["low"])
    ax.fill_between(x[future], c["low"][future], c["high"][future], color="C0", alpha=0.18,
                    label=f"{fc.level:.0%} interval")
    for name, fit in sorted(fc.families.items(), key=lambda kv: -kv[1].weight)[:4]:  # the four that count most
        shown = x >= c["starts"][name] - 1e-9 * max(1.0, abs(x[-1]))
        ax.plot(x[shown], c[name][shown], lw=0.7, ls="--", alpha=0.8, label=f"{name} (w={fit.weight:.2f})")
    seen = x <= fc.epochs[-1] + 1e-9 * max(1.0, abs(x[-1]))
    ax.plot(x[seen], c["value"][seen], color="k", lw=1.4, label="fitted")
    ax.plot(x[~seen], c["value"][~seen], color="k", lw=1.4, ls=(0, (4, 2)), label="forecast")
    ax.plot(fc.epochs, fc.values, "o", ms=2.5, color="C3", label="seen")
    ax.errorbar([fc.at], [fc.value], [[max(0.0, fc.value - fc.low)], [max(0.0, fc.high - fc.value)]],
                fmt="s", color="k", capsize=4, ms=5)
    if truth is not None:
        if np.ndim(truth) == 0:
            ax.plot([fc.at], [float(truth)], "*", ms=12, color="C2", label="truth")
        else:
            tx, ty = (np.asarray(t, float) for t in truth)
            ax.plot(tx, ty, ".", ms=2.5, color="C2", label="truth")
    if fc.segment_start > fc.epochs[0]:
        ax.axvline(fc.segment_start, color="grey", ls=":", label="lr drop")
    flag = "" if fc.reliable else "  (unreliable)"
    ax.set(xlabel=fc.unit, ylabel=fc.metric,
           title=f"{fc.metric} at {where(fc.unit, fc.at)}: {fc.value:.4g} [{fc.low:.4g}, {fc.high:.4g}]{flag}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
