"""The optimizer step as one retryable unit: micro-batches, OOM recompute, a cancellable step stage."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
from torch import nn

from adaptrain import Callback, CancelStepException, Trainer
from adaptrain.core.batching import split_micro_batches
from adaptrain.core.loop import TrainingLoop
from tests.common import data


class OOMAt(nn.Module):
    """A real MLP whose forward raises torch.OutOfMemoryError on chosen calls, or above a batch size."""

    def __init__(self, fail_calls=(), above: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.fail_calls, self.above, self.calls = set(fail_calls), above, 0

    def forward(self, x):
        self.calls += 1
        if self.calls in self.fail_calls or (self.above is not None and x.shape[0] > self.above and self.training):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.net(x)


class HalvingTrainer(Trainer):
    """The policy a later feature ships: halve the micro-batch after an OOM (here: for the test)."""

    def __init__(self, *args, halve: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.halve, self.ooms = halve, 0

    def on_out_of_memory(self, error: BaseException) -> None:
        self.ooms += 1
        if self.ooms > 8:
            raise error
        if self.halve:
            size = self.micro_batch_size or self.state.batch[0].shape[0]
            self.micro_batch_size = max(1, size // 2)


def fit(model: nn.Module, cls=Trainer, accumulate: int = 1, epochs: int = 2, callbacks=(), **kwargs) -> Trainer:
    trainer = cls(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
                  progress=False, seed=0, device="cpu", max_epochs=epochs, accumulate_grad_batches=accumulate,
                  callbacks=list(callbacks), **kwargs)
    trainer.fit(data.loader(data.classification(n=40), batch_size=8, shuffle=True))
    return trainer


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_split_micro_batches_through_nested_structures():
    inputs = {"a": torch.arange(10.).reshape(5, 2), "flag": True, "pair": (torch.arange(5), torch.zeros(1))}
    parts = split_micro_batches(inputs, torch.arange(5), 2)
    assert [len(t) for _, t in parts] == [2, 2, 1]
    assert parts[2][0]["a"].tolist() == [[8.0, 9.0]] and parts[1][0]["flag"] is True
    assert parts[1][0]["pair"][1].shape == (1,)  # not batch-shaped: passed whole
    assert split_micro_batches(inputs, torch.arange(5), None)[0][1] is not None and \
        len(split_micro_batches(inputs, torch.arange(5), 8)) == 1


@pytest.mark.parametrize("accumulate", [1, 3])
def test_micro_batches_give_the_gradient_of_the_whole_batch(accumulate):
    reference = fit(OOMAt(), accumulate=accumulate)
    model = OOMAt()
    split = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
                    progress=False, seed=0, device="cpu", max_epochs=2, accumulate_grad_batches=accumulate)
    split.micro_batch_size = 3  # 8 -> 3 + 3 + 2
    split.fit(data.loader(data.classification(n=40), batch_size=8, shuffle=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(split), weights(reference)))
    assert split.state.history["train_loss"] == pytest.approx(reference.state.history["train_loss"], abs=1e-6)


def test_a_one_off_oom_is_recomputed_with_no_step_lost_and_identical_weights():
    reference = fit(OOMAt())
    recovered = fit(OOMAt(fail_calls={4}), cls=HalvingTrainer, halve=False)  # a transient OOM: retried as it was
    assert recovered.ooms == 1 and recovered.state.global_step == reference.state.global_step == 10
    assert all(torch.equal(a, b) for a, b in zip(weights(recovered), weights(reference)))
    assert recovered.state.history["train_loss"] == reference.state.history["train_loss"]  # nothing counted twice


def test_an_oom_in_the_middle_of_an_accumulation_window_recomputes_the_whole_window():
    reference = fit(OOMAt(), accumulate=3)
    recovered = fit(OOMAt(fail_calls={3}), cls=HalvingTrainer, accumulate=3)  # 3rd batch of the first window
    assert recovered.ooms == 1 and recovered.micro_batch_size == 4
    assert recovered.state.global_step == reference.state.global_step
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(recovered), weights(reference)))
    assert recovered.state.history["train_loss"] == pytest.approx(reference.state.history["train_loss"], abs=1e-6)


def test_an_oom_above_a_size_halves_until_it_fits():
    reference = fit(OOMAt())
    recovered = fit(OOMAt(above=3), cls=HalvingTrainer)
    assert recovered.micro_batch_size == 2 and recovered.ooms == 2  # 8 -> 4 (fails) -> 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(recovered), weights(reference)))


def test_without_a_policy_an_oom_propagates_as_it_was():
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        fit(OOMAt(fail_calls={2}))


class CancelSteps(Callback):
    """Cancels the optimizer step attempts numbered in ``attempts`` (0-based, counting cancelled ones)."""

    def __init__(self, attempts: set[int]) -> None:
        self.attempts, self.cancelled, self.seen = attempts, 0, 0

    def before_step(self, trainer: Trainer) -> None:
        self.seen += 1
        if self.seen - 1 in self.attempts:
            raise CancelStepException()

    def after_cancel_step(self, trainer: Trainer) -> None:
        self.cancelled += 1


def test_before_step_can_cancel_the_step_its_values_are_not_tracked():
    cancel = CancelSteps({0, 1, 2, 3, 4})  # every step of the first epoch
    trainer = fit(OOMAt(), callbacks=[cancel], epochs=1)
    assert cancel.cancelled == 5 and trainer.state.global_step == 0
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights(trainer), OOMAt().parameters()))  # seeded init
    assert "train_loss" not in trainer.state.history.records[0]  # no step succeeded: nothing tracked


def test_a_cancelled_step_under_16_mixed_leaves_the_scaler_usable():
    cancel = CancelSteps({1})
    trainer = fit(OOMAt(), callbacks=[cancel], epochs=1, precision="16-mixed")
    assert cancel.cancelled >= 1 and trainer.state.global_step == 4


def test_run_step_is_the_step_fit_takes():
    """One run_step on a batch gives the weights of a one-batch epoch of fit, bit for bit."""
    batch = next(iter(data.loader(data.classification(n=8), batch_size=8)))
    model = OOMAt()
    reference = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
                        progress=False, device="cpu", max_epochs=1, gradient_clip_val=0.5)
    reference.fit([batch])
    model = OOMAt()
    stepped = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), nn.CrossEntropyLoss(),
                      progress=False, device="cpu", gradient_clip_val=0.5)
    stepped.run_step(batch)
    assert stepped.state.global_step == 1 and stepped.state.epoch_samples == 0
    assert all(torch.equal(a, b) for a, b in zip(weights(stepped), weights(reference)))


class KeepsActivation(OOMAt):
    """Fails its first forward after making a tensor; the test checks the retry could free it."""

    def __init__(self) -> None:
        super().__init__(fail_calls={1})
        self.made = None

    def forward(self, x):
        if self.calls == 0:
            activation = self.net[0](x)
            self.made = weakref.ref(activation)
        return super().forward(x)


class ChecksFreed(HalvingTrainer):
    def on_out_of_memory(self, error: BaseException) -> None:
        gc.collect()
        self.freed = self.model.made() is None  # the failed attempt's activations are gone before the retry
        super().on_out_of_memory(error)


def test_the_failed_attempts_tensors_are_freed_before_the_retry():
    trainer = fit(KeepsActivation(), cls=ChecksFreed, halve=False, epochs=1)
    assert trainer.ooms == 1 and trainer.freed


def test_accumulation_under_16_mixed_does_not_scale_gradients_by_the_batch_size():
    """Losses are weighted by their share of the window's first batch (about 1), not by the batch size:
    fp16 gradients multiplied by 256 overflowed and the GradScaler skipped steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress=False,
                      device="cpu", precision="16-mixed", accumulate_grad_batches=2, max_epochs=2)
    trainer.fit(data.loader(data.classification(n=1536), batch_size=256))
    assert trainer.state.global_step == 6 and trainer.state.skipped_steps == 0


