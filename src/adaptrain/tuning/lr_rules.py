"""The LR finder's rules: the exponential sweep, the smoothing, when to stop, and what to suggest.

Pure (numbers in, numbers out); the sweep that runs real optimizer steps is
:mod:`adaptrain.core.lr_finder`. The method is Leslie Smith's LR range test (2015, "Cyclical
Learning Rates for Training Neural Networks") as fastai's ``lr_find`` and Lightning's
``LearningRateFinder`` run it: train from a snapshot for a few hundred steps while the LR grows
exponentially from ``min_lr`` to ``max_lr``, record the loss of each step, stop once it diverges,
and read a learning rate off the smoothed curve.

* :func:`sweep_lr`: step ``i`` of ``n`` uses ``min_lr * (max_lr / min_lr) ** (i / (n - 1))``: equal
  steps in log(lr), so every decade gets the same number of steps (a linear sweep would spend
  nine tenths of them in the last decade).
* :class:`SweepTracker`: the stop rule, as both peers: the bias-corrected exponential moving average
  of the losses (:func:`smooth`; one mini-batch's loss is too noisy to compare) rising above
  ``stop_factor`` (4) times its best so far, or a NaN/Inf loss. Past that point the weights are
  ruined and the rest of the sweep would only cost time. It must be causal: it sees only the past.
* :func:`read_curve`: the curve the rules read once the sweep is over, a *centred* average, which,
  unlike the causal one, does not lag behind the losses (the peers read the lagging one).
* :func:`suggest`: ``"valley"`` (default), ``"steepest"`` or ``"minimum"``. A curve that never falls
  gives no suggestion, and says why, instead of a number read off noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["RULES", "MIN_STEPS", "NOISE_MARGIN", "READ_WIDTH", "Suggestion", "SweepTracker", "check_sweep",
           "read_curve", "smooth", "suggest", "sweep_lr", "sweep_lrs"]

#: The suggestion rules, the default first.
RULES = ("valley", "steepest", "minimum")
#: The shortest sweep: fewer points leave nothing to read once the ends are trimmed.
MIN_STEPS = 5
#: A curve whose smoothed loss never falls this share below its starting value has no descent to read.
MIN_DROP = 0.02
#: A descent must also fall this many times the noise of the curve it is read on (see :func:`suggest`).
NOISE_MARGIN = 6.0
#: The width of the average the rules read (:func:`read_curve`), in decades of LR: a tenth of a
#: typical descent (1-2 decades), so it evens out batch-to-batch noise without moving the descent.
READ_WIDTH = 0.15


def check_sweep(min_lr: float, max_lr: float, num_steps: int, smoothing: float = 0.98,
                stop_factor: float | None = 4.0, rule: str = "valley") -> None:
    """Raise ``ValueError`` naming the first bad argument of a sweep (before any step is taken).

    Example:
        >>> check_sweep(1e-7, 10.0, 100)
        >>> check_sweep(1e-2, 1e-3, 100)
        Traceback (most recent call last):
        ...
        ValueError: lr_find(max_lr=0.001): expected a number above min_lr (0.01).
    """
    def fail(name: str, value: object, expected: str) -> None:
        raise ValueError(f"lr_find({name}={value!r}): expected {expected}.")

    if not _real(min_lr) or min_lr <= 0:
        fail("min_lr", min_lr, "a positive finite number")
    if not _real(max_lr) or max_lr <= min_lr:
        fail("max_lr", max_lr, f"a number above min_lr ({min_lr!r})")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < MIN_STEPS:
        fail("num_steps", num_steps, f"an integer >= {MIN_STEPS} (a few hundred is typical)")
    if not _real(smoothing) or not 0 <= smoothing < 1:
        fail("smoothing", smoothing, "a number in [0, 1) (the moving average's beta; 0: no smoothing)")
    if stop_factor is not None and (not _real(stop_factor) or stop_factor <= 1):
        fail("stop_factor", stop_factor, "a number above 1, or None (never stop early)")
    if rule not in RULES:
        fail("rule", rule, " or ".join(f'"{r}"' for r in RULES))


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweep_lr(step: int, min_lr: float, max_lr: float, num_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of an exponential sweep over ``num_steps`` steps:
    ``min_lr`` at the first, ``max_lr`` at the last.

    Example:
        >>> [round(sweep_lr(i, 1e-4, 1.0, 5), 6) for i in range(5)]
        [0.0001, 0.001, 0.01, 0.1, 1.0]
    """
    if step == num_steps - 1:
        return float(max_lr)  # exactly, not through rounding of the power
    return float(min_lr * (max_lr / min_lr) ** (step / (num_steps - 1)))


