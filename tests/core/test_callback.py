"""The event contract: names, counts, order, cancellation, and errors that name their callback."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from adaptrain import (
    Callback,
    CallbackError,
    CancelBatchException,
    CancelFitException,
    CancelValidateException,
    Event,
    Trainer,
)
from adaptrain.core.callback import CallbackList, overrides
from tests.common import data, models
from tests.common.events import EventCounter


def fit(callbacks, epochs=2, n=64, batch_size=16, accumulate=1, val=True):
    model = models.mlp()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=epochs,
                      callbacks=callbacks, progress=False, accumulate_grad_batches=accumulate)
    loader = data.loader(data.classification(n), batch_size=batch_size)
    trainer.fit(loader, loader if val else None)
    return trainer


NOT_HOOKS = {"order", "state_key", "state_dict", "load_state_dict", "log_metrics"}


def test_the_base_class_has_exactly_one_no_op_hook_per_event():
    hooks = {name for name in vars(Callback) if not name.startswith("_")} - NOT_HOOKS
    assert hooks == {e.value for e in Event}  # an equality: a new event without a hook (or vice versa) fails
    assert Callback().after_epoch(None) is None
    counter = EventCounter()
    assert all(overrides(counter, e.value) for e in Event)


def test_each_event_fires_the_expected_number_of_times():
    counter = EventCounter()
    fit([counter], epochs=2, n=64, batch_size=16, accumulate=3)  # 4 batches/epoch, 2 optimizer steps/epoch
    c = counter.counts
    assert c["before_fit"] == c["after_fit"] == 1
    assert c["before_epoch"] == c["after_epoch"] == c["before_train"] == c["after_train"] == 2
    assert c["before_batch"] == c["after_batch"] == c["after_backward"] == 8
    assert c["before_step"] == c["after_step"] == 4
    assert c["before_validate"] == c["after_validate"] == 2
    assert c["exception"] == 0 and not any(k.startswith("after_cancel") for k in c)
    seq = counter.sequence
    assert seq[:4] == ["before_fit", "before_epoch", "before_train", "before_batch"]
    assert seq[-1] == "after_fit" and seq.index("before_validate") > seq.index("after_train")


def test_callbacks_run_in_order_and_only_overridden_hooks_are_registered():
    calls = []

    class A(Callback):
        order = 5

        def before_fit(self, trainer):
            calls.append("A")

    class B(Callback):
        order = -5

        def before_fit(self, trainer):
            calls.append("B")

    callbacks = CallbackList([A(), B()])
    assert [type(cb).__name__ for cb in callbacks.hooks["before_fit"]] == ["B", "A"]
    assert callbacks.hooks["after_batch"] == []
    fit([A(), B()], epochs=1)
    assert calls == ["B", "A"]
    assert "before_fit" in callbacks.describe() and "B, A" in callbacks.describe()


def test_cancel_batch_skips_the_batch_and_fires_after_cancel():
    class SkipOdd(Callback):
        def before_batch(self, trainer):
            if trainer.state.batch_idx % 2:
                raise CancelBatchException()

    counter = EventCounter()
    fit([SkipOdd(), counter], epochs=1, val=False)
    assert counter.counts["after_cancel_batch"] == 2 and counter.counts["after_backward"] == 2
    assert counter.counts["after_batch"] == 4


def test_cancel_validate_leaves_no_val_values():
    class NoVal(Callback):
        def before_validate(self, trainer):
            if trainer.state.epoch == 0:
                raise CancelValidateException()

    trainer = fit([NoVal()], epochs=2)
    first, second = trainer.state.history.records
    assert not any(k.startswith("val_") for k in first) and "val_loss" in second


def test_cancel_fit_stops_cleanly():
    class StopAfter3(Callback):
        def after_step(self, trainer):
            if trainer.state.global_step == 3:
                raise CancelFitException()

    counter = EventCounter()
    trainer = fit([StopAfter3(), counter], epochs=5)
    assert trainer.state.global_step == 3
    assert counter.counts["after_cancel_fit"] == 1 and counter.counts["after_fit"] == 1
    assert counter.counts["exception"] == 0


def test_error_in_a_callback_names_callback_and_event_and_fires_exception():
    class Broken(Callback):
        def after_epoch(self, trainer):
            raise KeyError("missing")

    counter = EventCounter()
    with pytest.raises(CallbackError, match="Broken.after_epoch raised KeyError"):
        fit([Broken(), counter], epochs=2)
    assert counter.counts["exception"] == 1 and counter.counts["after_fit"] == 0


def test_non_callback_is_rejected():
    with pytest.raises(TypeError, match="expected adaptrain.Callback instances; received function"):
        CallbackList([lambda trainer: None])


def test_cancelled_epoch_still_ends_and_is_recorded():
    from adaptrain import CancelEpochException

    class SkipFirstEpoch(Callback):
        def before_epoch(self, trainer):
            if trainer.state.epoch == 0:
                raise CancelEpochException()

    counter = EventCounter()
    trainer = fit([SkipFirstEpoch(), counter], epochs=3)
    records = trainer.state.history.records
    assert [r["epoch"] for r in records] == [1, 2, 3] and "train_loss" not in records[0]
    assert "val_loss" in records[1] and counter.counts["after_cancel_epoch"] == 1
    assert trainer.state.global_step == 8  # epochs 2 and 3 only, 4 steps each


def test_cancelled_train_phase_steps_its_window_and_leaks_nothing():
    from adaptrain import CancelTrainException

    grads_at_epoch_start = []

    class StopAtBatch2(Callback):
        def before_train(self, trainer):
            grads_at_epoch_start.append([p.grad for p in trainer.model.parameters()])

        def after_batch(self, trainer):
            if trainer.state.epoch == 0 and trainer.state.batch_idx == 2:
                raise CancelTrainException()

    trainer = fit([StopAtBatch2()], epochs=2, accumulate=3)  # window of 3 cut after 2 batches
    assert all(g is None for grads in grads_at_epoch_start for g in grads)
    assert trainer.state.global_step == 1 + 2  # the cut window was stepped, then 4 batches = 2 steps
    assert "train_loss" in trainer.state.history.records[0] and "val_loss" in trainer.state.history.records[0]


def test_cancelled_batch_after_backward_does_not_double_the_next_step():
    class CancelAfterBackward(Callback):
        def after_backward(self, trainer):
            if trainer.state.batch_idx == 1:
                raise CancelBatchException()

    trainer = fit([CancelAfterBackward()], epochs=1, val=False)
    assert trainer.state.global_step == 3 and trainer.state.window.samples == 0


def test_a_misspelled_hook_gets_a_warning_naming_the_closest_event():
    class Typo(Callback):
        def after_epoc(self, trainer):  # never called
            pass

        def helper(self):  # an ordinary method: no warning
            pass

    with pytest.warns(UserWarning, match=r"Typo\.after_epoc is not an event and is never called; did you mean "
                                         r"after_epoch\?"):
        CallbackList([Typo()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CallbackList([EventCounter()])  # real hooks only: silent


def test_log_metrics_reaches_every_callback_that_implements_it_on_rank_zero():
    class Sink(Callback):
        def __init__(self):
            self.got = []

        def log_metrics(self, metrics, step):
            self.got.append((dict(metrics), step))

    class SendsMetrics(Callback):
        def after_epoch(self, trainer):
            trainer.log_metrics({"custom/throughput": 12.5})

    sinks, model = [Sink(), Sink()], nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      progress=False, max_epochs=2, device="cpu", callbacks=[*sinks, SendsMetrics()])
    trainer.fit(data.loader(data.classification(n=32), batch_size=16))  # 2 steps an epoch
    assert all(sink.got == [({"custom/throughput": 12.5}, 2), ({"custom/throughput": 12.5}, 4)] for sink in sinks)