class WindowAtStep(Callback):
    tracked = None

    def before_step(self, trainer: Trainer) -> None:
        if self.tracked is None:  # the first window: 3 loader batches
            self.tracked = list(trainer.state.window.tracked)


def test_without_metrics_the_window_keeps_no_outputs():
    seen = WindowAtStep()
    fit(OOMAt(), accumulate=3, epochs=1, callbacks=[seen])
    assert len(seen.tracked) == 3 and all(entry[2] is None and entry[3] is None for entry in seen.tracked)
    assert all(not entry[0].requires_grad for entry in seen.tracked)


def test_run_step_fires_no_events_unless_asked():
    class Steps(Callback):
        count = 0

        def after_step(self, trainer):
            Steps.count += 1

    model = OOMAt()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), progress=False,
                      device="cpu", callbacks=[Steps()])
    batch = next(iter(data.loader(data.classification(n=8), batch_size=8)))
    trainer.run_step(batch)
    assert Steps.count == 0 and trainer.state.global_step == 1
    trainer.run_step(batch, events=True)
    assert Steps.count == 1


def test_a_batch_cancelled_at_a_window_boundary_keeps_the_windows_boundaries():
    from adaptrain import CancelBatchException

    class CancelSecond(Callback):
        def before_batch(self, trainer):
            if trainer.state.batch_idx == 2:
                raise CancelBatchException()

    steps = CountBatches()
    trainer = fit(OOMAt(), accumulate=2, epochs=1, callbacks=[CancelSecond(), steps])  # 5 batches of 8
    assert steps.windows == [1, 2, 1] and trainer.state.global_step == 3  # [1] [3 4] [5], not [1 3 4] [5]


