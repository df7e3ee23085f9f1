"""WeightedMean: the first NaN/Inf among the pending values is found exactly, whatever the weights."""

from __future__ import annotations

import math

import pytest
import torch

from adaptrain.core.metrics import WeightedMean


@pytest.mark.parametrize("bad, weight", [(float("nan"), 3), (float("inf"), 3), (float("-inf"), 3),
                                         (float("nan"), 0), (float("inf"), 0)])
def test_flush_names_the_first_nonfinite_value(bad, weight):
    mean = WeightedMean()
    for tag, (value, w) in enumerate([(1.0, 2), (bad, weight), (2.0, 1), (float("nan"), 1)], start=1):
        mean.update(torch.tensor(value), w, tag=tag)
    assert mean.flush(find_nonfinite=True) == 2
    assert mean.flush(find_nonfinite=True) is None  # nothing pending any more


def test_flush_of_finite_values_finds_nothing_even_when_their_sum_overflows():
    mean = WeightedMean()
    mean.update(torch.tensor(3e38), 64, tag=1)  # finite, but 3e38 * 64 is inf in float32
    mean.update(torch.tensor(1.0), 1, tag=2)
    assert mean.flush(find_nonfinite=True) is None
    assert math.isinf(mean.compute())


def test_flush_without_the_search_folds_the_same_sum():
    values = [(torch.tensor(0.5), 3), (torch.tensor(1.5), 1)]
    searched, plain = WeightedMean(), WeightedMean()
    for value, weight in values:
        searched.update(value, weight)
        plain.update(value, weight)
    assert searched.flush(find_nonfinite=True) is None and plain.flush() is None
    assert searched.compute() == plain.compute() == 0.75