def sweep_lrs(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """Every step's learning rate (:func:`sweep_lr`)."""
    return [sweep_lr(i, min_lr, max_lr, num_steps) for i in range(num_steps)]


def smooth(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """The bias-corrected exponential moving average of ``losses`` (Adam's correction): ``avg_i =
    beta * avg_{i-1} + (1 - beta) * loss_i``, divided by ``1 - beta ** (i + 1)`` so the first values
    are not pulled towards the zero the average starts from. Non-finite losses make it NaN from there.

    Example:
        >>> smooth([2.0, 2.0, 2.0], beta=0.9)  # a constant stays constant (no drift towards 0)
        [2.0, 2.0, 2.0]
        >>> [round(v, 3) for v in smooth([1.0, 3.0], beta=0.5)]
        [1.0, 2.333]
    """
    tracker = SweepTracker(beta, stop_factor=None)
    return [tracker.add(loss) for loss in losses]


class SweepTracker:
    """Smooths the losses of a running sweep and says when to stop it.

    ``add(loss)`` returns the smoothed loss; :attr:`stop_reason` becomes a sentence once the sweep
    should stop: the loss is NaN/Inf, or (``stop_factor`` not None, a positive loss) the smoothed loss
    exceeds ``stop_factor`` times the lowest smoothed loss so far. The comparison is relative, so it
    does not depend on the loss's scale; a loss that can be zero or negative is only stopped by NaN/Inf.

    Example:
        >>> tracker = SweepTracker(beta=0.0, stop_factor=4.0)
        >>> [tracker.add(x) for x in (2.0, 1.0, 3.0)], tracker.stop_reason
        ([2.0, 1.0, 3.0], None)
        >>> tracker.add(4.5), tracker.stop_reason
        (4.5, 'the moving average 4.5 rose above 4 x its best (1)')
    """

    def __init__(self, beta: float = 0.98, stop_factor: float | None = 4.0) -> None:
        self.beta, self.stop_factor = beta, stop_factor
        self.average = 0.0
        self.count = 0
        self.best = math.inf
        self.stop_reason: str | None = None

    def add(self, loss: float) -> float:
        if not math.isfinite(loss):
            self.stop_reason = self.stop_reason or f"the loss became {loss}"
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * loss
        smoothed = self.average / (1 - self.beta ** self.count)
        if not math.isfinite(smoothed):
            return math.nan
        factor = self.stop_factor
        if factor is not None and self.count > 1 and 0 < self.best < smoothed / factor and self.stop_reason is None:
            self.stop_reason = f"the moving average {smoothed:.4g} rose above {factor:g} x its best ({self.best:.4g})"
        self.best = min(self.best, smoothed)
        return smoothed



def read_curve(lrs: Sequence[float], losses: Sequence[float], width: float = READ_WIDTH) -> list[float]:
    """The curve the rules read: a centred Gaussian average of the losses, ``width`` decades of LR wide
    (its standard deviation; at least one step), over the finite part of the sweep (NaN after it).

    Centred, not the causal moving average the stop rule watches: that average lags behind the
    losses by tens of steps (at beta 0.98), so on a sweep of 100 steps over 8 decades it puts the
    descent and the minimum about a decade too high (measured on digits with Adam: raw minimum near
    8e-3, the average's at 6.6e-2). Each loss is first capped at the highest loss of the sweep's first
    tenth (its starting level): one exploded step (1e5) would otherwise drag up its neighbours'
    average, and a loss above the starting level says nothing about where the loss falls.

    Example:
        >>> lrs = sweep_lrs(1e-4, 1.0, 9)  # 2 steps per decade
        >>> [round(v, 2) for v in read_curve(lrs, [2.0, 2.0, 2.0, 1.0, 0.5, 0.4, 0.5, 9.0, 1e5], width=0.25)]
        [1.99, 1.94, 1.67, 1.14, 0.69, 0.58, 0.92, 1.52, 1.87]
    """
    n = _finite_length(losses)
    if n == 0:
        return [math.nan] * len(losses)
    y = _capped(losses[:n])
    weights = _weights(n, _sigma_steps(lrs[:n], width))
    smoothed = weights @ y / weights.sum(axis=1)
    return [float(v) for v in smoothed] + [math.nan] * (len(losses) - n)


def _capped(losses: Sequence[float]) -> np.ndarray:
    """Finite losses capped at the highest of the first tenth (at least 3): the sweep's starting level."""
    y = np.asarray(losses, dtype=float)
    return np.minimum(y, y[:max(3, len(y) // 10)].max())


def _finite_length(values: Sequence[float]) -> int:
    return next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))


def _sigma_steps(lrs: Sequence[float], width: float) -> float:
    """``width`` decades in steps of the sweep (uniform in log lr), at least one step."""
    if len(lrs) < 2 or lrs[-1] <= lrs[0]:
        return 1.0
    per_step = math.log10(lrs[-1] / lrs[0]) / (len(lrs) - 1)
    return max(1.0, width / per_step)


def _weights(n: int, sigma: float) -> np.ndarray:
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    return np.exp(-0.5 * (offsets / sigma) ** 2)


@dataclass(frozen=True)
class Suggestion:
    """What a rule read off a sweep: ``lr`` (None when the curve gives no suggestion), the index of the
    point it is read at, a sentence saying how (or why there is none), and the curve it read."""

    lr: float | None
    index: int | None
    reason: str
    curve: tuple[float, ...] = ()


def suggest(lrs: Sequence[float], losses: Sequence[float], rule: str = "valley", min_drop: float = MIN_DROP,
            width: float = READ_WIDTH) -> Suggestion:
    """A learning rate read off a sweep (its LRs and raw losses) by ``rule``, on :func:`read_curve`.

    The curve is cut to its finite part, then its first tenth and last twentieth (at least one point)
    are left out: the edges of the average rest on half a window, and the last steps are where the
    loss diverged. The *descent* is the stretch from where the loss has fallen by a tenth of its total
    drop to its lowest point. There is no descent, and no suggestion (the reason says so), when the
    loss never falls ``min_drop`` (2%) below its value at the first point kept, or by no more than
    :data:`NOISE_MARGIN` times the curve's own noise (a flat, noisy curve dips somewhere by chance; the
    noise is the spread of the losses around the curve, over the square root of the points it averages).

    * ``"valley"`` (default): the point halfway along the descent, in log(lr). Clear of both ends: of
      the lowest point, at the edge of divergence, and of the first fall, where training barely moves.
      fastai's ``valley`` also takes the middle of a descent, but finds it as the longest decreasing
      subsequence of the loss, which strings together points of a noisy plateau (the decades where
      nothing is learnt yet) and so lands decades too low when the sweep starts far below the useful
      range (measured on digits with SGD: 5e-4, against a best OneCycleLR ``max_lr`` of 0.03 .. 0.1).
    * ``"steepest"`` (Lightning's ``suggestion()``; fastai's ``steep``): where the loss falls fastest
      per unit of log(lr) (the sweep is uniform in log(lr): per unit of lr, the slope would favour small
      learning rates), looked for along the descent only: before it, noise on the plateau can out-slope
      a gentle descent; past the lowest point the slopes are the divergence and its aftermath (a dead
      network's loss falling back from a spike). Still a derivative of a noisy curve: it can jump
      between two parts of the descent.
    * ``"minimum"`` (fastai 1's rule, from Smith): a tenth of the LR at the lowest point. The minimum
      lies at the edge of divergence; a decade below it training is still fast and stable. The most
      cautious of the three.

    Example:
        >>> lrs = sweep_lrs(1e-5, 10.0, 61)
        >>> losses = [0.5 + 1.5 / (1 + 10 ** (2 * (math.log10(lr) + 2))) for lr in lrs]  # falls around 1e-2
        >>> losses = [v if lr < 0.3 else v * (1 + 10 * (lr - 0.3)) for v, lr in zip(losses, lrs)]  # then blows up
        >>> for rule in RULES:
        ...     print(rule, f"{suggest(lrs, losses, rule).lr:.1e}")
        valley 1.6e-02
        steepest 1.0e-02
        minimum 1.3e-02
        >>> suggest(lrs, [1.0 + 0.01 * i for i in range(61)]).reason
        'no descent: the loss never fell below 1.048 (its value at lr 3.98e-05) by 2% or more; lowest 1.048'
    """
    if rule not in RULES:
        raise ValueError(f"lr_find(rule={rule!r}): expected " + " or ".join(f'"{r}"' for r in RULES) + ".")
    if len(lrs) != len(losses):
        raise ValueError(f"suggest: {len(lrs)} learning rates but {len(losses)} losses; expected one per step.")
    curve = read_curve(lrs, losses, width)
    finite = _finite_length(curve)
    begin, end = finite // 10, finite - max(1, finite // 20)  # kept: [begin, end)
    if end - begin < 3:
        return Suggestion(None, None, f"too few points: {finite} finite step(s) of {len(losses)}, "
                          f"{max(0, end - begin)} left after trimming the ends (diverged at once? lower min_lr or "
                          "take more steps)", tuple(curve))
    y = np.asarray(curve[begin:end], dtype=float)
    low = int(np.argmin(y))
    drop, needed = y[0] - y[low], _needed_drop(lrs[:finite], losses[:finite], curve[:finite], width, min_drop)
    if drop <= needed:
        return Suggestion(None, None, f"no descent: the loss never fell below {y[0]:.4g} (its value at lr "
                          f"{lrs[begin]:.3g}) by {_share(needed, y[0])} or more; lowest {y[low]:.4g}", tuple(curve))
    start = max((i for i in range(low) if y[i] >= y[0] - 0.1 * drop), default=0)
    descent = f"descent lr {lrs[begin + start]:.3g} .. {lrs[begin + low]:.3g}, loss {y[start]:.4g} -> {y[low]:.4g}"
    if rule == "valley":
        index = start + (low - start) // 2
        how = f"valley: halfway along the descent ({descent})"
    elif rule == "steepest":
        slope = np.gradient(y, np.log(np.asarray(lrs[begin:end], dtype=float)))
        index = start + int(np.argmin(slope[start:low + 1]))
        how = f"steepest: the loss falls fastest here ({slope[index]:.3g} per unit of ln(lr); {descent})"
    else:
        index = low
        how = f"minimum: a tenth of lr {lrs[begin + low]:.3g}, where the loss is lowest ({descent})"
    lr = float(lrs[begin + index]) / (10 if rule == "minimum" else 1)
    return Suggestion(lr, begin + index, how, tuple(curve))


def _needed_drop(lrs: Sequence[float], losses: Sequence[float], curve: Sequence[float], width: float,
                 min_drop: float) -> float:
    """The fall a descent must exceed: ``min_drop`` of the starting value, and :data:`NOISE_MARGIN` times
    the noise of the curve (the losses' robust spread around it, MAD, over sqrt(effective points))."""
    start = abs(curve[len(curve) // 10])
    residuals = _capped(losses) - np.asarray(curve, dtype=float)
    spread = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
    sigma = _sigma_steps(lrs, width)
    effective = 2 * math.sqrt(math.pi) * sigma  # (sum w)^2 / sum w^2 of a Gaussian window of sigma steps
    return max(min_drop * start, NOISE_MARGIN * spread / math.sqrt(effective))


def _share(part: float, whole: float) -> str:
    return f"{part / abs(whole):.0%}" if whole else f"{part:.3g}"