class CountBatches(Callback):
    """Loader batches (by index) whose gradients each optimizer step used."""

    def __init__(self) -> None:
        self.windows: list[int] = []

    def before_step(self, trainer):
        self.windows.append(len(trainer.state.window.batches))


class StepRecord(Callback):
    """What the events a plain run fires see: position, step, lr and running loss (no after_backward or
    before_step hook: implementing one sends the run down the windowed path)."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def before_batch(self, trainer: Trainer) -> None:
        self.seen.append(("before_batch", trainer.state.batch_idx, trainer.state.global_step))

    def after_step(self, trainer: Trainer) -> None:
        state = trainer.state
        self.seen.append(("after_step", state.batch_idx, state.global_step, state.step_lr, state.lr))

    def after_batch(self, trainer: Trainer) -> None:
        self.seen.append(("after_batch", trainer.state.batch_idx, dict(trainer.state.running)))

    def after_train(self, trainer: Trainer) -> None:
        self.seen.append(("after_train", trainer.state.global_step))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


def run_plain_candidate(options: dict) -> tuple[Trainer, StepRecord]:
    model, record = OOMAt(), StepRecord()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3) if options.get("scheduler") else None
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), metrics=options.get("metrics"), scheduler=scheduler,
                      precision=options.get("precision", "32"), progress=False, seed=0, device="cpu", max_epochs=2,
                      log_every_n_steps=2, callbacks=[record])
    if scheduler is not None:
        trainer.state.scheduler_interval = "step"
    trainer.fit(data.loader(data.classification(n=36), batch_size=8, shuffle=True))  # 5 batches, the last of 4
    return trainer, record


@pytest.mark.parametrize("options", [{}, {"metrics": {"acc": accuracy}}, {"scheduler": True},
                                     {"precision": "16-mixed"}], ids=["fp32", "metrics", "step-scheduler", "16-mixed"])
def test_plain_batches_train_exactly_as_the_windowed_path(options, monkeypatch):
    """The plain path (no window bookkeeping) is an optimisation only: weights, history and what every
    event sees are those of the general path, bit for bit."""
    plain_batches = []
    general = TrainingLoop._train_plain_batch
    monkeypatch.setattr(TrainingLoop, "_train_plain_batch",
                        lambda self, batch: (plain_batches.append(1), general(self, batch))[1])
    plain, plain_record = run_plain_candidate(options)
    assert len(plain_batches) == 10  # every batch of both epochs took the plain path
    monkeypatch.setattr(TrainingLoop, "_plain_step_applies", lambda self: False)
    windowed, windowed_record = run_plain_candidate(options)
    assert len(plain_batches) == 10  # none more: the windowed run did not
    assert all(torch.equal(a, b) for a, b in zip(weights(plain), weights(windowed)))
    timing = {"epoch_time", "samples_per_s", "data_time", "compute_time"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in plain.state.history.records] == \
        [{k: v for k, v in r.items() if k not in timing} for r in windowed.state.history.records]
    assert plain_record.seen == windowed_record.seen and len(plain_record.seen) == 32
    assert plain.state.global_step == windowed.state.global_step == 10


def test_a_mid_epoch_oom_moves_the_following_batches_to_the_windowed_path(monkeypatch):
    """After the OOM policy splits the batch, the plain path no longer applies: the next batch is windowed."""
    taken = []
    for name in ("_train_plain_batch", "_train_batch"):
        original = getattr(TrainingLoop, name)
        monkeypatch.setattr(TrainingLoop, name, lambda self, batch, name=name, original=original:
                            (taken.append(name), original(self, batch))[1])
    recovered = fit(OOMAt(fail_calls={2}), cls=HalvingTrainer, epochs=1)  # the 2nd batch's forward fails
    assert taken == ["_train_plain_batch"] * 2 + ["_train_batch"] * 3 and recovered.micro_batch_size == 4
    reference = fit(OOMAt(), epochs=1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights(recovered), weights(reference)))


class FailsInBackward(torch.autograd.Function):
    """Identity forward; the first backward after ``armed`` raises a (simulated) OOM."""
    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if FailsInBackward.armed:
            FailsInBackward.armed = False
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, in backward)")
        return grad


class WideWithBackwardOOM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 1024), nn.Linear(1024, 3)
        self.made = None

    def forward(self, x):
        hidden = torch.relu(self.a(x))
        if self.made is None:
            self.made = weakref.ref(hidden)
        return FailsInBackward.apply(self.b(hidden))


def loss_with_parts(outputs, targets):
    ce = nn.functional.cross_entropy(outputs, targets)
    return {"loss": ce, "aux": ce * 0.5}


class RecordsRetry(Trainer):
    """Splits the batch after an OOM; records whether the failed attempt's activation was freed by then,
    and what exception after_step of the recovered step runs under."""

    def on_out_of_memory(self, error: BaseException) -> None:
        gc.collect()
        self.freed = self.model.made() is None
        self.micro_batch_size = 4


class ExceptionAtStep(Callback):
    def __init__(self) -> None:
        self.seen: list = []

    def after_step(self, trainer: Trainer) -> None:
        self.seen.append(sys.exc_info()[0])


@pytest.mark.parametrize("path", ["plain", "windowed"])
def test_an_oom_in_backward_frees_the_attempt_and_the_retry_runs_outside_the_oom(path, monkeypatch):
    """The loss parts (a dict criterion) hold the failed attempt's graph too; and the recovered step's
    callbacks must not run inside the OOM's handler (its errors would be chained to the OOM)."""
    if path == "windowed":
        monkeypatch.setattr(TrainingLoop, "_plain_step_applies", lambda self: False)
    model, seen = WideWithBackwardOOM(), ExceptionAtStep()
    trainer = RecordsRetry(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_with_parts, progress=False,
                           seed=0, device="cpu", max_epochs=1, callbacks=[seen])
    FailsInBackward.armed = True
    trainer.fit(data.loader(data.classification(n=16), batch_size=8))
    assert not FailsInBackward.armed and trainer.micro_batch_size == 4  # the OOM happened and was recovered
    assert trainer.freed and seen.seen == [None, None] and trainer.state.global_step == 2


