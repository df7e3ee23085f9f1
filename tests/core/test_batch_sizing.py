"""Adaptive batch size and micro-batching through the Trainer: real steps, simulated and real memory limits."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, LambdaLR, OneCycleLR, StepLR
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from adaptrain import AdaptiveBatchSize, ConfigError, CSVLogger, Trainer, load_checkpoint, save_checkpoint
from adaptrain.core.batch_sizing import MemoryGauge
from adaptrain.tuning.batch_size import BatchSizeError

N = 256


class Limited(nn.Module):
    """A real MLP with BatchNorm whose training forward raises torch.OutOfMemoryError above ``limit``
    samples (and on the chosen call numbers), as a GPU would."""

    def __init__(self, limit: int | None = None, fail_calls=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        self.limit, self.fail_calls, self.calls, self.sizes = limit, set(fail_calls), 0, []

    def forward(self, x):
        if self.training:
            self.calls += 1
            self.sizes.append(x.shape[0])
            if self.calls in self.fail_calls or (self.limit is not None and x.shape[0] > self.limit):
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} samples)")
        return self.net(x)


def dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def loader(batch_size: int, n: int = N) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def make(model: nn.Module, lr: float = 0.1, epochs: int = 2, **kwargs) -> Trainer:
    optimizer = torch.optim.SGD([{"params": model.net[0].parameters()},
                                 {"params": [p for m in list(model.net)[1:] for p in m.parameters()], "lr": lr / 2}],
                                lr=lr, momentum=0.9)
    return Trainer(model, optimizer, nn.CrossEntropyLoss(), max_epochs=epochs, progress=False, seed=0, device="cpu",
                   **kwargs)


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [t.detach().clone() for t in trainer.model.state_dict().values()]


def close(a: Trainer, b: Trainer, atol: float = 1e-6) -> bool:
    return all(torch.allclose(x.float(), y.float(), atol=atol) for x, y in zip(weights(a), weights(b)))


# ---------------------------------------------------------------------- safe
def test_safe_keeps_a_batch_that_fits_after_one_probe():
    model = Limited(limit=1000)
    trainer = make(model, adaptive_batch_size="safe")
    trainer.fit(loader(64))
    assert trainer.batch_size == 64 and trainer.micro_batch_size is None
    entry, = trainer.state.history.adaptations
    assert entry["kind"] == "batch_size" and entry["before"] == entry["after"] == 64 and entry["trials"] == 1
    assert trainer.state.optimizer.param_groups[0]["lr"] == 0.1  # nothing changed: the LR neither


def test_safe_shrinks_to_a_few_samples_under_the_limit_and_rescales_every_group_by_sqrt():
    model = Limited(limit=100)
    trainer = make(model, adaptive_batch_size="safe")
    trainer.fit(loader(256))
    assert 90 <= trainer.batch_size <= 100
    factor = (trainer.batch_size / 256) ** 0.5
    groups = trainer.state.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(0.1 * factor) and groups[1]["lr"] == pytest.approx(0.05 * factor)
    assert len(trainer.state.train_loader) == -(-N // trainer.batch_size)  # the loader was rebuilt
    assert trainer.state.steps_per_epoch == len(trainer.state.train_loader)
    entry = trainer.state.history.adaptations[0]
    assert entry["before"] == 256 and entry["after"] == trainer.batch_size and entry["trials"] <= 10
    assert "does not fit" in entry["reason"] and "lr" in entry["reason"]


def test_the_search_leaves_weights_optimizer_rng_and_batchnorm_exactly_as_before():
    model = Limited(limit=100)
    trainer = make(model, adaptive_batch_size=AdaptiveBatchSize(mode="full", lr_scaling=None, max_trials=6))
    trainer.state.train_loader = loader(32)
    for _ in range(2):  # optimizer state and BatchNorm statistics that are not the initial ones
        trainer.run_step(next(iter(trainer.state.train_loader)))
    before = trainer.state.snapshot()
    rng = torch.get_rng_state()
    trainer.batch_sizing.search(trainer)
    after = trainer.state.state_dict()
    for key in ("model",):
        assert all(torch.equal(before[key][k], after[key][k]) for k in before[key])  # BatchNorm buffers included
    momentum_before = [s["momentum_buffer"] for s in before["optimizer"]["state"].values()]
    momentum_after = [s["momentum_buffer"] for s in after["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum_before, momentum_after))
    assert torch.equal(rng, torch.get_rng_state()) and after["counters"]["global_step"] == 2
    assert torch.equal(before["rng"]["now"]["loader"][0], after["rng"]["now"]["loader"][0])


def test_a_searched_run_equals_a_run_configured_with_the_chosen_batch_and_lr():
    searched = make(Limited(limit=100), adaptive_batch_size="safe")
    searched.fit(loader(256))
    chosen, lr = searched.batch_size, searched.state.optimizer.param_groups[0]["lr"]
    plain = make(Limited(), lr=lr)
    plain.fit(loader(chosen))
    assert close(searched, plain, atol=0)  # the probes trained nothing; the RNG is where it was


def test_nothing_fits_is_one_clear_error():
    trainer = make(Limited(limit=0), adaptive_batch_size="safe")
    with pytest.raises(BatchSizeError, match="even batch size 1 does not fit"):
        trainer.fit(loader(8))
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------------- full
def test_full_grows_within_the_data_set_and_the_trial_budget():
    model = Limited(limit=None)
    trainer = make(model, adaptive_batch_size=AdaptiveBatchSize(mode="full", max_batch_size=128))
    trainer.fit(loader(16))
    entry = trainer.state.history.adaptations[0]
    assert 16 <= trainer.batch_size <= 128 and entry["trials"] <= 10
    assert entry["search"]["stop"] in ("plateau", "limit", "memory", "trials")
    probed = [p["batch_size"] for p in entry["search"]["probes"]]
    assert max(probed) <= 128 and probed[0] == 16
    factor = (trainer.batch_size / 16) ** 0.5
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factor)


def test_full_keeps_an_effective_batch_through_accumulation():
    trainer = make(Limited(limit=32), adaptive_batch_size=AdaptiveBatchSize(mode="safe"), accumulate_grad_batches=4)
    trainer.fit(loader(64))  # effective batch 256
    assert trainer.batch_size <= 32
    assert trainer.state.accumulate_grad_batches == -(-256 // trainer.batch_size)
    effective = trainer.batch_size * trainer.state.accumulate_grad_batches
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * (effective / 256) ** 0.5)


# ---------------------------------------------------------------------- schedules
def test_a_one_cycle_factory_is_built_for_the_new_steps_per_epoch():
    trainer = make(Limited(limit=64), adaptive_batch_size="safe", epochs=3,
                   scheduler=functools.partial(OneCycleLR, max_lr=0.1))
    trainer.fit(loader(256))
    assert trainer.state.scheduler.total_steps == 3 * len(trainer.state.train_loader)
    assert trainer.state.scheduler.last_epoch == trainer.state.global_step  # ran to its end, not past it


@pytest.mark.parametrize("kind", ["onecycle", "cyclic"])
def test_a_per_step_scheduler_instance_is_stretched_to_span_the_same_epochs(kind):
    model = Limited(limit=64)
    trainer = make(model, adaptive_batch_size="safe", epochs=2)
    optimizer = trainer.state.optimizer
    old_steps = 2 * -(-N // 256)
    trainer._schedule.spec["scheduler"] = (OneCycleLR(optimizer, max_lr=0.1, total_steps=old_steps) if kind == "onecycle"
                                           else CyclicLR(optimizer, 0.01, 0.1, step_size_up=1, step_size_down=1))
    trainer.fit(loader(256))
    steps_per_epoch = len(trainer.state.train_loader)
    scheduler = trainer.state.scheduler
    if kind == "onecycle":
        assert scheduler.total_steps == 2 * steps_per_epoch == trainer.state.global_step
    else:
        assert scheduler.total_size == 2 * steps_per_epoch  # one cycle per epoch, as configured


def test_a_per_step_schedule_that_cannot_be_rebuilt_is_refused_before_any_work():
    model = Limited(limit=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), progress=False, device="cpu", adaptive_batch_size="safe",
                      scheduler={"scheduler": LambdaLR(optimizer, lambda step: 0.9**step), "interval": "step"})
    with pytest.raises(ConfigError, match="LambdaLR stepped per optimizer step.*factory"):
        trainer.fit(loader(256))
    assert model.calls == 0  # no probe ran


def test_an_epoch_scheduler_keeps_its_schedule_with_rescaled_base_lrs():
    model = Limited(limit=64)
    trainer = make(model, adaptive_batch_size="safe")
    trainer._schedule.spec["scheduler"] = StepLR(trainer.state.optimizer, step_size=1, gamma=0.5)
    trainer.fit(loader(256))
    factor = (trainer.batch_size / 256) ** 0.5
    assert trainer.state.scheduler.base_lrs == pytest.approx([0.1 * factor, 0.05 * factor])
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factor * 0.25)  # 2 epochs of 0.5


# ---------------------------------------------------------------------- loaders that cannot be rebuilt
def test_a_loader_with_its_own_batch_sampler_is_refused_before_any_work():
    data = dataset()
    fixed = DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), batch_size=64, drop_last=False))
    model = Limited()
    trainer = make(model, adaptive_batch_size="full")
    with pytest.raises(ConfigError, match='adaptive_batch_size is "full".*BatchSampler.*micro_batch_size="auto"'):
        trainer.fit(fixed)
    assert model.calls == 0


def test_a_plain_iterable_is_refused_but_can_use_micro_batching():
    batches = [(x, y) for x, y in loader(64)]
    with pytest.raises(ConfigError, match="list, which cannot be rebuilt"):
        make(Limited(), adaptive_batch_size="safe").fit(batches)
    trainer = make(Limited(limit=20), micro_batch_size="auto")
    trainer.fit(batches)
    assert 10 <= trainer.micro_batch_size <= 20 and trainer.batch_size is None


@pytest.mark.parametrize("kwargs, match", [
    ({"adaptive_batch_size": "medium"}, 'adaptive_batch_size="medium".*"safe", "full"'),
    ({"adaptive_batch_size": {"mode": "full", "lr_rule": "sqrt"}}, "unknown option.*lr_rule"),
    ({"adaptive_batch_size": AdaptiveBatchSize}, "adaptive_batch_size=<class.*a mapping of AdaptiveBatchSize"),
    ({"micro_batch_size": 0}, r"micro_batch_size=0.*\"auto\" or an integer >= 1"),
    ({"micro_batch_size": "big"}, 'micro_batch_size="big"'),
    ({"auto_num_workers": "yes"}, 'auto_num_workers="yes".*True or False'),
])
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(Limited(), **kwargs)


@pytest.mark.parametrize("field, value", [("mode", "huge"), ("lr_scaling", "cube"), ("memory_fraction", 1.5),
                                          ("max_batch_size", 0), ("max_trials", True), ("min_gain", 1.0),
                                          ("steps_per_trial", 0)])
def test_adaptive_batch_size_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"AdaptiveBatchSize\\({field}="):
        AdaptiveBatchSize(**{field: value})


# ---------------------------------------------------------------------- micro-batching
def test_micro_batches_keep_the_batch_and_end_equal_to_an_unsplit_run():
    reference = make(Limited(), epochs=2)
    reference.fit(loader(64))
    split = make(Limited(), epochs=2, micro_batch_size=16)
    split.fit(loader(64))
    assert split.batch_size == 64 and split.micro_batch_size == 16
    assert max(split.model.sizes) == 16
    # BatchNorm normalises each micro-batch: the one documented difference. Without it, equal to 1e-6:
    no_bn = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    no_bn[1].load_state_dict(no_bn[0].state_dict())
    runs = []
    for module, micro in zip(no_bn, (None, 16)):
        holder = Limited()
        holder.net = module
        trainer = make(holder, micro_batch_size=micro)
        trainer.fit(loader(64))
        runs.append(trainer)
    assert close(*runs, atol=1e-6)


def test_auto_micro_batch_fits_the_limit_keeps_the_batch_and_the_optimisation():
    no_bn = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    runs = []
    for limit, micro in ((None, None), (20, "auto")):
        holder = Limited(limit=limit)
        holder.net = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                                     for m in no_bn])
        holder.net.load_state_dict(no_bn.state_dict())
        trainer = make(holder, micro_batch_size=micro)
        trainer.fit(loader(64))
        runs.append(trainer)
    unsplit, split = runs
    assert split.batch_size == 64 and 10 <= split.micro_batch_size <= 20
    assert split.state.optimizer.param_groups[0]["lr"] == 0.1
    assert close(unsplit, split, atol=1e-6)
    assert split.state.history.adaptations[0]["kind"] == "micro_batch_size"


def test_an_oom_mid_run_halves_the_micro_batch_and_loses_no_step():
    reference = make(Limited(), micro_batch_size=64)
    reference.fit(loader(64))
    model = Limited(fail_calls={7})  # one OOM in the middle of the run (a longer sequence, fragmentation)
    recovered = make(model, micro_batch_size=64)
    recovered.fit(loader(64))
    assert recovered.micro_batch_size == 32 and recovered.state.global_step == reference.state.global_step
    entry = recovered.state.history.adaptations[-1]
    assert entry["kind"] == "micro_batch_size" and entry["before"] == 64 and entry["after"] == 32
    assert "out of memory" in entry["reason"] and "same step is redone" in entry["reason"]
    # BatchNorm saw halves after the OOM; the weights stay close, and the run did not crash or skip
    assert recovered.state.history["train_loss"][0] == pytest.approx(reference.state.history["train_loss"][0], rel=0.2)


def test_without_an_adaptive_setting_an_oom_still_propagates():
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        make(Limited(fail_calls={3})).fit(loader(64))


def test_an_oom_at_one_sample_is_a_clear_error_chained_to_the_oom():
    trainer = make(Limited(limit=0), micro_batch_size=1)
    with pytest.raises(BatchSizeError, match="micro-batches of 1 sample") as raised:
        trainer.fit(loader(8))
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)


# ---------------------------------------------------------------------- resume, records
def test_a_checkpoint_keeps_the_sizes_and_a_resume_neither_searches_nor_differs(tmp_path):
    whole = make(Limited(limit=100), epochs=3, adaptive_batch_size="safe")
    whole.fit(loader(256))
    first = make(Limited(limit=100), epochs=1, adaptive_batch_size="safe")
    first.fit(loader(256))
    path = save_checkpoint(first, tmp_path / "epoch1.ckpt")
    ckpt = load_checkpoint(path)
    assert ckpt["counters"]["batch_size"] == first.batch_size and ckpt["history"]["adaptations"]
    model = Limited(limit=100)
    resumed = make(model, epochs=3, adaptive_batch_size="safe")
    resumed.fit(loader(256), ckpt_path=path)
    assert resumed.batch_size == whole.batch_size
    assert max(model.sizes) <= 100 and len(model.sizes) == 2 * len(resumed.state.train_loader)  # no probe ran
    assert resumed.state.optimizer.param_groups[0]["lr"] == whole.state.optimizer.param_groups[0]["lr"]
    assert close(resumed, whole, atol=0)
    assert len(resumed.state.history.adaptations) == 1


def test_adaptations_reach_the_print_the_run_folder_and_the_log(tmp_path, capsys):
    trainer = make(Limited(limit=100), adaptive_batch_size="safe", callbacks=[CSVLogger(run_dir=tmp_path / "run")])
    trainer.fit(loader(256))
    printed = capsys.readouterr().out
    assert f"batch size 256 -> {trainer.batch_size} (safe)" in printed
    saved = json.loads((tmp_path / "run" / "adaptations.json").read_text())
    assert saved[0]["after"] == trainer.batch_size and saved[0]["search"]["probes"]
    assert "adapted: batch size 256 ->" in (tmp_path / "run" / "train.log").read_text()


def test_fast_dev_run_skips_the_search_and_says_so(capsys):
    model = Limited(limit=100)
    trainer = make(model, adaptive_batch_size="safe", fast_dev_run=True)
    trainer.fit(loader(256))
    assert "batch-size search skipped (fast_dev_run)" in capsys.readouterr().out
    # the configured batch is used as it is (256 > 100): safe mode's OOM back-off still holds
    assert trainer.batch_size == 256 and trainer.micro_batch_size == 64


# ---------------------------------------------------------------------- the CPU memory path
class Hungry(nn.Module):
    """Real memory: each sample allocates a 1 MiB activation (256 x 1024 floats) in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Linear(8, 256 * 1024)
        self.head = nn.Linear(256 * 1024, 3)

    def forward(self, x):
        return self.head(torch.relu(self.expand(x)))


