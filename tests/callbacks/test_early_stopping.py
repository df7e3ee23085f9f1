from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptrain import ConfigError, EarlyStopping, Trainer
from adaptrain.callbacks.early_stopping import improved
from tests.common import data, models


def test_improved_respects_mode_and_min_delta():
    assert improved(0.5, None, "min", 0.0)
    assert improved(0.5, 0.6, "min", 0.05) and not improved(0.56, 0.6, "min", 0.05)
    assert improved(0.7, 0.6, "max", 0.05) and not improved(0.64, 0.6, "max", 0.05)
    assert not improved(float("nan"), 0.6, "min", 0.0)


def _trainer(stopper, lr=0.0, epochs=10):
    model = models.mlp()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), nn.CrossEntropyLoss(), max_epochs=epochs,
                   callbacks=[stopper], progress=False)


def test_stops_after_patience_validations_without_improvement():
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    loader = data.loader(data.classification(32), batch_size=8)
    trainer = _trainer(stopper, lr=0.0)  # nothing changes: epoch 1 sets best, epochs 2-3 do not improve
    history = trainer.fit(loader, loader)
    assert len(history) == 3 and trainer.state.should_stop
    assert "EarlyStopping" in trainer.state.stop_reason and stopper.stopped_epoch == 3
    assert stopper.state_dict() == {"best": history["val_loss"][0], "wait": 2, "stopped_epoch": 3}


def test_keeps_training_while_improving():
    stopper = EarlyStopping(monitor="train_loss", patience=1)
    history = _trainer(stopper, lr=0.1, epochs=5).fit(data.loader(data.classification(64), batch_size=8))
    assert len(history) == 5


def test_monitoring_a_value_no_loader_produces_is_a_clear_error():
    loader = data.loader(data.classification(32), batch_size=8)
    with pytest.raises(ConfigError, match='EarlyStopping\\(monitor=...\\) is "val_los".*Did you mean "val_loss"'):
        _trainer(EarlyStopping(monitor="val_los")).fit(loader, loader)


def test_val_monitor_without_val_loader_fails_before_training():
    trainer = _trainer(EarlyStopping(monitor="val_loss"))
    with pytest.raises(ConfigError, match="got no val_loader"):
        trainer.fit(data.loader(data.classification(32), batch_size=8))
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("kwargs", [{"mode": "avg"}, {"patience": 0}, {"min_delta": -1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="EarlyStopping"):
        EarlyStopping(**kwargs)
