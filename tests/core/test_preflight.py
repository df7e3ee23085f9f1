"""What a new user gets wrong, caught before the first step, with the culprit named."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import Callback, ConfigError, EarlyStopping, MetricError, ModelCheckpoint, Trainer
from adaptrain.core.preflight import schedule_too_long, slow_cpu_precision
from adaptrain.core.state import rng_state
from adaptrain.data.loaders import loader_rng_state
from tests.common import data, models


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def after_step(self, trainer: Trainer) -> None:
        self.steps += 1


def make(model=None, **kwargs) -> Trainer:
    model = model or models.mlp()
    kwargs.setdefault("progress", False)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), kwargs.pop("criterion", nn.CrossEntropyLoss()),
                   device="cpu", **kwargs)


def loader(n=32, features=8, batch_size=8, shuffle=False):
    return data.loader(data.classification(n=n, features=features), batch_size=batch_size, shuffle=shuffle)


def test_an_optimizer_over_another_models_parameters_is_refused():
    model = models.mlp()
    stale = torch.optim.SGD(models.mlp().parameters(), lr=0.1)  # the notebook slip: model cell re-run
    with pytest.raises(ValueError, match=r"none of the optimizer's 4 parameters belong to the model \(Sequential\)"):
        Trainer(model, stale, nn.CrossEntropyLoss())


def test_trainable_parameters_left_out_of_the_optimizer_are_named():
    model = models.mlp()
    with pytest.warns(UserWarning, match=r"2 trainable parameter\(s\) of the model are not in the optimizer and will "
                                         r"never change: 2\.weight, 2\.bias"):
        Trainer(model, torch.optim.SGD(model[0].parameters(), lr=0.1), nn.CrossEntropyLoss())
    model[2].requires_grad_(False)  # frozen on purpose: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(model, torch.optim.SGD(model[0].parameters(), lr=0.1), nn.CrossEntropyLoss())


def test_a_one_cycle_planned_for_more_steps_than_the_run_warns_before_the_first_step():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train = loader(n=64)  # 8 batches; accumulation 4 -> 2 optimizer steps per epoch
    # seed 001's notebook: steps_per_epoch=len(loader) although accumulation divides the steps
    cycle = OneCycleLR(optimizer, max_lr=0.1, epochs=3, steps_per_epoch=len(train))
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler=cycle, max_epochs=3, device="cpu",
                      accumulate_grad_batches=4, progress=False, callbacks=[counter := CountSteps()])
    with pytest.warns(UserWarning, match=r"OneCycleLR planned for 24 optimizer steps, but this run takes 6 \(2 per "
                                         r"epoch\); it will stop at 25% of its schedule with the lr still rising"):
        trainer.fit(train)
    assert counter.steps == 6
    assert schedule_too_long(cycle, 24, 8, "step") is None  # exactly as long: fine
    factory = make(scheduler=functools.partial(OneCycleLR, max_lr=0.1), max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        factory.fit(loader())  # a factory is built for the run's own length: silent


def test_a_monitor_typo_fails_before_the_first_step():
    for callback in (ModelCheckpoint(monitor="val_los", save_last=False), EarlyStopping(monitor="val_acc")):
        counter = CountSteps()
        trainer = make(callbacks=[callback, counter], max_epochs=2)
        with pytest.raises(ConfigError, match=r'is "val_(los|acc)", which no loader produces; available: '
                                              r"\['train_loss', 'val_loss'\]"):
            trainer.fit(loader(), loader())
        assert counter.steps == 0


def test_a_val_loader_whose_shapes_do_not_fit_fails_before_the_first_step():
    counter = CountSteps()
    trainer = make(callbacks=[counter])
    with pytest.raises(RuntimeError, match=r"the model \(Sequential\) failed on inputs Tensor\(8, 5\) from val_loader"):
        trainer.fit(loader(), loader(features=5))
    assert counter.steps == 0


def test_the_sanity_pass_leaves_every_rng_and_the_val_loaders_generator_as_it_was():
    trainer = make()
    val = loader(shuffle=True)
    unseeded = DataLoader(data.classification(n=32), batch_size=8, shuffle=True)  # shuffles from the global RNG
    trainer.state.val_loader = unseeded
    before = rng_state()
    trainer._sanity_check()
    assert torch.equal(before["torch"], rng_state()["torch"])  # iter() drew a seed from it; it was put back
    trainer.state.val_loader = val
    before, before_loader = rng_state(), loader_rng_state(val)
    assert trainer._sanity_check() == ["val_loss"]
    after = rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert torch.equal(before["numpy"]["keys"], after["numpy"]["keys"])
    assert all(torch.equal(a, b) for a, b in zip(before_loader, loader_rng_state(val)))


def test_an_empty_val_loader_warns():
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.warns(UserWarning, match="the val loader yielded no batches"):
        make().fit(loader(), empty)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"metrics": {"acc": lambda out, y: (out.argmax(1) == y).float()}}, MetricError,
     r"metric 'acc' \(<lambda>\) raised ValueError: it returned a tensor of shape \[8\]; expected one number"),
    ({"criterion": nn.CrossEntropyLoss(reduction="none")}, ValueError,
     r"the criterion \(CrossEntropyLoss\) returned a loss of shape \[8\] from train_loader; expected a scalar"),
    ({"metrics": [lambda out, y: out.sum()]}, TypeError, r"Trainer\(metrics=...\): expected a dict of name -> metric"),
    ({"device": "mps"}, ValueError, r'Trainer\(device="mps"\): MPS \(Apple GPU\) is not available'),
])
def test_mistakes_name_the_culprit(kwargs, error, message):
    if kwargs.get("device") == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(error, match=message):
        model = models.mlp()
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), kwargs.pop("criterion", nn.CrossEntropyLoss()),
                progress=False, **{"device": "cpu", **kwargs}).fit(loader())


def test_predict_on_a_two_input_model_says_how_to_batch_its_inputs():
    class TwoIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, a, b):
            return self.lin(a + b)

    trainer = make(TwoIn())
    x1, x2 = torch.randn(8, 8), torch.randn(8, 8)
    with pytest.raises(TypeError, match=r"predict: the model \(TwoIn\) failed on inputs Tensor\(4, 8\): .*read as "
                                        r"\(inputs, targets\); for a model with two inputs, give batches as \(\(x1, x2\),\)"):
        trainer.predict(DataLoader(TensorDataset(x1, x2), batch_size=4))
    assert trainer.predict([((x1, x2),)]).shape == (8, 3)


def test_fast_dev_run_trains_and_validates_a_few_batches_end_to_end():
    counter = CountSteps()
    seen = []

    class Val(Callback):
        def after_validate(self, trainer):
            seen.append(trainer.state.epoch_logs["val_loss"])

    trainer = make(callbacks=[counter, Val()], max_epochs=50, fast_dev_run=2)
    history = trainer.fit(loader(n=400), loader(n=400))
    assert counter.steps == 2 and len(history.records) == 1 and len(seen) == 1
    assert trainer.state.samples_seen == 16
    with pytest.raises(ConfigError, match=r"Trainer\(fast_dev_run=0\): expected True, False or a number of batches"):
        make(fast_dev_run=0)


def test_slow_cpu_precisions_are_named():
    assert "no fast float16 kernels" in slow_cpu_precision("16-mixed")
    assert slow_cpu_precision("32") is None


def test_the_sanity_pass_starts_no_persistent_workers_before_the_signal_handler_sets_them_up():
    val = DataLoader(data.classification(n=32), batch_size=8, num_workers=1, persistent_workers=True)
    trainer = make()
    trainer.state.val_loader = val
    assert trainer._sanity_check() == ["val_loss"]
    assert val._iterator is None  # the pass read a non-persistent copy; this loader forked nothing yet


def nan_val_loader():
    x = torch.randn(16, 8)
    x[3] = float("nan")  # a NaN in the val data: the weights stay finite
    return DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8)


def test_a_nan_validation_value_raises_under_nan_policy_raise():
    from adaptrain import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"validation at epoch 1 gave non-finite val_loss"):
        make(max_epochs=2).fit(loader(), nan_val_loader())


def test_under_nan_policy_skip_a_nan_validation_warns_and_is_never_the_best_checkpoint(tmp_path):
    saver = ModelCheckpoint(tmp_path, monitor="val_loss", save_top_k=1)
    with pytest.warns(UserWarning, match=r"validation at epoch 1 gave non-finite val_loss.*no checkpoint ranks it"):
        make(max_epochs=2, nan_policy="skip", callbacks=[saver]).fit(loader(), nan_val_loader())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no "val_loss=nan" file kept as best


@pytest.mark.parametrize("call, argument", [
    (lambda t, ds: t.fit(ds), "fit(train_loader=...)"),
    (lambda t, ds: t.fit(DataLoader(ds, batch_size=8), ds), "fit(val_loader=...)"),
    (lambda t, ds: t.lr_find(ds, num_steps=5), "lr_find(train_loader=...)"),
    (lambda t, ds: t.tune(ds, budget=1), "tune(train_loader=...)"),
    (lambda t, ds: t.validate(ds), "validate(loader=...)"),
    (lambda t, ds: t.test(ds), "test(loader=...)"),
    (lambda t, ds: t.predict(ds), "predict(loader=...)"),
])
def test_a_data_set_passed_as_a_loader_is_named_before_any_step(call, argument):
    """Iterated directly, a TensorDataset yields single samples: the model would fail on a missing batch
    dimension, with a message that hides why."""
    trainer = make()
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(TypeError) as error:
        call(trainer, data.classification(32))
    assert str(error.value).startswith(f"{argument}: received a TensorDataset, a data set (one sample per index)")
    assert "DataLoader(dataset, batch_size=...)" in str(error.value)
    assert trainer.state.global_step == 0 and trainer.state.history.records == []
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))


class BatchesByIndex(torch.utils.data.Dataset):
    """A data set that says how it iterates: whole batches (the loader check must let it through)."""

    def __init__(self) -> None:
        self.data = data.classification(32)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index):
        return self.data[index * 8:(index + 1) * 8]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def test_a_data_set_that_defines_its_iteration_and_an_iterable_data_set_are_loaders():
    trainer = make(max_epochs=1)
    trainer.fit(BatchesByIndex())
    assert trainer.state.global_step == 4

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(BatchesByIndex())

    assert trainer.validate(Stream())["val_loss"] > 0
