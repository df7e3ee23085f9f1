import pytest
import torch
from torch import nn

from adaptrain import MultiLoss
from adaptrain.core.losses import as_criterion, split_loss


def test_multiloss_weights_and_parts():
    loss = MultiLoss({"a": nn.MSELoss(), "b": nn.L1Loss()}, weights={"b": 2.0})
    out = loss({"a": torch.zeros(3), "b": torch.zeros(3)}, {"a": torch.ones(3), "b": torch.full((3,), 2.0)})
    assert out["loss_a"] == 1.0 and out["loss_b"] == 2.0 and out["loss"] == 5.0


def test_multiloss_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"keys \['c'\] have no loss"):
        MultiLoss({"a": nn.MSELoss()}, weights={"c": 1.0})
    with pytest.raises(ValueError, match="expected 2 weights; received 1"):
        MultiLoss([nn.MSELoss(), nn.MSELoss()], weights=[1.0])
    with pytest.raises(ValueError, match="output 'b' has no match"):
        MultiLoss({"b": nn.MSELoss()})({"a": torch.zeros(2)}, {"a": torch.zeros(2)})


def test_split_loss_forms():
    t = torch.tensor(2.0)
    assert split_loss(t) == (t, {})
    total, parts = split_loss({"x": torch.tensor(1.0), "y": torch.tensor(2.0)})
    assert total == 3.0 and set(parts) == {"loss_x", "loss_y"}
    with pytest.raises(TypeError, match="expected a scalar tensor or a dict"):
        split_loss(3.0)
    with pytest.raises(TypeError, match="expected a callable loss"):
        as_criterion(5)


def test_a_tuple_output_is_selected_by_an_int_or_by_its_digits_as_yaml_gives_them():
    from adaptrain.core.batching import select

    outputs = (torch.zeros(2), torch.ones(2))
    assert torch.equal(select(outputs, 1), outputs[1]) and torch.equal(select(outputs, "1"), outputs[1])
    assert select({"1": "a"}, "1") == "a"  # a dict keeps its string keys
