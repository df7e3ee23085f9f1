"""trainer.lr_find: real sweeps that leave the trainer exactly as they found it, suggestions on real
problems, apply=True, argument checks, the plot."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR, StepLR
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import LRFinderResult, Trainer

N = 256


class Net(nn.Module):
    """BatchNorm (running statistics) and dropout (draws from the torch RNG) in one small MLP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
        self.train_calls = 0

    def forward(self, x):
        self.train_calls += self.training
        return self.net(x)


def data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())  # learnable: the loss falls


def loader(batch_size: int = 32, **options) -> DataLoader:
    return DataLoader(data(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                      **options)


def make(optimizer: str = "sgd", **kwargs) -> Trainer:
    model = Net()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:  # two param groups at different LRs: the sweep keeps their ratio
        opt = torch.optim.SGD([{"params": model.net[0].parameters()},
                               {"params": [p for m in list(model.net)[1:] for p in m.parameters()], "lr": 0.025}],
                              lr=0.05, momentum=0.9)
    return Trainer(model, opt, nn.CrossEntropyLoss(), progress=False, device="cpu", **kwargs)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_now() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


TIMES = {"epoch_time", "samples_per_s", "data_time", "compute_time"}


def trained(records: list[dict]) -> list[dict]:
    """The records without their wall-clock times."""
    return [{k: v for k, v in record.items() if k not in TIMES} for record in records]


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name  # weights and BatchNorm running_mean / running_var / num_batches_tracked
    sa, sb = a.state.optimizer.state_dict(), b.state.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # lr (and initial_lr / max_lr under a schedule)
    assert sa["state"].keys() == sb["state"].keys()
    for key, moments in sa["state"].items():
        for name, value in moments.items():
            other = sb["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    assert a.state.counters() == b.state.counters()
    assert a.precision.state_dict() == b.precision.state_dict()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_fit_after_lr_find_is_bit_for_bit_a_fit_without_it(optimizer):
    # No trainer seed: the fit draws dropout masks from the global RNG, so that must be put back too.
    a, b = make(optimizer, max_epochs=2), make(optimizer, max_epochs=2)
    loader_a, loader_b = loader(), loader()
    seed_all(7)
    rng_before = rng_now()
    shuffle_before = loader_a.generator.get_state()
    result = a.lr_find(loader_a, num_steps=40)
    assert result.steps >= 20 and a.model.train_calls == result.steps  # it really trained, step by step
    assert rng_now()[0] == rng_before[0] and rng_now()[1] == rng_before[1]
    assert torch.equal(rng_now()[2], rng_before[2])
    assert torch.equal(loader_a.generator.get_state(), shuffle_before)
    assert_same_state(a, b)
    history_a = a.fit(loader_a)
    seed_all(7)
    history_b = b.fit(loader_b)
    assert_same_state(a, b)
    assert trained(history_a.records) == trained(history_b.records)


@pytest.mark.filterwarnings("ignore:scheduler is OneCycleLR planned for")  # two fits of one epoch: on purpose
def test_mid_run_the_scheduler_and_the_loaders_rng_are_restored_and_not_stepped():
    def build() -> Trainer:
        trainer = make(max_epochs=1, seed=3)
        trainer._schedule.spec["scheduler"] = OneCycleLR(trainer.state.optimizer, max_lr=[0.1, 0.05],
                                                         total_steps=2 * (N // 32))
        return trainer

    a, b = build(), build()
    loader_a, loader_b = loader(), loader()
    a.fit(loader_a)
    b.fit(loader_b)
    steps_before = a.state.scheduler.last_epoch
    lr_before = a.state.optimizer.param_groups[0]["lr"]
    rng_before = torch.get_rng_state()
    result = a.lr_find(loader_a, num_steps=30)
    assert result.lrs[0] == pytest.approx(1e-7) and result.steps >= 20
    assert a.state.scheduler.last_epoch == steps_before and a.state.lr == lr_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert_same_state(a, b)
    assert a.state.scheduler.state_dict() == b.state.scheduler.state_dict()
    for trainer, batches in ((a, loader_a), (b, loader_b)):
        trainer.state.max_epochs = 2
        torch.set_rng_state(rng_before)
        trainer.fit(batches)
    assert_same_state(a, b)
    assert trained(a.state.history.records) == trained(b.state.history.records)


@pytest.mark.filterwarnings("ignore:precision 16-mixed on a CPU")
def test_the_grad_scaler_comes_back_after_the_overflows_of_a_sweep():
    a, b = make(precision="16-mixed", seed=0), make(precision="16-mixed", seed=0)
    scale_before = a.precision.scaler.get_scale()
    scales, step = [], a.precision.step

    def recording(optimizer):
        taken = step(optimizer)
        scales.append(a.precision.scaler.get_scale())
        return taken

    a.precision.step = recording
    a.lr_find(loader(), num_steps=40, max_lr=1e4, stop_factor=None)
    assert min(scales) < scale_before  # fp16 gradients overflowed and the scaler backed off
    assert a.precision.scaler.get_scale() == scale_before
    assert_same_state(a, b)
    loader_a, loader_b = loader(), loader()
    a.fit(loader_a)
    b.fit(loader_b)
    assert_same_state(a, b)


def test_the_sweep_keeps_param_group_ratios_and_cycles_a_short_loader():
    trainer = make()
    seen = []
    original_step = trainer.run_step

    def spy(batch, events=False):
        seen.append([group["lr"] for group in trainer.state.optimizer.param_groups])
        original_step(batch, events)

    trainer.run_step = spy
    result = trainer.lr_find(loader(batch_size=64), num_steps=30, stop_factor=None)  # 4 batches per pass
    assert result.steps == 30 and result.stop_reason == "all 30 steps taken"
    assert [lrs[0] for lrs in seen] == pytest.approx(result.lrs)
    assert all(second == pytest.approx(first / 2) for first, second in seen)
    assert result.lrs[-1] == 10.0
    assert trainer.state.optimizer.param_groups[1]["lr"] == 0.025


def test_an_error_in_a_step_still_restores_everything():
    trainer = make(seed=0)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    calls = {"n": 0}
    forward = trainer.model.forward

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 12:
            raise RuntimeError("boom")
        return forward(x)

    trainer.model.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        trainer.lr_find(loader(), num_steps=30)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trainer.state.global_step == 0 and not trainer.state.optimizer.state


def test_linear_regression_suggestion_is_below_the_divergence_bound():
    """Least squares: plain gradient descent diverges above lr 2 / lambda_max(Hessian) = 1 / lambda_max(X'X / n)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5, 0.2])
    y = x @ torch.randn(6, 1, generator=g)
    bound = 1 / float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    for rule in ("valley", "steepest", "minimum"):
        model = nn.Linear(6, 1)
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), progress=False,
                          device="cpu", seed=0)
        result = trainer.lr_find(DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True,
                                            generator=torch.Generator().manual_seed(0)), num_steps=100)
        assert bound / 100 < result.suggestion < bound, (rule, result.suggestion, bound)
        assert "above 4 x its best" in result.stop_reason  # it diverged past the bound, and stopped there
        assert result.lrs[-1] > bound


def test_digits_mlp_suggestion_is_in_the_range_that_trains_well():
    """benchmarks/lr_find.py: SGD + OneCycleLR on this MLP trains to >= 93% val accuracy for max_lr
    in 0.01 .. 0.1 and collapses at 0.3."""
    from adaptrain.datasets import digits
    from adaptrain.models import MLP

    train, _, _ = digits(seed=0).loaders(batch_size=32, seed=0)
    torch.manual_seed(0)
    model = MLP(64, (128, 64), 10)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True),
                      nn.CrossEntropyLoss(), progress=False, device="cpu", seed=0)
    result = trainer.lr_find(train)
    assert 0.01 <= result.suggestion <= 0.1, result.reason


def test_apply_sets_a_one_cycle_factorys_max_lr_and_records_it(capsys):
    trainer = make(seed=0, max_epochs=1, scheduler=functools.partial(OneCycleLR, max_lr=0.5, pct_start=0.3))
    result = trainer.lr_find(loader(), num_steps=40, apply=True)
    lr = result.suggestion
    factory = trainer._schedule.spec["scheduler"]
    assert factory.keywords == {"max_lr": lr, "pct_start": 0.3}
    assert result.applied == [("OneCycleLR max_lr", 0.5, lr)]
    [entry] = trainer.state.history.adaptations
    assert (entry["kind"], entry["before"], entry["after"], entry["rule"]) == ("lr", 0.5, lr, "valley")
    assert "OneCycleLR max_lr 0.5 -> " in capsys.readouterr().out
    trainer.fit(loader())
    assert trainer.state.optimizer.param_groups[0]["max_lr"] == pytest.approx(lr)
    assert trainer.state.history.adaptations == [entry]  # kept by the fit


def test_apply_scales_a_built_one_cycle_and_the_plain_lr():
    trainer = make(seed=0)
    opt = trainer.state.optimizer
    cycle = OneCycleLR(opt, max_lr=[0.2, 0.1], total_steps=100, div_factor=25.0)
    trainer._schedule.spec["scheduler"] = cycle
    result = trainer.lr_find(loader(), num_steps=40, apply=True)
    lr = result.suggestion
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([lr, lr / 2])
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([lr / 25, lr / 50])
    assert cycle.base_lrs == pytest.approx([lr / 25, lr / 50])

    plain = make(seed=0, scheduler=functools.partial(StepLR, step_size=1))
    found = plain.lr_find(loader(), num_steps=40, apply=True)
    assert [g["lr"] for g in plain.state.optimizer.param_groups] == pytest.approx([found.suggestion,
                                                                                   found.suggestion / 2])
    assert plain.state.history.adaptations[0]["what"] == "lr"


def test_no_suggestion_leaves_the_lr_alone_with_a_warning():
    trainer = make(seed=0)
    with pytest.warns(UserWarning, match=r"lr_find\(apply=True\): no suggestion \(no descent"):
        result = trainer.lr_find(loader(), min_lr=1e-9, max_lr=1e-8, num_steps=30, apply=True)
    assert result.suggestion is None and result.reason.startswith("no descent")
    assert result.index is None and result.applied == []
    assert trainer.state.lr == 0.05 and not trainer.state.history.adaptations


@pytest.mark.parametrize("options, named", [
    ({"min_lr": -1.0}, "min_lr=-1.0"),
    ({"max_lr": 1e-8}, "max_lr=1e-08"),
    ({"num_steps": 3}, "num_steps=3"),
    ({"rule": "fastest"}, "rule='fastest'"),
    ({"smoothing": 1.5}, "smoothing=1.5"),
    ({"stop_factor": 0.5}, "stop_factor=0.5"),
    ({"apply": "yes"}, "apply='yes'"),
])
def test_bad_arguments_raise_before_any_step(options, named):
    trainer = make(seed=0)
    with pytest.raises(ValueError, match=r"^lr_find\(" + named.replace("(", r"\(").replace(".", r"\.")):
        trainer.lr_find(loader(), **options)
    assert trainer.model.train_calls == 0 and not trainer.state.optimizer.state


def test_unknown_option_is_a_type_error_before_any_step():
    trainer = make(seed=0)
    with pytest.raises(TypeError, match="num_iter"):
        trainer.lr_find(loader(), num_iter=10)
    assert trainer.model.train_calls == 0


def test_plot_and_as_dict(tmp_path):
    result = make(seed=0).lr_find(loader(), num_steps=40)
    assert isinstance(result, LRFinderResult)
    path = result.plot(tmp_path / "plots" / "lr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    summary = result.as_dict()
    assert summary["suggestion"] == result.suggestion and summary["rule"] == "valley"
    assert len(summary["lrs"]) == len(summary["losses"]) == len(summary["smoothed"]) == result.steps
    assert all(v is None or isinstance(v, float) for v in summary["losses"])  # NaN -> None: valid JSON
