"""WeightedMean: the first NaN/Inf among the values is found exactly, whatever the weights, whether the
values are kept and folded later (``defer=True``, an accelerator's) or added at once (the CPU's)."""

from __future__ import annotations

import math

import pytest
import torch

from adaptrain.core.metrics import WeightedMean


@pytest.mark.parametrize("defer", [True, False])
@pytest.mark.parametrize("bad, weight", [(float("nan"), 3), (float("inf"), 3), (float("-inf"), 3),
                                         (float("nan"), 0), (float("inf"), 0)])
def test_flush_names_the_first_nonfinite_value(bad, weight, defer):
    mean = WeightedMean(defer=defer)
    for tag, (value, w) in enumerate([(1.0, 2), (bad, weight), (2.0, 1), (float("nan"), 1)], start=1):
        mean.update(torch.tensor(value), w, tag=tag)
    assert mean.flush(find_nonfinite=True) == 2
    assert mean.flush(find_nonfinite=True) is None  # nothing pending any more


@pytest.mark.parametrize("defer", [True, False])
def test_flush_of_finite_values_finds_nothing_even_when_their_sum_overflows(defer):
    mean = WeightedMean(defer=defer)
    mean.update(torch.tensor(3e38), 64, tag=1)  # finite, but 3e38 * 64 is inf in float32
    mean.update(torch.tensor(1.0), 1, tag=2)
    assert mean.flush(find_nonfinite=True) is None
    if defer:  # the float32 dot product overflows
        assert math.isinf(mean.compute())
    else:  # the host's float64 sum does not
        assert mean.compute() == pytest.approx((float(torch.tensor(3e38)) * 64 + 1) / 65)


@pytest.mark.parametrize("defer", [True, False])
def test_a_nonfinite_value_not_reported_yet_survives_a_state_dict_round_trip(defer):
    mean = WeightedMean(defer=defer)
    mean.update(torch.tensor(1.0), 2, tag=1)
    mean.update(torch.tensor(float("nan")), 2, tag=2)
    assert mean.first_nonfinite() == 2  # seen, nothing folded or reported
    restored = WeightedMean(defer=defer)
    restored.load_state_dict(mean.state_dict())
    assert restored.first_nonfinite() == 2
    assert restored.flush(find_nonfinite=True) == 2
    assert restored.first_nonfinite() == -1  # reported once; the total is NaN from now on


def test_a_deferred_checkpoint_resumed_on_the_cpu_reports_its_own_nan_first():
    """A GPU run's checkpoint (values kept, a NaN among them) resumed on the CPU (values added at once):
    the checkpoint's NaN came first, so it is the one named, not a later Inf."""
    deferred = WeightedMean(defer=True)
    deferred.update(torch.tensor(1.0), 2, tag=1)
    deferred.update(torch.tensor(float("nan")), 2, tag=3)
    resumed = WeightedMean(defer=False)
    resumed.load_state_dict(deferred.state_dict(), torch.device("cpu"))
    resumed.update(torch.tensor(float("inf")), 2, tag=5)
    assert resumed.first_nonfinite() == 3 and resumed.flush(find_nonfinite=True) == 3
    assert resumed.count == 6


def test_values_added_at_once_and_deferred_give_the_same_mean():
    values = [(torch.tensor(0.25), 3), (torch.tensor(1.5), 1), (torch.tensor(-2.0), 5)]
    at_once, deferred = WeightedMean.for_device(torch.device("cpu")), WeightedMean(defer=True)
    assert not at_once.defer
    for value, weight in values:
        at_once.update(value, weight)
        deferred.update(value, weight)
    assert at_once._pending == []  # nothing kept: the CPU value was added at once
    assert at_once.compute() == deferred.compute() == pytest.approx((0.75 + 1.5 - 10) / 9)


@pytest.mark.parametrize("defer", [True, False])
def test_flush_without_the_search_folds_the_same_sum(defer):
    values = [(torch.tensor(0.5), 3), (torch.tensor(1.5), 1)]
    searched, plain = WeightedMean(defer=defer), WeightedMean(defer=defer)
    for value, weight in values:
        searched.update(value, weight)
        plain.update(value, weight)
    assert searched.flush(find_nonfinite=True) is None and plain.flush() is None
    assert searched.compute() == plain.compute() == 0.75
