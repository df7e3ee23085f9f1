"""Validate less often when validation is costly: OTX's adaptive interval, weighed by the measured cost.

The decisions are the pure functions of :mod:`adaptrain.tuning.validation`; this callback measures
what they need and skips validations by raising :class:`~adaptrain.CancelValidateException`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from adaptrain.core.callback import Callback
from adaptrain.core.events import CancelValidateException
from adaptrain.distributed.env import broadcast_object
from adaptrain.tuning.validation import ValidationPlan, estimate_val_seconds, should_validate, validation_interval

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


class AdaptiveTrainScheduling(Callback):
    """Validates every ``interval`` epochs, chosen from the epoch length and what a validation costs.

    OTX's rule (every ``max(round(5 * exp(-0.025 * iters_per_epoch)), 1)`` epochs) uses the epoch
    length as a stand-in for the cost; here the cost is measured. After the first training epoch the
    validation's seconds are estimated from the loader sizes (:func:`~adaptrain.tuning.validation.
    estimate_val_seconds`); after the first validation they are measured, and the interval is
    re-planned once (then fixed, so a resumed run keeps the same validation epochs). The interval is
    the smallest that keeps validation under ``budget`` of the training time, at most ``max_interval``,
    and short enough for ``min_validations`` validations in ``max_epochs``
    (:func:`~adaptrain.tuning.validation.validation_interval`). Each plan is printed on one line.

    Changes training: skips validations (``state.validated`` stays False and the epoch's record has
    no ``val_*`` keys). It never skips the last epoch (``max_epochs``, or one where ``should_stop`` is
    already set when validation is due), so the final model is always measured. The LR schedule is
    untouched; EarlyStopping, the ReduceLROnPlateau scheduler and ModelCheckpoint's best-k ranking act
    on validated epochs only, so their patience counts validations. A callback that stops the run in
    ``after_epoch`` of a skipped epoch (EarlyStopping on a ``train_`` value) leaves that epoch
    unvalidated: the stop is decided after validation time.

    Args:
        budget: the share of training time validation may take (0.1: 10%).
        max_interval: the longest interval, in epochs (OTX's own longest is 5).
        min_validations: validations a run of ``max_epochs`` keeps at least (for early stopping,
            the plateau scheduler and checkpoints to act on).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from adaptrain import Trainer
        >>> train = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=8)
        >>> val = DataLoader(TensorDataset(torch.randn(256, 4), torch.randn(256, 1)), batch_size=8)
        >>> model = torch.nn.Linear(4, 1)
        >>> schedule = AdaptiveTrainScheduling()
        >>> schedule.clock = iter(range(0, 1000, 4)).__next__  # a fake clock: 4 s between readings
        >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
        ...                   max_epochs=9, callbacks=[schedule], progress=False)
        >>> history = trainer.fit(train, val)  # doctest: +ELLIPSIS
        AdaptiveTrainScheduling (estimated from 256 val / 32 train samples): validate every 3 epochs: ...
        AdaptiveTrainScheduling (measured): validate every 3 epochs: a validation costs 1.00x a training epoch ...
        >>> schedule.validated_epochs, [r["epoch"] for r in history.records if "val_loss" in r]
        ([3, 6, 9], [3, 6, 9])
    """

    order = -20  # before other callbacks' before_validate: none of them sees a validation that is skipped
    #: The clock it reads, in seconds; replace it to simulate costs (tests, the doctest above).
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, budget: float = 0.10, max_interval: int = 5, min_validations: int = 3) -> None:
        try:  # the same checks validation_interval makes, now, before any training
            validation_interval(1, budget=budget, max_interval=max_interval, min_validations=min_validations)
        except (ValueError, TypeError) as error:
            raise ValueError(f"AdaptiveTrainScheduling: {error}") from None
        self.budget, self.max_interval, self.min_validations = budget, max_interval, min_validations
        self._reset()

    def _reset(self) -> None:
        self.plan: ValidationPlan | None = None
        self.train_seconds: float | None = None  # the first training epoch (scaled to a whole one)
        self.val_seconds: float | None = None  # the first validation pass
        self.validated_epochs: list[int] = []
        self._started: tuple[float, int] = (0.0, 0)  # (clock, batch_idx) at the start of the phase timed
        self._fitting = False  # trainer.validate() outside fit is never skipped

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer: Trainer) -> None:
        state = trainer.state
        if state.epoch == 0 and not state.mid_epoch:  # a fresh run; a resumed one has its state loaded
            self._reset()
        self._fitting = True

    def after_fit(self, trainer: Trainer) -> None:
        self._fitting = False

    def exception(self, trainer: Trainer) -> None:
        self._fitting = False

    def before_train(self, trainer: Trainer) -> None:
        self._started = (self.clock(), trainer.state.batch_idx)

    def after_train(self, trainer: Trainer) -> None:
        state = trainer.state
        began, first_batch = self._started
        trained = state.batch_idx - first_batch
        if self.train_seconds is None and trained > 0:
            # A resumed (or cancelled) epoch trains only part of its batches: scale to the whole epoch.
            seconds = (self.clock() - began) * max(state.num_batches or 0, state.batch_idx) / trained
            self.train_seconds = broadcast_object(seconds)  # rank zero's: every rank must plan alike

    def before_validate(self, trainer: Trainer) -> None:
        state, epoch = trainer.state, trainer.state.epoch + 1
        if not self._fitting:
            return
        if self.plan is None:
            self._plan(trainer, *self._estimate(trainer))
        last = self.validated_epochs[-1] if self.validated_epochs else 0
        if not state.should_stop and not should_validate(epoch, self.plan.interval, state.max_epochs, last):
            raise CancelValidateException  # the loop catches it; no val_* keys this epoch
        self._started = (self.clock(), state.batch_idx)

    def after_validate(self, trainer: Trainer) -> None:
        if not self._fitting or not trainer.state.validated:
            return  # skipped (by this callback or another), or a trainer.validate() call
        self.validated_epochs.append(trainer.state.epoch + 1)
        if self.val_seconds is None:  # the first validation: its real cost replaces the estimate, once
            self.val_seconds = broadcast_object(max(self.clock() - self._started[0], 0.0))
            self._plan(trainer, self.val_seconds, "measured")

    # ------------------------------------------------------------------ planning
    def _estimate(self, trainer: Trainer) -> tuple[float | None, str]:
        """A validation's seconds from the loader sizes, before one has run, and what they came from."""
        state = trainer.state
        val_samples = _samples(state.val_loader)
        if not self.train_seconds or not state.epoch_samples or val_samples is None:
            return None, "no epoch time or val size to estimate from"
        return (estimate_val_seconds(self.train_seconds, state.epoch_samples, val_samples),
                f"estimated from {val_samples} val / {state.epoch_samples} train samples")

    def _plan(self, trainer: Trainer, val_seconds: float | None, source: str) -> None:
        state, previous = trainer.state, self.plan
        timed = val_seconds is not None and bool(self.train_seconds)
        self.plan = validation_interval(
            state.num_batches or state.batch_idx or 1, val_seconds if timed else None,
            self.train_seconds if timed else None, state.max_epochs,
            budget=self.budget, max_interval=self.max_interval, min_validations=self.min_validations)
        line = f"AdaptiveTrainScheduling ({source}): {self.plan.reason}"
        trainer.print(line)
        # Recorded like every other adaptation: adaptations.json, and an "adapted:" line in train.log.
        before = previous.interval if previous is not None else 1
        if self.plan.interval != before:
            trainer.state.history.adaptations.append({
                "kind": "validation", "before": {"every_n_epochs": before},
                "after": {"every_n_epochs": self.plan.interval}, "reason": line,
                "epoch": state.epoch + 1, "step": state.global_step})

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        plan = self.plan
        return {"plan": None if plan is None else [plan.interval, plan.otx, plan.cost_ratio, plan.reason],
                "train_seconds": self.train_seconds, "val_seconds": self.val_seconds,
                "validated_epochs": list(self.validated_epochs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = None if state["plan"] is None else ValidationPlan(*state["plan"])
        self.train_seconds, self.val_seconds = state["train_seconds"], state["val_seconds"]
        self.validated_epochs = list(state["validated_epochs"])

    def __repr__(self) -> str:
        return (f"AdaptiveTrainScheduling(budget={self.budget}, max_interval={self.max_interval}, "
                f"min_validations={self.min_validations})")


def _samples(loader: Any) -> int | None:
    """Samples a loader yields per pass: its data set's length, else batches x batch size; None if unknown."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        pass
    try:
        return len(loader) * int(loader.batch_size)
    except (AttributeError, TypeError, ValueError):
        return None
