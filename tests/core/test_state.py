"""TrainState: snapshot / restore in memory, and checkpoint contents built from the state alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn

from adaptrain import Callback, Trainer
from tests.common import data


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def make_trainer(precision: str = "32", **kwargs) -> Trainer:
    model = bn_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    return Trainer(model, optimizer, nn.CrossEntropyLoss(), progress=False, seed=0, device="cpu",
                   precision=precision, scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
                   metrics={"acc": torchmetrics.classification.MulticlassAccuracy(3, average="micro")}, **kwargs)


def everything(trainer: Trainer) -> dict:
    """Every piece of state a trial could disturb, copied."""
    state = trainer.state
    return {
        "model": {k: v.clone() for k, v in state.model.state_dict().items()},  # BatchNorm running stats included
        "optimizer": [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in state.optimizer.state.values()],
        "lr": [g["lr"] for g in state.optimizer.param_groups],
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.precision.state_dict(),
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "numpy_rng": np.random.get_state()[1].copy(),
        "counters": state.counters(), "history": [dict(r) for r in state.history.records],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["optimizer"]) == len(b["optimizer"])
    for sa, sb in zip(a["optimizer"], b["optimizer"]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr"] == b["lr"] and a["scheduler"] == b["scheduler"] and a["counters"] == b["counters"]
    assert str(a["scaler"]) == str(b["scaler"]) and a["history"] == b["history"]
    assert torch.equal(a["torch_rng"], b["torch_rng"]) and a["python_rng"] == b["python_rng"]
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"])


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_restore_puts_back_weights_optimizer_scheduler_scaler_rng_and_batchnorm_exactly(precision):
    trainer = make_trainer(precision, max_epochs=2)
    train = data.loader(data.classification(n=64), batch_size=16, shuffle=True)
    trainer.fit(train)
    before = everything(trainer)
    saved = trainer.state.snapshot()

    trainer.state.max_epochs = 4  # a "trial": two more epochs change every piece of state
    trainer.fit(train)
    random.random(), np.random.rand()
    disturbed = everything(trainer)
    assert not torch.equal(disturbed["model"]["1.running_mean"], before["model"]["1.running_mean"])
    assert disturbed["counters"] != before["counters"]

    trainer.state.restore(saved)
    trainer.state.max_epochs = 2
    assert_same(everything(trainer), before)
    trainer.state.restore(saved)  # a snapshot can be restored more than once
    assert_same(everything(trainer), before)


def test_a_restored_trainer_continues_exactly_like_one_that_never_ran_the_trial():
    def loader():  # each run its own: the loader's generator is part of what a trial disturbs
        return data.loader(data.classification(n=64), batch_size=16, shuffle=True)

    reference, ref_train = make_trainer(max_epochs=1), loader()
    reference.fit(ref_train)
    reference.state.max_epochs = 3
    reference.fit(ref_train)  # fit() seeds again: the trial's run below does the same two calls

    train = loader()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(train)
    saved = trainer.state.snapshot()
    trainer.state.max_epochs = 2
    trainer.fit(train)  # the trial
    trainer.state.restore(saved)
    trainer.state.max_epochs = 3
    trainer.fit(train)
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(),
                                                  reference.model.state_dict().values()))
    assert trainer.state.history["train_loss"] == reference.state.history["train_loss"]


class SnapshotMidEpoch(Callback):
    def __init__(self) -> None:
        self.saved = None

    def after_step(self, trainer: Trainer) -> None:
        if trainer.state.global_step == 2 and self.saved is None:
            self.saved = trainer.state.snapshot()
            self.running = trainer.state.train_sums.values()


def test_a_mid_epoch_snapshot_holds_the_running_sums():
    grab = SnapshotMidEpoch()
    trainer = make_trainer(max_epochs=1, callbacks=[grab])
    trainer.fit(data.loader(data.classification(n=64), batch_size=16))
    assert grab.saved["progress"] is not None and grab.saved["counters"]["epoch_samples"] == 32
    trainer.state.restore(grab.saved)
    assert trainer.state.train_sums.values() == grab.running
    assert (trainer.state.batch_idx, trainer.state.epoch_samples, trainer.state.samples_seen) == (2, 32, 32)


def test_checkpoint_contents_come_from_the_state_alone():
    trainer = make_trainer(max_epochs=1)
    trainer.fit(data.loader(data.classification(n=48), batch_size=16))
    contents = trainer.state.state_dict()
    assert set(contents) == {"meta", "model", "optimizer", "scheduler", "precision", "counters", "history", "rng",
                             "callbacks", "progress"}
    assert contents["counters"]["samples_seen"] == 48 and contents["meta"]["precision"] == "32"


def test_a_cpu_snapshot_holds_host_copies_and_restores_exactly():
    from adaptrain import Trainer

    model = torch.nn.Linear(3, 2)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.1), torch.nn.MSELoss(), progress=False,
                      device="cpu")
    trainer.run_step((torch.randn(4, 3), torch.randn(4, 2)))
    saved = trainer.state.snapshot(device="cpu")
    assert saved["model"]["weight"].data_ptr() != model.weight.data_ptr()  # a copy, not a reference
    exp_avg = saved["optimizer"]["state"][0]["exp_avg"].clone()
    trainer.run_step((torch.randn(4, 3), torch.randn(4, 2)))
    trainer.state.restore(saved)
    assert torch.equal(model.weight, saved["model"]["weight"])
    assert torch.equal(trainer.state.optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
