"""The events of the training loop, and the exceptions that cancel a stage.

Where each event fires, as the loop reads (``*`` per train batch, ``**`` per optimizer step)::

    before_fit
    for epoch in epochs:
        before_epoch
        before_train
        for batch in train_loader:
            before_batch                   *  (raise CancelBatchException to skip it)
            forward, loss, backward        *  per micro-batch; an OOM retries the whole step
            after_backward                 *
            if the accumulation window is full (or the epoch ends):
                before_step                **  gradients unscaled and ready (clip, inspect);
                                               raise CancelStepException to drop this step
                optimizer / scheduler step **  then the step's loss/metrics are tracked
                after_step                 **
            after_batch                    *
        after_train
        before_validate                       (raise CancelValidateException to skip it)
        for batch in val_loader: ...
        after_validate                         epoch's val values are in state.epoch_logs
        after_epoch                            the epoch's record is in state.history
    after_fit
    exception                                  any error escaping fit, before it propagates

Every stage ``X`` in (fit, epoch, train, batch, step, validate) fires ``before_X``; if a
``CancelXException`` is raised inside it, ``after_cancel_X``; then ``after_X``.
Callbacks implement methods named exactly like these events; only overridden methods are
called, so an unused hook costs nothing.
"""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    BEFORE_FIT = "before_fit"
    AFTER_CANCEL_FIT = "after_cancel_fit"
    AFTER_FIT = "after_fit"
    BEFORE_EPOCH = "before_epoch"
    AFTER_CANCEL_EPOCH = "after_cancel_epoch"
    AFTER_EPOCH = "after_epoch"
    BEFORE_TRAIN = "before_train"
    AFTER_CANCEL_TRAIN = "after_cancel_train"
    AFTER_TRAIN = "after_train"
    BEFORE_BATCH = "before_batch"
    AFTER_CANCEL_BATCH = "after_cancel_batch"
    AFTER_BATCH = "after_batch"
    AFTER_BACKWARD = "after_backward"
    BEFORE_STEP = "before_step"
    AFTER_CANCEL_STEP = "after_cancel_step"
    AFTER_STEP = "after_step"
    BEFORE_VALIDATE = "before_validate"
    AFTER_CANCEL_VALIDATE = "after_cancel_validate"
    AFTER_VALIDATE = "after_validate"
    EXCEPTION = "exception"


class CancelFitException(Exception):
    """Stop training cleanly: ``after_cancel_fit`` and ``after_fit`` still fire."""


class CancelEpochException(Exception):
    """Stop the current epoch; the next one starts (unless training should stop)."""


class CancelTrainException(Exception):
    """Stop the train phase of this epoch; validation still runs."""


class CancelBatchException(Exception):
    """Skip the rest of this batch (raise it in ``before_batch`` to skip the batch)."""


class CancelStepException(Exception):
    """Drop this optimizer step (raise it in ``before_step``): gradients are zeroed, the step's loss and
    metrics are not tracked, the counters do not advance."""


class CancelValidateException(Exception):
    """Skip this validation: the epoch's record then has no ``val_*`` values."""


CANCEL_EXCEPTIONS = {
    "fit": CancelFitException,
    "epoch": CancelEpochException,
    "train": CancelTrainException,
    "batch": CancelBatchException,
    "step": CancelStepException,
    "validate": CancelValidateException,
}

#: stage -> its three event names (before_, after_cancel_, after_), for the loop's written-out stages.
STAGE_EVENTS = {stage: (f"before_{stage}", f"after_cancel_{stage}", f"after_{stage}") for stage in CANCEL_EXCEPTIONS}
