"""The core loop: model structures, schedulers, metrics, accumulation, precision, errors, syncs."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torchmetrics
from rich.console import Console
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau, StepLR
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import (
    BatchStructureError,
    Callback,
    ConfigError,
    MetricError,
    MultiLoss,
    NonFiniteLossError,
    ProgressBar,
    Trainer,
    seed_everything,
)
from adaptrain.core.metrics import WeightedMean
from tests.common import data, models


def make_trainer(model=None, lr=0.1, **kwargs):
    model = model or models.mlp()
    optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=lr)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("seed", 0)
    return Trainer(model, optimizer, kwargs.pop("criterion", nn.CrossEntropyLoss()), **kwargs)


# ---------------------------------------------------------------- model structures
def test_single_input_single_output_learns():
    train = data.loader(data.classification(192), batch_size=32, shuffle=True)
    trainer = make_trainer(max_epochs=15, metrics={"acc": torchmetrics.classification.MulticlassAccuracy(3, average="micro")})
    history = trainer.fit(train, train)
    assert history["train_loss"][-1] < history["train_loss"][0] * 0.7
    assert history["val_acc"][-1] > 0.7
    assert set(history.records[0]) >= {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                                       "epoch_time", "samples_per_s"}


def test_tuple_outputs_with_per_output_losses_record_each_part():
    x, y = data.classification(64).tensors
    ds = TensorDataset(x, y, x[:, 0])
    loader = DataLoader([(a, (b, c)) for a, b, c in ds], batch_size=16)
    criterion = MultiLoss([nn.CrossEntropyLoss(), nn.MSELoss()], weights=[1.0, 0.5])
    trainer = make_trainer(models.TupleOut(), criterion=criterion, max_epochs=2,
                           metrics={0: {"acc": lambda o, t: (o.argmax(1) == t).float().mean()}})
    record = trainer.fit(loader, loader).records[-1]
    assert record["train_loss"] == pytest.approx(record["train_loss_0"] + 0.5 * record["train_loss_1"], rel=1e-5)
    assert record["val_loss"] == pytest.approx(record["val_loss_0"] + 0.5 * record["val_loss_1"], rel=1e-5)
    assert 0.0 <= record["val_0_acc"] <= 1.0


@pytest.mark.parametrize("as_dict_inputs", [True, False])
def test_multiple_inputs_dict_outputs(as_dict_inputs):
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(48, 4, generator=g), torch.randn(48, 4, generator=g)
    targets = {"cls": (left[:, 0] > 0).long(), "reg": right.sum(1)}
    samples = [({"left": left[i], "right": right[i]} if as_dict_inputs else (left[i], right[i]),
                {"cls": targets["cls"][i], "reg": targets["reg"][i]}) for i in range(48)]
    loader = DataLoader(samples, batch_size=12)
    trainer = make_trainer(models.DictInDictOut(), criterion={"cls": nn.CrossEntropyLoss(), "reg": nn.MSELoss()},
                           max_epochs=3, lr=0.05)
    history = trainer.fit(loader)
    assert history["train_loss_reg"][-1] < history["train_loss_reg"][0]
    prediction = trainer.predict(loader)
    assert prediction["cls"].shape == (48, 3) and prediction["reg"].shape == (48,)


# ---------------------------------------------------------------- schedulers
def test_onecycle_factory_gets_total_steps_from_loader_epochs_and_accumulation():
    train = data.loader(data.classification(100), batch_size=10)  # 10 batches -> 4 steps/epoch with N=3
    trainer = make_trainer(max_epochs=3, accumulate_grad_batches=3,
                           scheduler=functools.partial(OneCycleLR, max_lr=0.5))
    trainer.fit(train)
    scheduler = trainer.state.scheduler
    assert scheduler.total_steps == 12 and trainer.state.global_step == 12
    assert scheduler.last_epoch == 12  # stepped once per optimizer step, never past the end
    assert trainer.state.history["lr"][-1] < 0.5 * 1e-3  # the lr of the last step: the annealed end


def test_onecycle_instance_too_short_fails_before_training():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = OneCycleLR(optimizer, max_lr=0.1, total_steps=5)
    before = copy.deepcopy(model.state_dict())
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler=scheduler, max_epochs=2, progress=False)
    with pytest.raises(ConfigError, match="total_steps=5.*12 optimizer steps"):
        trainer.fit(data.loader(data.classification(96), batch_size=16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_epoch_scheduler_steps_once_per_epoch():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler=StepLR(optimizer, step_size=1, gamma=0.5),
                      max_epochs=3, progress=False)
    history = trainer.fit(data.loader(data.classification(32), batch_size=8))
    assert history["lr"] == [1.0, 0.5, 0.25]


def test_reduce_on_plateau_is_fed_its_monitored_value():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)  # val_loss cannot improve: a plateau
    plateau = ReduceLROnPlateau(optimizer, patience=0, factor=0.5)
    seen = []

    class Spy(Callback):
        def after_epoch(self, trainer):
            seen.append(plateau.best)

    loader = data.loader(data.classification(32), batch_size=8)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), scheduler={"scheduler": plateau, "monitor": "val_loss"},
                      max_epochs=3, progress=False, callbacks=[Spy()])
    history = trainer.fit(loader, loader)
    assert seen[0] == pytest.approx(history["val_loss"][0])  # the scheduler saw exactly this value
    assert history["lr"][0] == 1e-6 and history["lr"][-1] == pytest.approx(5e-7)


def test_reduce_on_plateau_with_unknown_monitor_names_it():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = data.loader(data.classification(32), batch_size=8)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), max_epochs=1, progress=False,
                      scheduler={"scheduler": ReduceLROnPlateau(optimizer), "monitor": "val_acc"})
    with pytest.raises(ConfigError, match='scheduler.monitor is "val_acc"'):
        trainer.fit(loader, loader)


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose step must be skipped."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_scheduler_does_not_step_when_the_scaler_skips_the_step():
    class Explode(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return _InfGrad.apply(self.lin(x))

    model = Explode()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), precision="16-mixed", max_epochs=1,
                      scheduler=functools.partial(OneCycleLR, max_lr=0.1), progress=False)
    before = copy.deepcopy(model.state_dict())
    trainer.fit(data.loader(data.classification(32), batch_size=8))
    assert trainer.state.skipped_steps == trainer.state.global_step == 4
    assert trainer.state.scheduler.last_epoch == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- metrics
def test_callable_metrics_are_weighted_by_batch_size_when_the_last_batch_is_smaller():
    x, y = data.classification(50).tensors  # batches of 16, 16, 16, 2
    model = models.mlp()
    mae = lambda o, t: (o.argmax(1) == t).float().mean()  # noqa: E731
    trainer = make_trainer(model, lr=0.0, metrics={"acc": mae,
                                                   "tm_acc": torchmetrics.classification.MulticlassAccuracy(3, average="micro")})
    result = trainer.validate(data.loader(TensorDataset(x, y), batch_size=16))
    with torch.no_grad():
        exact = (model(x).argmax(1) == y).float().mean().item()
        exact_loss = nn.functional.cross_entropy(model(x), y).item()
    assert result["val_acc"] == pytest.approx(exact, abs=1e-6)
    assert result["val_tm_acc"] == pytest.approx(exact, abs=1e-6)
    assert result["val_loss"] == pytest.approx(exact_loss, rel=1e-5)
    batch_means = [(model(x[i:i + 16]).argmax(1) == y[i:i + 16]).float().mean().item() for i in range(0, 50, 16)]
    assert sum(batch_means) / len(batch_means) != pytest.approx(exact, abs=1e-6)  # the wrong way differs here


def test_metric_that_raises_is_named():
    def broken(outputs, targets):
        raise ValueError("boom")

    trainer = make_trainer(metrics={"broken_metric": broken})
    with pytest.raises(MetricError, match="'broken_metric'.*boom.*Tensor\\(16, 3\\)"):
        trainer.fit(data.loader(data.classification(32)))


# ---------------------------------------------------------------- accumulation
def _grads_after_one_window(batch_sizes, accumulate, clip=None):
    """Grads of the first optimizer step, captured in before_step, and of one big batch."""
    x, y = data.regression(sum(batch_sizes)).tensors
    batches = []
    start = 0
    for size in batch_sizes:
        batches.append((x[start:start + size], y[start:start + size]))
        start += size
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    reference = copy.deepcopy(model)
    captured = {}

    class Capture(Callback):
        def before_step(self, trainer):
            if not captured:
                captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), accumulate_grad_batches=accumulate,
                      gradient_clip_val=clip, progress=False, callbacks=[Capture()])
    trainer.fit(batches)
    window = sum(batch_sizes[:accumulate])
    nn.MSELoss()(reference(x[:window]), y[:window]).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    return captured, {n: p.grad for n, p in reference.named_parameters()}


def test_accumulation_equals_one_big_batch():
    got, expected = _grads_after_one_window([8, 8, 8, 8], accumulate=4)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_short_last_window_is_scaled_by_its_true_size():
    # 3 batches with accumulate=4: the only window is short and its batches unequal.
    got, expected = _grads_after_one_window([8, 8, 3], accumulate=4)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_accumulation_with_clipping_clips_the_full_window_gradient():
    got, expected = _grads_after_one_window([8, 8, 8], accumulate=3, clip=0.01)
    total = torch.sqrt(sum(g.pow(2).sum() for g in got.values()))
    assert total == pytest.approx(0.01, rel=1e-4)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)


def test_scheduler_counts_optimizer_steps_not_batches():
    trainer = make_trainer(max_epochs=2, accumulate_grad_batches=4)
    trainer.fit(data.loader(data.classification(80), batch_size=8))  # 10 batches -> 3 steps per epoch
    assert trainer.state.global_step == 6 and trainer.state.steps_per_epoch == 3


# ---------------------------------------------------------------- precision
def test_bf16_mixed_trains_on_cpu():
    trainer = make_trainer(precision="bf16-mixed", max_epochs=3)
    history = trainer.fit(data.loader(data.classification(64)))
    assert history["train_loss"][-1] < history["train_loss"][0]


@pytest.mark.parametrize("bad", ["fp8", "16", "bf16"])
def test_unknown_precision_is_rejected_with_the_valid_names(bad):
    with pytest.raises(ValueError, match=f'precision="{bad}".*"32", "16-mixed", "bf16-mixed"'):
        make_trainer(precision=bad)


@pytest.mark.gpu
def test_16_mixed_on_cuda_uses_a_scaler_and_learns():
    trainer = make_trainer(precision="16-mixed", max_epochs=3, device="cuda")
    history = trainer.fit(data.loader(data.classification(64)))
    assert trainer.state.precision.scaler is not None
    assert history["train_loss"][-1] < history["train_loss"][0]


# ---------------------------------------------------------------- syncs and efficiency defaults
class SyncCounter(TorchFunctionMode):
    """Counts calls that copy a value from device to host."""

    NAMES = {"item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("refresh", [5, 40])
def test_no_host_sync_per_step(refresh, monkeypatch):
    # As on an accelerator, where reading a value is a sync: the sums keep the values (the CPU reads at once).
    monkeypatch.setattr(WeightedMean, "for_device", staticmethod(lambda device: WeightedMean(defer=True)))
    loader = data.loader(data.classification(640), batch_size=8)  # 80 batches
    trainer = make_trainer(max_epochs=1, log_every_n_steps=refresh,
                           metrics={"acc": lambda o, t: (o.argmax(1) == t).float().mean()})
    counter = SyncCounter()
    with counter:
        trainer.fit(loader)
    reads_per_refresh = 3  # first-NaN check, loss, one metric
    assert counter.count <= (80 // refresh + 1) * reads_per_refresh + 2


def test_on_the_cpu_values_are_read_as_their_step_commits_and_give_the_deferred_sums():
    # A CPU value is read at no sync cost; reading it at once is cheaper than folding it later.
    def fit(defer):
        with pytest.MonkeyPatch.context() as patch:
            if defer:
                patch.setattr(WeightedMean, "for_device", staticmethod(lambda device: WeightedMean(defer=True)))
            trainer = make_trainer(max_epochs=2, log_every_n_steps=40,
                                   metrics={"acc": lambda o, t: (o.argmax(1) == t).float().mean()})
            counter = SyncCounter()
            with counter:
                history = trainer.fit(data.loader(data.classification(640), batch_size=8))  # 80 batches
        return counter.count, history

    reads_at_once, at_once = fit(defer=False)
    reads_deferred, deferred = fit(defer=True)
    assert reads_at_once >= 2 * 80 * 2  # the loss and the metric of every batch, 2 epochs
    assert reads_deferred < 2 * 80
    for key in ("train_loss", "train_acc"):
        assert at_once[key] == pytest.approx(deferred[key], rel=1e-6)  # float64 vs float32 sums


def test_gradients_set_to_none_and_eval_in_inference_mode():
    modes = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            modes.append((self.training, torch.is_inference_mode_enabled()))
            return self.lin(x)

    model = Probe()
    trainer = make_trainer(model, max_epochs=1)
    loader = data.loader(data.classification(16), batch_size=16)
    trainer.fit(loader, loader)
    assert modes == [(False, True), (True, False), (False, True)]  # the sanity pass, the step, validation
    assert all(p.grad is None for p in model.parameters())
    assert not torch.is_anomaly_enabled()


# ---------------------------------------------------------------- bad values and bad input
def test_nan_loss_is_reported_with_epoch_and_batch():
    trainer = make_trainer(models.NanAtCall(lambda call: call == 7), max_epochs=3, log_every_n_steps=50)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 3"):
        trainer.fit(data.loader(data.classification(64), batch_size=16))  # 4 batches/epoch: call 7 = epoch 2 batch 3


def test_nan_policy_skip_skips_and_counts():
    trainer = make_trainer(models.NanAtCall(lambda call: call % 3 == 0), max_epochs=1, nan_policy="skip")
    history = trainer.fit(data.loader(data.classification(96), batch_size=16))  # 6 batches
    assert trainer.state.skipped_batches == 2
    assert history["train_loss"][0] == history["train_loss"][0]  # finite: bad batches left out
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_loader_with_wrong_structure_is_named():
    triples = DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, dtype=torch.long), torch.zeros(8)), batch_size=4)
    with pytest.raises(BatchStructureError, match="train_loader yielded list of 3"):
        make_trainer().fit(triples)


def test_wrong_input_shape_names_the_model_and_shapes():
    loader = data.loader(data.classification(16, features=5), batch_size=8)
    with pytest.raises(RuntimeError, match=r"model \(Sequential\) failed on inputs Tensor\(8, 5\) from train_loader"):
        make_trainer().fit(loader)


def test_wrong_target_shape_names_the_criterion():
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.zeros(8, 2)), batch_size=4)
    with pytest.raises(Exception, match=r"criterion \(CrossEntropyLoss\) failed on outputs Tensor\(4, 3\) and targets Tensor\(4, 2\)"):
        make_trainer().fit(loader)


@pytest.mark.parametrize("kwargs, message", [
    ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches=0\): expected an integer >= 1"),
    ({"max_epochs": -1}, r"max_epochs=-1\): expected an integer >= 1"),
    ({"gradient_clip_val": 0}, r"gradient_clip_val=0\): expected a positive number"),
    ({"nan_policy": "ignore"}, r'nan_policy="ignore"\): expected "raise" or "skip"'),
    ({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "tpu"}, r"Trainer\(device="),
    ({"scheduler": 3}, r"scheduler=...\): expected an LR scheduler"),
])
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_trainer(**kwargs)


def test_empty_loader_is_rejected():
    with pytest.raises(ValueError, match="loader is empty"):
        make_trainer().fit(DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0)), batch_size=4))


# ---------------------------------------------------------------- history, progress, reproducibility
def test_history_files_and_plot(tmp_path):
    loader = data.loader(data.classification(32), batch_size=8)
    history = make_trainer(max_epochs=2, metrics={"acc": lambda o, t: (o.argmax(1) == t).float().mean()}).fit(loader, loader)
    csv_path, json_path, png = history.to_csv(tmp_path / "h.csv"), history.to_json(tmp_path / "h.json"), history.plot(tmp_path / "h.png")
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss,train_acc,val_loss,val_acc") and len(lines) == 3
    from adaptrain import History
    assert History.from_csv(csv_path)["val_acc"] == pytest.approx(history["val_acc"])
    assert '"train_loss"' in json_path.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_progress_prints_one_plain_line_per_epoch_without_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(console=Console(file=stream, force_terminal=False, width=200))
    loader = data.loader(data.classification(32), batch_size=8)
    make_trainer(max_epochs=3, callbacks=[bar], progress=True).fit(loader, loader)
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert len(lines) == 3
    assert lines[1].startswith("epoch 2/3") and "train_loss" in lines[1] and "val_loss" in lines[1] and "samples/s" in lines[1]


def test_progress_bar_draws_on_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(console=Console(file=stream, force_terminal=True, width=200), min_interval_s=0.0)
    make_trainer(max_epochs=2, callbacks=[bar], progress=True, log_every_n_steps=1).fit(
        data.loader(data.classification(32), batch_size=8))
    out = stream.getvalue()
    assert "4/4" in out and "it/s" in out and "loss" in out  # the live bar, drawn at every batch here
    summaries = [line for line in out.splitlines() if "samples/s" in line]
    assert len(summaries) == 2 and "epoch 2/2  lr" in summaries[1] and "train_loss" in summaries[1]


def test_same_seed_gives_bit_identical_runs():
    def run():
        seed_everything(123)  # model initialisation happens before fit: seed it too
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-2), nn.CrossEntropyLoss(), max_epochs=3,
                          seed=123, progress=False)
        trainer.fit(DataLoader(data.classification(64), batch_size=8, shuffle=True))
        return model.state_dict()

    first, second = run(), run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_before_step_sees_unscaled_gradients_with_16_mixed():
    norms = {}

    class Norm(Callback):
        def before_step(self, trainer):
            norms.setdefault("first", torch.sqrt(sum(p.grad.float().pow(2).sum() for p in trainer.model.parameters())))

    model = models.mlp()
    reference = copy.deepcopy(model)
    loader = data.loader(data.classification(16), batch_size=16)
    make_trainer(model, precision="16-mixed", callbacks=[Norm()]).fit(loader)
    x, y = next(iter(loader))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.CrossEntropyLoss()(reference(x), y)
    loss.backward()
    expected = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in reference.parameters()))
    assert norms["first"] == pytest.approx(float(expected), rel=1e-2)  # not x65536


def test_predict_accepts_inputs_only_loaders():
    x = torch.randn(10, 8)
    trainer = make_trainer()
    assert trainer.predict(DataLoader(TensorDataset(x), batch_size=4)).shape == (10, 3)
    assert trainer.predict(DataLoader(x, batch_size=4)).shape == (10, 3)


def test_plateau_scheduler_per_step_is_rejected_before_training():
    model = models.mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), progress=False,
                      scheduler={"scheduler": ReduceLROnPlateau(optimizer), "interval": "step"})
    with pytest.raises(ConfigError, match='scheduler.interval is "step"'):
        trainer.fit(data.loader(data.classification(16)))
    assert trainer.state.global_step == 0


def test_fit_again_continues_the_schedule_instead_of_restarting_it():
    trainer = make_trainer(max_epochs=1, scheduler=functools.partial(OneCycleLR, max_lr=0.5))
    loader = data.loader(data.classification(64), batch_size=16)
    trainer.fit(loader)
    with pytest.warns(UserWarning, match="already ran its 1 epochs"):
        trainer.fit(loader)
    assert trainer.state.scheduler.last_epoch == 4 and trainer.state.global_step == 4
    trainer.state.max_epochs = 2  # a OneCycle of 4 steps cannot stretch to 8: a clear error, no step taken
    with pytest.raises(ConfigError, match="total_steps=4, but this run takes 8"):
        trainer.fit(loader)
    assert trainer.state.global_step == 4


def test_validate_from_a_callback_does_not_clobber_the_epoch_logs():
    loader = data.loader(data.classification(32), batch_size=8)

    class TestEveryEpoch(Callback):
        def after_validate(self, trainer):
            trainer.state.epoch_logs["test_acc_probe"] = trainer.test(loader)["test_loss"]

    history = make_trainer(max_epochs=1, callbacks=[TestEveryEpoch()]).fit(loader, loader)
    record = history.records[0]
    assert "val_loss" in record and "train_loss" in record and record["test_acc_probe"] > 0


def test_nan_step_number_counts_accumulation_windows():
    trainer = make_trainer(models.NanAtCall(lambda call: call == 5), max_epochs=1, accumulate_grad_batches=3, log_every_n_steps=50)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 5 \(optimizer step 2\)"):
        trainer.fit(data.loader(data.classification(128), batch_size=16))  # 8 batches


def test_namedtuple_inputs_and_outputs():
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, a, b):  # a tuple of inputs, named or not, is passed as positional arguments
            out = self.lin(a + b)
            return Pair(out, out.sum(1))

    x, y = data.classification(32).tensors
    loader = DataLoader([(Pair(x[i], x[i]), y[i]) for i in range(32)], batch_size=8)
    trainer = make_trainer(Net(), criterion=lambda out, t: nn.functional.cross_entropy(out.a, t), max_epochs=1)
    trainer.fit(loader)
    prediction = trainer.predict(loader)
    assert isinstance(prediction, Pair) and prediction.a.shape == (32, 3)
