"""AdaptiveTrainScheduling on a real Trainer: which epochs validate, what the history keeps, who counts what.

No assertion depends on wall-clock time: the callback reads a simulated clock (:class:`SimulatedCost`)
in which each train batch and each validation pass costs a fixed number of seconds.
"""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader

from adaptrain import AdaptiveTrainScheduling, Callback, EarlyStopping, ModelCheckpoint, Trainer
from adaptrain.checkpoint.io import load_checkpoint
from adaptrain.cli.main import main
from adaptrain.core.history import TIMING_KEYS
from tests.cli_data import base_config, write_config
from tests.common import data, models

TRAIN = 96  # samples; batches of 8: 12 iterations an epoch, where OTX validates every 4th epoch
# A validation of 30% of an epoch (3.6 s vs 12 s): every 3rd epoch keeps it under 10%. Its size (72 samples)
# makes the estimate before it ran (1/3 x 72 / 96 = 25%) say every 3rd epoch too.
COSTLY = {"val_cost": 3.6, "val_samples": 72}


class SimulatedCost(Callback):
    """A clock for AdaptiveTrainScheduling: each train batch costs ``batch`` s, each validation ``val`` s."""

    order = -100  # before the scheduler: a validation's cost is on the clock when it reads it

    def __init__(self, batch: float = 1.0, val: float = 1.0) -> None:
        self.batch, self.val, self.now = batch, val, 0.0

    def __call__(self) -> float:
        return self.now

    def after_batch(self, trainer: Trainer) -> None:
        self.now += self.batch

    def after_validate(self, trainer: Trainer) -> None:
        if trainer.state.validated:
            self.now += self.val


