"""One rule table for trainer settings: Trainer(...) and the CLI's config checks say the same thing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptrain import ConfigError, Trainer
from adaptrain.core.precision import MixedPrecision
from adaptrain.core.settings import MAX_EPOCHS, TRAINER_RULES, check_setting


@pytest.mark.parametrize(("name", "good", "bad", "message"), [
    ("accumulate_grad_batches", 4, 0, "expected an integer >= 1"),
    ("accumulate_grad_batches", 4, True, "expected an integer >= 1"),
    ("max_epochs", MAX_EPOCHS, MAX_EPOCHS + 1, f"expected an integer <= {MAX_EPOCHS} (more than any run reaches)"),
    ("max_epochs", 1, 10**29, "expected an integer <= "),
    ("seed", 0, 10**30, "expected an integer from 0 to 9223372036854775807 or None"),
    ("seed", None, -1, "expected an integer from 0"),
    ("precision", "bf16-mixed", "fp8", 'expected one of "32", "16-mixed", "bf16-mixed"'),
    ("nan_policy", "skip", "ignore", 'expected "raise" or "skip"'),
    ("gradient_clip_val", None, 0, "expected a positive number or None"),
])
def test_each_rule_accepts_and_rejects(name, good, bad, message):
    assert check_setting(name, good) is None
    assert check_setting(name, bad).startswith(message)


def test_the_trainer_raises_from_the_table_with_the_setting_named():
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigError, match=r"^Trainer\(max_epochs=100000000000000000000\): expected an integer <= ") as error:
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), max_epochs=10**20)
    assert error.value.field == "max_epochs"  # the CLI reports it as trainer.max_epochs
    assert set(TRAINER_RULES) >= {"precision", "accumulate_grad_batches", "max_epochs", "log_every_n_steps",
                                  "gradient_clip_val", "nan_policy", "seed"}


def test_a_precision_plugin_instance_is_used_as_it_is():
    model = nn.Linear(2, 1)
    plugin = MixedPrecision(torch.device("cpu"), torch.bfloat16)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), precision=plugin,
                      progress=False, device="cpu")
    assert trainer.precision is plugin and trainer.state.precision is plugin and trainer.precision_name == "bf16-mixed"
