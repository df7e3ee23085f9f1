"""LoaderSpec rebuilds a DataLoader with changes; a loader swapped mid-run trains exactly like the original."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from adaptrain import Callback, Trainer
from adaptrain.data.loaders import LoaderError, LoaderSpec, is_default_batching
from tests.common import data


def collate(batch):
    xs, ys = zip(*batch)
    return torch.stack(xs) * 2, torch.stack(ys)


def worker_init(worker_id: int) -> None:
    torch.manual_seed(1234 + worker_id)


def test_rebuild_keeps_every_setting_but_the_changed_ones():
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(data.classification(n=40), batch_size=8, shuffle=True, generator=generator, drop_last=True,
                        collate_fn=collate, worker_init_fn=worker_init, pin_memory=False)
    rebuilt = LoaderSpec.from_loader(loader).build(num_workers=2, prefetch_factor=4, persistent_workers=True)
    assert (rebuilt.num_workers, rebuilt.prefetch_factor, rebuilt.persistent_workers) == (2, 4, True)
    assert rebuilt.dataset is loader.dataset and rebuilt.sampler is loader.sampler
    assert rebuilt.generator is generator and rebuilt.collate_fn is collate and rebuilt.worker_init_fn is worker_init
    assert (rebuilt.batch_size, rebuilt.drop_last) == (8, True)
    state = generator.get_state()
    first = [x for x, _ in loader]
    generator.set_state(state)
    again = [x for x, _ in LoaderSpec.from_loader(loader).build()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same order: the generator is shared


def test_batch_size_change_and_settings():
    loader = DataLoader(data.classification(n=40), batch_size=8)
    spec = LoaderSpec.from_loader(loader)
    assert len(spec.build(batch_size=16)) == 3 and is_default_batching(loader)
    assert spec.settings() == {"batch_size": 8, "num_workers": 0, "prefetch_factor": None, "pin_memory": False,
                               "persistent_workers": False}


def test_what_cannot_be_rebuilt_is_named():
    with pytest.raises(LoaderError, match="the train loader is a list, which cannot be rebuilt"):
        LoaderSpec.from_loader([(torch.zeros(2, 8), torch.zeros(2))])
    dataset = data.classification(n=16)
    custom = DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 4, False))
    assert not is_default_batching(custom)
    spec = LoaderSpec.from_loader(custom)
    assert len(spec.build(num_workers=0)) == 4  # other changes are fine
    with pytest.raises(LoaderError, match="batches with its own BatchSampler, so its batch size cannot be changed"):
        spec.build(batch_size=8)
    with pytest.raises(LoaderError, match=r"only batch_size, num_workers"):
        spec.build(shuffle=True)


class SwapLoader(Callback):
    """After epoch ``at``, rebuild the train loader with more workers (the same batch size)."""

    def __init__(self, at: int, **changes) -> None:
        self.at, self.changes, self.swapped = at, changes, None

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.state.epoch == self.at:
            self.swapped = trainer.replace_train_loader(**self.changes)


class RecordBatches(Callback):
    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def before_batch(self, trainer: Trainer) -> None:
        self.batches.append(trainer.state.batch[0].clone())


def run(callbacks=(), epochs: int = 4) -> tuple[Trainer, RecordBatches]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    record = RecordBatches()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), progress=False,
                      seed=0, device="cpu", max_epochs=epochs, callbacks=[record, *callbacks])
    trainer.fit(data.loader(data.classification(n=48), batch_size=8, shuffle=True))
    return trainer, record.batches


def test_a_seeded_run_that_swaps_its_loader_for_more_workers_is_bit_identical():
    reference, reference_batches = run()
    swap = SwapLoader(at=2, num_workers=2)
    swapped, swapped_batches = run([swap])
    assert swap.swapped.num_workers == 2 and swapped.state.train_loader is swap.swapped
    assert len(swapped_batches) == len(reference_batches) == 24
    assert all(torch.equal(a, b) for a, b in zip(swapped_batches, reference_batches))
    assert all(torch.equal(a, b) for a, b in zip(swapped.model.parameters(), reference.model.parameters()))


def test_a_batch_size_change_updates_steps_per_epoch_and_the_next_epoch_uses_it():
    swap = SwapLoader(at=1, batch_size=16)
    trainer, batches = run([swap], epochs=2)
    assert [b.shape[0] for b in batches] == [8] * 6 + [16] * 3
    assert trainer.state.steps_per_epoch == 3 and trainer.state.global_step == 9


class SwapMidEpoch(Callback):
    def after_batch(self, trainer: Trainer) -> None:
        if trainer.state.epoch == 0 and trainer.state.batch_idx == 2:
            trainer.replace_train_loader(batch_size=16)


def test_a_swap_asked_for_mid_epoch_waits_for_the_next_epoch():
    trainer, batches = run([SwapMidEpoch()], epochs=2)
    assert [b.shape[0] for b in batches] == [8] * 6 + [16] * 3


def test_data_and_compute_time_are_in_every_record():
    trainer, _ = run(epochs=2)
    for record in trainer.state.history.records:
        assert record["data_time"] >= 0 and record["compute_time"] > 0
        assert record["data_time"] + record["compute_time"] <= record["epoch_time"] * 1.01 + 1e-3


def test_a_swap_that_changes_the_steps_of_a_per_step_schedule_is_refused():
    import functools

    from adaptrain import ConfigError

    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), progress=False,
                      device="cpu", max_epochs=3, callbacks=[SwapLoader(at=1, batch_size=4)],
                      scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1))
    with pytest.raises(ConfigError, match=r"changes the optimizer steps per epoch from 6 to 12, but the per-step "
                                          r"OneCycleLR was planned for the old count"):
        trainer.fit(data.loader(data.classification(n=48), batch_size=8, shuffle=True))
    assert trainer.state.epoch == 1  # refused at the epoch boundary, before any step of the new loader


def test_fast_dev_run_from_a_checkpoint_runs_one_more_short_epoch():
    trainer, _ = run(epochs=2)
    saved = trainer.state.snapshot()  # the contents of a checkpoint at epoch 2 (fit accepts them)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    resumed = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), progress=False,
                      device="cpu", max_epochs=4, fast_dev_run=2)
    resumed.fit(data.loader(data.classification(n=48), batch_size=8, shuffle=True), ckpt_path=saved)
    assert resumed.state.epoch == 3 and resumed.state.global_step == 12 + 2
    assert resumed.state.max_epochs == 4  # the user's setting is left as it was
