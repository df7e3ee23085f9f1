"""How often to validate: OTX's rule from the epoch length, improved by the measured cost of a validation.

OTX (``AdaptiveTrainSchedulingHook``) validates every ``max(round(5 * exp(-0.025 * iters)), 1)``
epochs: every 5th epoch for tiny epochs, every epoch from about 50 iterations on. The epoch length
is its proxy for what a validation costs relative to training. Here the cost is measured instead
(or estimated from the loader sizes, :func:`estimate_val_seconds`): with ``r`` the seconds of one
validation over those of one training epoch, validating every ``k`` epochs spends ``r / k`` of the
training time on validation, so :func:`validation_interval` takes the smallest ``k`` that keeps
that under ``budget`` (10%): ``k = ceil(r / budget)``. Validation that costs little runs every
epoch even where OTX would wait 5; a costly one on a long epoch runs less often than OTX's 1.

Caps: ``k`` is at most ``max_interval`` (5, OTX's own longest), and at most ``max_epochs //
min_validations``, so a run still validates ``min_validations`` (3) times along the way for
early stopping, the plateau scheduler and checkpoints to act on. :func:`should_validate` always
validates the last epoch, so the final model is never left unmeasured. Unlike OTX nothing here
stretches the learning-rate schedule.

Example:
    >>> otx_interval(10), otx_interval(200)
    (4, 1)
    >>> plan = validation_interval(10, val_seconds=0.2, train_epoch_seconds=4.0, max_epochs=50)
    >>> plan.interval, plan.otx  # validation costs 5% of an epoch: every epoch, where OTX says 4
    (1, 4)
    >>> [e for e in range(1, 11) if should_validate(e, interval=4, max_epochs=10)]
    [4, 8, 10]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ValidationPlan", "otx_interval", "validation_interval", "should_validate", "estimate_val_seconds"]

OTX_MAX_INTERVAL = 5
OTX_DECAY = -0.025


def _count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} is {value!r}; expected an int >= {minimum}.")
    return value


def _seconds(name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} is {value!r}; expected seconds {'> 0' if positive else '>= 0'}.")
    return float(value)


def otx_interval(iters_per_epoch: int) -> int:
    """OTX's validation interval in epochs: ``max(round(5 * exp(-0.025 * iters_per_epoch)), 1)``.

    Python's ``round`` (half to even), as OTX computes it.

    Example:
        >>> [otx_interval(n) for n in (1, 10, 20, 30, 48, 49, 100)]
        [5, 4, 3, 2, 2, 1, 1]
    """
    _count("iters_per_epoch", iters_per_epoch)
    return max(round(OTX_MAX_INTERVAL * math.exp(OTX_DECAY * iters_per_epoch)), 1)


@dataclass(frozen=True)
class ValidationPlan:
    """The chosen interval (epochs), OTX's for the same epoch length, the measured cost ratio, and why."""

    interval: int
    otx: int
    cost_ratio: float | None  # seconds of a validation / seconds of a training epoch; None: not measured
    reason: str