class AccumulateUntil(Callback):
    """Accumulates 2 batches a step, then from batch ``switch_after`` on, 1 (a change in mid-window)."""

    def __init__(self, switch_after: int) -> None:
        self.switch_after = switch_after
        self.steps_after_batch: list[int] = []  # global_step after each batch (no before_step hook: that
        # would keep the run off the plain path)

    def after_batch(self, trainer: Trainer) -> None:
        self.steps_after_batch.append(trainer.state.global_step)
        if trainer.state.batch_idx == self.switch_after:
            trainer.state.accumulate_grad_batches = 1


def test_accumulation_switched_off_mid_window_closes_the_window_before_plain_batches(monkeypatch):
    runs = []
    for windowed in (False, True):
        if windowed:
            monkeypatch.setattr(TrainingLoop, "_plain_step_applies", lambda self: False)
        switch = AccumulateUntil(switch_after=3)
        trainer = fit(OOMAt(), accumulate=2, epochs=1, callbacks=[switch])
        runs.append((trainer, switch.steps_after_batch))
    (plain, plain_steps), (windowed, windowed_steps) = runs
    assert windowed_steps == [0, 1, 1, 2, 3]  # batches [1 2] [3 4] [5]: the switch after 3 waits for the window
    assert plain_steps == windowed_steps and plain.state.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(weights(plain), weights(windowed)))
    assert plain.state.history["train_loss"] == windowed.state.history["train_loss"]


def test_a_run_with_model_checkpoint_takes_the_plain_path(tmp_path, monkeypatch):
    """ModelCheckpoint's signal handling implements before_batch (release held signals): the plain path
    fires it like the windowed one, so checkpointed runs keep the cheaper step."""
    from adaptrain import ModelCheckpoint

    plain_batches = []
    general = TrainingLoop._train_plain_batch
    monkeypatch.setattr(TrainingLoop, "_train_plain_batch",
                        lambda self, batch: (plain_batches.append(1), general(self, batch))[1])
    trainer = fit(OOMAt(), epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor="train_loss")])
    assert trainer._hooks["before_batch"] and len(plain_batches) == 5
    assert (tmp_path / "last.ckpt").exists()
