"""Validation interval: OTX's reference rule, the cost-weighted rule and its caps, the last epoch always validated."""

from __future__ import annotations

import math

import pytest

from adaptrain.tuning.validation import estimate_val_seconds, otx_interval, should_validate, validation_interval


@pytest.mark.parametrize(("iters", "interval"), [
    (1, 5), (8, 4), (9, 4), (10, 4), (19, 3), (20, 3), (30, 2), (36, 2), (48, 2), (49, 1), (50, 1), (1000, 1),
])
def test_otx_rule_values(iters, interval):
    assert otx_interval(iters) == interval
    assert otx_interval(iters) == max(round(5 * math.exp(-0.025 * iters)), 1)


def test_otx_rule_never_grows_with_the_epoch_length():
    values = [otx_interval(n) for n in range(1, 300)]
    assert values == sorted(values, reverse=True) and values[0] == 5 and values[-1] == 1


def test_without_measurements_the_otx_rule_decides():
    plan = validation_interval(10)
    assert (plan.interval, plan.otx, plan.cost_ratio) == (4, 4, None)
    assert plan.reason == "validate every 4 epochs: OTX rule for 10 iterations an epoch (no measured validation cost yet)"


@pytest.mark.parametrize(("val_seconds", "interval"), [
    (0.0, 1), (0.2, 1), (0.4, 1), (0.41, 2), (0.8, 2), (1.2, 3), (2.0, 5), (40.0, 5),
])
def test_measured_cost_sets_the_interval_to_keep_validation_under_the_budget(val_seconds, interval):
    plan = validation_interval(10, val_seconds=val_seconds, train_epoch_seconds=4.0)  # OTX: every 4
    assert plan.interval == interval
    assert plan.cost_ratio == pytest.approx(val_seconds / 4.0)
    if interval < 5:  # under the cap the budget holds, and one epoch fewer would break it
        assert plan.cost_ratio / interval <= 0.10 + 1e-12
        assert interval == 1 or plan.cost_ratio / (interval - 1) > 0.10


def test_cheap_validation_runs_more_often_than_otx_and_costly_less():
    cheap = validation_interval(10, val_seconds=0.1, train_epoch_seconds=10.0)
    assert (cheap.interval, cheap.otx) == (1, 4)
    costly = validation_interval(400, val_seconds=5.0, train_epoch_seconds=10.0)
    assert (costly.interval, costly.otx) == (5, 1)
    assert costly.reason == ("validate every 5 epochs: a validation costs 0.50x a training epoch (5 s vs 10 s), so "
                             "every 5 epochs keeps it at 10% of training time (budget 10%); OTX rule for 400 "
                             "iterations an epoch says 1")


def test_interval_is_capped_at_max_interval_and_by_the_run_length():
    plan = validation_interval(10, val_seconds=30.0, train_epoch_seconds=10.0)
    assert plan.interval == 5 and "(budget 10%, capped at 5)" in plan.reason
    assert validation_interval(10, 30.0, 10.0, max_interval=8).interval == 8
    short = validation_interval(10, val_seconds=30.0, train_epoch_seconds=10.0, max_epochs=7)
    assert short.interval == 2 and short.reason.endswith("capped at 2 so 7 epochs validate at least 3 times")
    assert validation_interval(1, max_epochs=2).interval == 1  # OTX's 5 on a 2-epoch run: every epoch
    assert validation_interval(10, 0.1, 10.0, budget=0.001).interval == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"iters_per_epoch": 0}, "iters_per_epoch is 0; expected an int >= 1."),
    ({"iters_per_epoch": 10, "val_seconds": 1.0},
     "val_seconds was given without train_epoch_seconds; pass both measurements or neither."),
    ({"iters_per_epoch": 10, "train_epoch_seconds": 1.0},
     "train_epoch_seconds was given without val_seconds; pass both measurements or neither."),
    ({"iters_per_epoch": 10, "val_seconds": 1.0, "train_epoch_seconds": 0.0},
     "train_epoch_seconds is 0.0; expected seconds > 0."),
    ({"iters_per_epoch": 10, "val_seconds": -1.0, "train_epoch_seconds": 1.0},
     "val_seconds is -1.0; expected seconds >= 0."),
    ({"iters_per_epoch": 10, "max_epochs": 0}, "max_epochs is 0; expected an int >= 1."),
    ({"iters_per_epoch": 10, "budget": 0.0}, "budget is 0.0; expected a fraction in (0, 1]."),
])
def test_bad_input_gets_one_message_naming_it(kwargs, message):
    with pytest.raises(ValueError) as error:
        validation_interval(**kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize(("interval", "max_epochs"), [(1, 1), (3, 10), (4, 10), (5, 3), (7, 7), (2, 9)])
def test_the_last_epoch_is_always_validated(interval, max_epochs):
    validated = [e for e in range(1, max_epochs + 1) if should_validate(e, interval, max_epochs)]
    assert validated[-1] == max_epochs
    assert validated[:-1] == [e for e in range(interval, max_epochs, interval)]


def test_without_max_epochs_only_the_interval_counts():
    assert [e for e in range(1, 10) if should_validate(e, 4)] == [4, 8]


def test_last_validated_counts_from_the_last_validation_when_the_interval_changes():
    # Every 4 epochs until epoch 4, then every 3: by epoch number (4 % 3 != 0) epoch 6 would validate
    # only two epochs after 4; counting from the last validation it is epoch 7.
    assert [e for e in range(5, 11) if should_validate(e, 3, last_validated=4)] == [7, 8, 9, 10]
    assert should_validate(7, 3, max_epochs=20, last_validated=4)
    assert should_validate(5, 3, max_epochs=5, last_validated=4)  # the last epoch, whatever the count
    with pytest.raises(ValueError, match=r"epoch is 0; expected an int >= 1\."):
        should_validate(0, 3)


def test_estimated_validation_cost_from_the_loader_sizes():
    assert estimate_val_seconds(90.0, train_samples=60_000, val_samples=10_000) == pytest.approx(5.0)
    assert estimate_val_seconds(90.0, 60_000, 10_000, forward_share=0.5) == pytest.approx(7.5)
    assert estimate_val_seconds(90.0, 60_000, 0) == 0.0
    # An estimate feeds the same rule: a validation set as large as the training set costs a third of an epoch.
    plan = validation_interval(100, estimate_val_seconds(30.0, 1000, 1000), 30.0)
    assert plan.interval == 4
    with pytest.raises(ValueError, match=r"train_samples is 0; expected an int >= 1\."):
        estimate_val_seconds(1.0, 0, 10)