def validation_interval(iters_per_epoch: int, val_seconds: float | None = None,
                        train_epoch_seconds: float | None = None, max_epochs: int | None = None, *,
                        budget: float = 0.10, max_interval: int = OTX_MAX_INTERVAL,
                        min_validations: int = 3) -> ValidationPlan:
    """Validate every ``interval`` epochs: ``ceil(cost / budget)`` with a measured cost, else OTX's rule.

    Args:
        iters_per_epoch: optimizer steps (or loader batches) in a training epoch.
        val_seconds, train_epoch_seconds: one validation pass and one training epoch, measured
            (both, or neither: then OTX's rule decides).
        max_epochs: the run's length; caps the interval so it validates ``min_validations`` times.
        budget: the share of training time validation may take.
        max_interval: the longest interval, measured or not.
        min_validations: validations a run of ``max_epochs`` keeps, at least.

    Example:
        >>> plan = validation_interval(500, val_seconds=30.0, train_epoch_seconds=100.0, max_epochs=100)
        >>> plan.interval, plan.otx  # a validation costs 30% of an epoch: every 3rd keeps it at 10%
        (3, 1)
        >>> validation_interval(500, 30.0, 100.0, max_epochs=6).interval  # 6 epochs, 3 validations: every 2nd
        2
        >>> validation_interval(1).reason
        'validate every 5 epochs: OTX rule for 1 iteration an epoch (no measured validation cost yet)'
    """
    _count("iters_per_epoch", iters_per_epoch)
    _count("max_interval", max_interval)
    _count("min_validations", min_validations)
    if not 0 < budget <= 1:
        raise ValueError(f"budget is {budget!r}; expected a fraction in (0, 1].")
    if (val_seconds is None) != (train_epoch_seconds is None):
        given, missing = ("val_seconds", "train_epoch_seconds") if train_epoch_seconds is None \
            else ("train_epoch_seconds", "val_seconds")
        raise ValueError(f"{given} was given without {missing}; pass both measurements or neither.")
    otx = otx_interval(iters_per_epoch)
    if val_seconds is None or train_epoch_seconds is None:
        ratio, interval = None, min(otx, max_interval)
        why = f"OTX rule for {_iterations(iters_per_epoch)} (no measured validation cost yet)"
    else:
        ratio = _seconds("val_seconds", val_seconds, False) / _seconds("train_epoch_seconds", train_epoch_seconds,
                                                                       True)
        wanted = max(math.ceil(ratio / budget - 1e-9), 1)  # 1e-9: 0.3 / 0.1 is 3.0000000000000004
        interval = min(wanted, max_interval)
        why = (f"a validation costs {ratio:.2f}x a training epoch ({val_seconds:.3g} s vs {train_epoch_seconds:.3g} s),"
               f" so {_every(interval)} keeps it at {_pct(ratio / interval)} of training time "
               f"(budget {_pct(budget)}{f', capped at {max_interval}' if wanted > max_interval else ''}); "
               f"OTX rule for {_iterations(iters_per_epoch)} says {otx}")
    if max_epochs is not None:
        cap = max(_count("max_epochs", max_epochs) // min_validations, 1)
        if cap < interval:
            interval = cap
            why += f"; capped at {cap} so {max_epochs} epochs validate at least {min_validations} times"
    return ValidationPlan(interval, otx, ratio, f"validate {_every(interval)}: {why}")


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def _every(interval: int) -> str:
    return "every epoch" if interval == 1 else f"every {interval} epochs"


def _iterations(n: int) -> str:
    return f"{n} iteration{'' if n == 1 else 's'} an epoch"


def should_validate(epoch: int, interval: int, max_epochs: int | None = None,
                    last_validated: int | None = None) -> bool:
    """Whether to validate after ``epoch`` (counted from 1, as the history's ``epoch``).

    Every ``interval``-th epoch, and always the last one (``epoch == max_epochs``). With
    ``last_validated`` (the epoch of the last validation, 0 for none) it counts from there
    instead, so an interval that changes mid-run neither skips nor doubles a validation.

    Example:
        >>> [e for e in range(1, 8) if should_validate(e, 3, max_epochs=7)]
        [3, 6, 7]
        >>> should_validate(5, 3, last_validated=3), should_validate(6, 3, last_validated=3)
        (False, True)
    """
    _count("epoch", epoch)
    _count("interval", interval)
    if max_epochs is not None and epoch >= _count("max_epochs", max_epochs):
        return True
    if last_validated is not None:
        return epoch - _count("last_validated", last_validated, 0) >= interval
    return epoch % interval == 0


def estimate_val_seconds(train_epoch_seconds: float, train_samples: int, val_samples: int,
                         forward_share: float = 1 / 3) -> float:
    """A validation's seconds before one has run: the training epoch's, per sample, times the forward share.

    A forward pass is about a third of forward + backward + step (the backward costs about two
    forwards), so a validation costs roughly ``forward_share * val_samples / train_samples`` of a
    training epoch. Replace it by the measured time once a validation has run: the forward share
    varies with the model, and a larger eval batch is cheaper per sample.

    Example:
        >>> estimate_val_seconds(90.0, train_samples=60_000, val_samples=10_000)
        5.0
    """
    train = _seconds("train_epoch_seconds", train_epoch_seconds, True)
    _count("train_samples", train_samples)
    _count("val_samples", val_samples, 0)
    if not 0 < forward_share <= 1:
        raise ValueError(f"forward_share is {forward_share!r}; expected a fraction in (0, 1].")
    return train * forward_share * val_samples / train_samples