def test_on_cpu_peak_rss_growth_decides_what_fits():
    gauge = MemoryGauge(torch.device("cpu"))
    budget = 48 * 2**20  # a step may grow the process by about 48 MiB: activations, their gradients, weights' grads
    model = Hungry()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), progress=False, device="cpu",
                      adaptive_batch_size=AdaptiveBatchSize(mode="safe", memory_fraction=budget / gauge.capacity))
    trainer.state.train_loader = loader(64, n=64)
    found = trainer.batch_sizing.search(trainer)
    peaks = {p.batch_size: p.peak_fraction * gauge.capacity for p in found.probes}
    assert peaks[64] > budget  # 64 samples hold 64 MiB of activations alone
    chosen = next(p for p in found.probes if p.batch_size == found.chosen)
    # in the search's own unit (a fraction of capacity): bytes -> fraction -> bytes is not exact, and a
    # peak of exactly 48 MiB (RSS grows in pages) read 48 MiB + 1e-8 B and failed once from a fresh clone
    assert 2 <= found.chosen < 48 and chosen.peak_fraction <= found.memory_fraction
    assert peaks[found.chosen] > 2**20  # a real measurement: the step grew the process


def test_fit_called_again_keeps_the_chosen_batch_and_lr_without_searching():
    model = Limited(limit=100)
    trainer = make(model, epochs=1, adaptive_batch_size="safe")
    trainer.fit(loader(256))
    chosen, lr, calls = trainer.batch_size, trainer.state.optimizer.param_groups[0]["lr"], model.calls
    trainer.state.max_epochs = 2
    trainer.fit(loader(256))
    assert trainer.batch_size == chosen and trainer.state.optimizer.param_groups[0]["lr"] == lr
    assert model.calls - calls == len(trainer.state.train_loader)  # one epoch of steps, no probe
    assert len(trainer.state.history.adaptations) == 1