class Frozen(nn.Module):
    """Outputs zeros whatever its weights (zero gradients): the val loss never improves, log(3) each time."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x):
        return self.linear(x) * 0.0


def scheduled(val_cost: float, epochs: int, val_samples: int = 24, callbacks=(), model=None, lr=0.1,
              scheduler=None, **options):
    """A trainer with AdaptiveTrainScheduling on a simulated clock (train epoch: 12 s), and its loaders."""
    schedule = AdaptiveTrainScheduling(**options)
    cost = SimulatedCost(batch=1.0, val=val_cost)
    schedule.clock = cost
    model = model if model is not None else models.mlp()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), nn.CrossEntropyLoss(), max_epochs=epochs,
                      scheduler=scheduler, callbacks=[cost, schedule, *callbacks], progress=False, seed=0,
                      device="cpu")
    train = data.loader(data.classification(TRAIN), batch_size=8)
    val = DataLoader(data.classification(val_samples, seed=1), batch_size=24)
    return trainer, schedule, (train, val)


def validated(history) -> list[int]:
    return [r["epoch"] for r in history.records if any(k.startswith("val_") for k in r)]


def test_cheap_validation_runs_every_epoch_where_otx_would_wait_four(capsys):
    trainer, schedule, loaders = scheduled(val_cost=0.6, epochs=6)  # 0.6 s vs a 12 s epoch: 5%
    history = trainer.fit(*loaders)
    assert validated(history) == schedule.validated_epochs == [1, 2, 3, 4, 5, 6]
    assert (schedule.plan.interval, schedule.plan.otx) == (1, 4)
    assert (schedule.train_seconds, schedule.val_seconds, schedule.plan.cost_ratio) == pytest.approx((12, 0.6, 0.05))
    assert history.adaptations == []  # every epoch, as without the callback: nothing changed
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("AdaptiveTrainScheduling")]
    assert len(lines) == 2 and lines[0].startswith("AdaptiveTrainScheduling (estimated from 24 val / 96 train")
    assert lines[1] == ("AdaptiveTrainScheduling (measured): validate every epoch: a validation costs 0.05x a "
                        "training epoch (0.6 s vs 12 s), so every epoch keeps it at 5% of training time (budget "
                        "10%); OTX rule for 12 iterations an epoch says 4")


def test_costly_validation_runs_every_third_epoch_and_always_the_last():
    trainer, schedule, loaders = scheduled(epochs=10, **COSTLY)
    history = trainer.fit(*loaders)
    assert schedule.plan.interval == 3 and schedule.plan.cost_ratio == pytest.approx(0.3)
    assert validated(history) == schedule.validated_epochs == [3, 6, 9, 10]  # 10: the last epoch
    for record in history.records:  # skipped epochs carry no val_ keys at all (no stale copies, no None)
        has_val = [k for k in record if k.startswith("val_")]
        assert has_val == (["val_loss"] if record["epoch"] in (3, 6, 9, 10) else [])
    assert not trainer.state.validated or trainer.state.epoch == 10


def test_measured_cost_replaces_the_estimate_without_skipping_or_doubling():
    # By size the val set (4x the train set) looks costly: every 5th epoch. Measured, it costs 15% of an
    # epoch: from the first validation on, every 2nd epoch, counted from that validation (7, 9, ...), so
    # epoch 6 does not validate right after 5.
    trainer, schedule, loaders = scheduled(val_cost=1.8, epochs=15, val_samples=384)
    history = trainer.fit(*loaders)
    assert validated(history) == [5, 7, 9, 11, 13, 15] and schedule.plan.interval == 2
    # each change recorded like every other adaptation (adaptations.json, "adapted:" lines in train.log)
    changes = [(a["kind"], a["before"], a["after"], a["epoch"]) for a in history.adaptations]
    assert changes == [("validation", {"every_n_epochs": 1}, {"every_n_epochs": 5}, 1),
                       ("validation", {"every_n_epochs": 5}, {"every_n_epochs": 2}, 5)]
    assert history.adaptations[1]["reason"].startswith("AdaptiveTrainScheduling (measured): validate every 2")


def test_a_stop_set_before_validation_still_validates_that_epoch():
    class StopInTraining(Callback):
        def after_train(self, trainer):
            if trainer.state.epoch + 1 == 2:
                trainer.state.should_stop = True

    trainer, schedule, loaders = scheduled(epochs=10, callbacks=[StopInTraining()], **COSTLY)
    assert validated(trainer.fit(*loaders)) == [2]


def test_the_lr_schedule_and_the_training_are_those_of_a_run_validating_every_epoch():
    def train_records(history):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("val_")}
                for r in history.records]

    step = lambda opt: StepLR(opt, step_size=2, gamma=0.5)  # noqa: E731
    adaptive, _, loaders = scheduled(epochs=7, scheduler=step, **COSTLY)
    adaptive_history = adaptive.fit(*loaders)
    assert validated(adaptive_history) == [2, 4, 6, 7]  # 7 epochs: capped at 2 for 3 validations
    model = models.mlp()
    plain = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=7,
                    scheduler=step, progress=False, seed=0, device="cpu")
    plain_history = plain.fit(*loaders)
    assert train_records(adaptive_history) == train_records(plain_history)
    assert [r["lr"] for r in adaptive_history.records] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125]


def test_a_validate_call_outside_fit_is_never_skipped():
    trainer, schedule, (train, val) = scheduled(epochs=10, **COSTLY)
    assert set(trainer.validate(val)) == {"val_loss"}  # before fit: the plan would say "not epoch 1"
    trainer.fit(train, val)
    assert set(trainer.validate(val)) == {"val_loss"} and schedule.validated_epochs == [3, 6, 9, 10]


def test_early_stopping_patience_counts_validations():
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    trainer, schedule, loaders = scheduled(epochs=30, callbacks=[stopper], model=Frozen(), **COSTLY)
    history = trainer.fit(*loaders)
    # Validations at 3 (best), 6, 9: two without improvement. Counting epochs it would stop at epoch 5.
    assert len(history) == 9 and stopper.stopped_epoch == 9 and validated(history) == [3, 6, 9]


def test_plateau_scheduler_patience_counts_validations():
    def plateau(opt):
        return ReduceLROnPlateau(opt, factor=0.1, patience=1)

    trainer, schedule, loaders = scheduled(epochs=12, model=Frozen(), lr=1.0, scheduler=plateau,
                                           **COSTLY)
    history = trainer.fit(*loaders)
    assert validated(history) == [3, 6, 9, 12]
    # Fed at 3 (best), 6 and 9 (two bad validations > patience 1): lowered after epoch 9, not epoch 3.
    assert [r["lr"] for r in history.records] == pytest.approx([1.0] * 9 + [0.1] * 3)


def test_monitored_checkpoints_are_taken_only_after_validations(tmp_path):
    saver = ModelCheckpoint(tmp_path, monitor="val_loss", save_top_k=-1)
    trainer, _, loaders = scheduled(epochs=10, callbacks=[saver], **COSTLY)
    trainer.fit(*loaders)
    named = sorted(int(p.name.split("-")[0].split("=")[1]) for p in tmp_path.glob("epoch=*.ckpt"))
    assert named == [3, 6, 9, 10] and all("val_loss=" in p.name for p in tmp_path.glob("epoch=*.ckpt"))
    assert load_checkpoint(tmp_path / "last.ckpt")["counters"]["epoch"] == 10


@pytest.mark.filterwarnings("ignore:.*holds the state of callback")
def test_a_resumed_run_validates_the_same_epochs(tmp_path):
    reference, _, loaders = scheduled(epochs=10, callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)], **COSTLY)
    expected = reference.fit(*loaders)
    assert validated(expected) == [3, 6, 9, 10]

    def resume(epoch: int, val_cost: float):
        (path,) = tmp_path.glob(f"epoch={epoch}-*.ckpt")
        trainer, schedule, loaders = scheduled(val_cost=val_cost, epochs=10, val_samples=72)
        return trainer.fit(*loaders, ckpt_path=path), schedule

    # Before the first validation: the resumed run measures it as the uninterrupted one did.
    history, _ = resume(2, val_cost=3.6)
    assert validated(history) == [3, 6, 9, 10]
    # After it: the checkpoint's plan holds, even where a new measurement (now cheap) would say every epoch.
    history, schedule = resume(4, val_cost=0.1)
    assert validated(history) == [3, 6, 9, 10] and schedule.val_seconds == pytest.approx(3.6)
    timeless = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history.records]
    assert timeless == [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in expected.records]


def test_on_the_real_clock_the_records_follow_the_plan_and_the_last_epoch_is_validated():
    schedule = AdaptiveTrainScheduling()
    model = models.mlp()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=6,
                      callbacks=[schedule], progress=False, device="cpu")
    history = trainer.fit(data.loader(data.classification(TRAIN), batch_size=8),
                          DataLoader(data.classification(384, seed=1), batch_size=24))
    assert validated(history) == schedule.validated_epochs and schedule.validated_epochs[-1] == 6
    assert schedule.val_seconds is not None and schedule.plan.cost_ratio is not None


@pytest.mark.parametrize("options, named", [
    ({"budget": 0}, "budget is 0; expected a fraction in (0, 1]"),
    ({"budget": 1.5}, "budget is 1.5"),
    ({"max_interval": 0}, "max_interval is 0; expected an int >= 1"),
    ({"max_interval": True}, "max_interval is True"),
    ({"min_validations": "3"}, "min_validations is '3'"),
])
def test_bad_options_are_named_at_construction(options, named):
    with pytest.raises(ValueError, match="^AdaptiveTrainScheduling: " + named.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        AdaptiveTrainScheduling(**options)


# ---------------------------------------------------------------------- from a YAML config
def test_yaml_callback_through_the_cli(tmp_path, capsys):
    callback = {"class_path": "adaptrain.AdaptiveTrainScheduling",
                "init_args": {"budget": 0.05, "max_interval": 2, "min_validations": 1}}
    config = base_config(tmp_path / "runs", callbacks=[callback])
    config["trainer"]["max_epochs"] = 3
    code = main(["fit", "--config", str(write_config(tmp_path / "run.yaml", config)), "run_name=r"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.count("AdaptiveTrainScheduling (") == 2 and "(budget 5%" in out
    rows = list(csv.DictReader(open(tmp_path / "runs/tiny/r/history.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"] and rows[-1]["val_loss"] != ""

    config["callbacks"][0]["init_args"]["budget"] = 0
    code = main(["fit", "--config", str(write_config(tmp_path / "bad.yaml", config)), "run_name=bad"])
    err = capsys.readouterr().err
    assert code == 2 and "callbacks.0" in err and "budget is 0" in err
    assert not (tmp_path / "runs/tiny/bad").exists()
