"""ModelCheckpoint (when, which files, top-k, last.ckpt) and SignalHandler (real signals, in-process)."""

from __future__ import annotations

import os
import signal
import stat
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from adaptrain import Callback, ConfigError, NonFiniteLossError, Trainer
from adaptrain.callbacks.checkpointing import ModelCheckpoint, NonFiniteWeightsError
from adaptrain.callbacks.signals import SignalHandler, TrainingInterrupted
from adaptrain.checkpoint.io import load_checkpoint
from tests.common import data


def make_trainer(callbacks=(), max_epochs=4, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), progress=False,
                   seed=0, device="cpu", max_epochs=max_epochs, callbacks=list(callbacks), **kwargs)


def loaders():
    """48 samples in batches of 8: 6 batches, 6 steps an epoch."""
    dataset = data.classification(n=48)
    return data.loader(dataset, batch_size=8, shuffle=True), data.loader(dataset, batch_size=48)


class Scores(Callback):
    """Puts a chosen ``val_score`` into each epoch's record."""

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def after_validate(self, trainer: Trainer) -> None:
        trainer.state.epoch_logs["val_score"] = self.scores[trainer.state.epoch]


def ckpt_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- which files
def test_top_k_by_a_monitored_value_with_names_that_carry_it(tmp_path):
    saver = ModelCheckpoint(tmp_path, monitor="val_score", mode="max", save_top_k=2)
    make_trainer([saver, Scores([0.5, 0.9, 0.7, 0.8])]).fit(*loaders())
    assert ckpt_names(tmp_path) == ["epoch=2-step=12-val_score=0.9000.ckpt", "epoch=4-step=24-val_score=0.8000.ckpt",
                                    "last.ckpt"]
    assert saver.best_model_path == str(tmp_path / "epoch=2-step=12-val_score=0.9000.ckpt")
    assert load_checkpoint(tmp_path / "last.ckpt")["counters"]["global_step"] == 24
    assert os.path.samefile(tmp_path / "last.ckpt", tmp_path / "epoch=4-step=24-val_score=0.8000.ckpt")


def test_min_mode_and_nan_ranks_last(tmp_path):
    saver = ModelCheckpoint(tmp_path, monitor="val_score", mode="min", save_top_k=2)
    make_trainer([saver, Scores([float("nan"), 0.3, 0.2, 0.4])]).fit(*loaders())
    assert ckpt_names(tmp_path) == ["epoch=2-step=12-val_score=0.3000.ckpt", "epoch=3-step=18-val_score=0.2000.ckpt",
                                    "last.ckpt"]


@pytest.mark.parametrize(("top_k", "expected"), [
    (2, ["epoch=3-step=18.ckpt", "epoch=4-step=24.ckpt", "last.ckpt"]),
    (0, ["last.ckpt"]),
    (-1, ["epoch=1-step=6.ckpt", "epoch=2-step=12.ckpt", "epoch=3-step=18.ckpt", "epoch=4-step=24.ckpt",
          "last.ckpt"]),
])
def test_without_monitor_the_newest_k_are_kept(tmp_path, top_k, expected):
    make_trainer([ModelCheckpoint(tmp_path, save_top_k=top_k)]).fit(*loaders())
    assert ckpt_names(tmp_path) == expected


def test_step_checkpoints_and_a_final_save_when_no_epoch_save_was_due(tmp_path):
    saver = ModelCheckpoint(tmp_path, every_n_epochs=3, every_n_train_steps=4, save_top_k=-1)
    make_trainer([saver], max_epochs=4).fit(*loaders())
    steps = sorted(int(name.split("step=")[1].split(".")[0]) for name in ckpt_names(tmp_path) if "step=" in name)
    assert steps == [4, 8, 12, 16, 18, 20, 24]  # every 4 steps, and the end of epoch 3 (step 18)
    last = load_checkpoint(tmp_path / "last.ckpt")["counters"]
    assert (last["epoch"], last["global_step"], last["batch_idx"]) == (4, 24, 0)  # the clean end, not step 24's


def test_step_checkpoints_with_a_monitor_only_update_last(tmp_path):
    saver = ModelCheckpoint(tmp_path, monitor="val_loss", every_n_epochs=0, every_n_train_steps=5)
    make_trainer([saver], max_epochs=1).fit(*loaders())
    assert ckpt_names(tmp_path) == ["last.ckpt"]
    assert load_checkpoint(tmp_path / "last.ckpt")["counters"]["global_step"] == 6  # the clean end


def test_default_folder_is_the_run_dir_or_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_trainer([ModelCheckpoint()], max_epochs=1).fit(*loaders())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    trainer = make_trainer([ModelCheckpoint()], max_epochs=1)
    trainer.run_dir = tmp_path / "runs" / "x"
    trainer.fit(*loaders())
    assert (tmp_path / "runs" / "x" / "checkpoints" / "last.ckpt").is_file()


def test_a_monitor_no_loader_produces_is_a_config_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r'monitor=\.\.\.\) is "val_los", which no loader produces.*'
                                          r'Did you mean "val_loss"\?'):
        make_trainer([ModelCheckpoint(tmp_path, monitor="val_los")]).fit(*loaders())
    assert not (tmp_path / "last.ckpt").exists()  # caught by the sanity pass, before any step or file
    with pytest.raises(ConfigError, match="fit\\(\\) got no val_loader"):
        make_trainer([ModelCheckpoint(tmp_path, monitor="val_loss")]).fit(loaders()[0])


@pytest.mark.parametrize("kwargs", [{"mode": "best"}, {"save_top_k": -2}, {"every_n_train_steps": 1.5}])
def test_bad_arguments_are_named(kwargs):
    with pytest.raises(ValueError, match=f"ModelCheckpoint\\({next(iter(kwargs))}="):
        ModelCheckpoint(**kwargs)


def test_files_superseded_by_a_save_that_was_killed_are_deleted_on_resume(tmp_path):
    make_trainer([ModelCheckpoint(tmp_path)], max_epochs=2).fit(*loaders())
    saver = ModelCheckpoint(tmp_path)
    saver.load_state_dict({"best": {}, "recent": ["epoch=2-step=12.ckpt"], "superseded": ["epoch=1-step=6.ckpt"]})
    (tmp_path / "epoch=1-step=6.ckpt").write_bytes(b"left over")
    dead = tmp_path / ".last.ckpt.tmp-999999999-abcd"  # no such process: a killed writer's temporary
    dead.write_bytes(b"half")
    alive = tmp_path / f".last.ckpt.tmp-{os.getppid()}-abcd"  # a live process's: left alone
    alive.write_bytes(b"half")
    make_trainer([saver], max_epochs=2).fit(*loaders(), ckpt_path=tmp_path / "last.ckpt")
    assert not (tmp_path / "epoch=1-step=6.ckpt").exists() and not dead.exists() and alive.exists()


# ---------------------------------------------------------------------- never a NaN checkpoint
class NanInTraining(nn.Module):
    """A linear model whose ``bad``-th training forward (1-based; evaluation passes do not count) is NaN."""

    def __init__(self, bad: int | None) -> None:
        super().__init__()
        self.lin, self.bad, self.train_calls = nn.Linear(8, 3), bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        if self.training:
            self.train_calls += 1
            if self.train_calls == self.bad:
                return out * float("nan")
        return out


def nan_trainer(callbacks=(), bad_call=None, max_epochs=3, **kwargs) -> Trainer:
    """With loaders() (6 batches an epoch), training forward 9 is epoch 2, batch 3: optimizer step 9,
    after which the weights are NaN; the loss is read only at the epoch's end (log_every_n_steps 20)."""
    torch.manual_seed(0)
    model = NanInTraining(bad_call)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), progress=False,
                   seed=0, device="cpu", max_epochs=max_epochs, callbacks=list(callbacks), **kwargs)


def assert_finite_checkpoint(path: Path, step: int) -> None:
    ckpt = load_checkpoint(path)
    assert ckpt["counters"]["global_step"] == step
    assert all(torch.isfinite(value).all() for value in ckpt["model"].values())


@pytest.mark.parametrize("monitor", [None, "val_loss"])
def test_a_nan_loss_never_reaches_a_checkpoint_and_the_last_good_one_is_kept(tmp_path, monitor):
    saver = ModelCheckpoint(tmp_path, monitor=monitor, every_n_train_steps=2, save_top_k=1)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 3 \\(optimizer step 9\\)"):
        nan_trainer([saver], bad_call=9).fit(*loaders())
    # The save due at step 10 (weights NaN since step 9) was refused before it wrote or rotated anything.
    best = "epoch=1-step=6-val_loss=" if monitor else "epoch=2-step=8.ckpt"
    names = ckpt_names(tmp_path)
    assert len(names) == 2 and names[0].startswith(best) and names[1] == "last.ckpt", names
    assert_finite_checkpoint(tmp_path / "last.ckpt", step=8)
    assert_finite_checkpoint(tmp_path / names[0], step=6 if monitor else 8)
    assert saver.best_model_path == str(tmp_path / names[0])
    for start in (tmp_path / "last.ckpt", tmp_path / names[0]):  # both resume, to the end of the run
        resumed = nan_trainer([ModelCheckpoint(tmp_path / "resumed", monitor=monitor)])
        history = resumed.fit(*loaders(), ckpt_path=start)
        assert [r["epoch"] for r in history.records] == [1, 2, 3] and resumed.state.global_step == 18
        assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


class PoisonWeights(Callback):
    """Writes an Inf into a weight after optimizer step ``step`` (before ModelCheckpoint sees the step)."""

    order = 50

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer: Trainer) -> None:
        if trainer.state.global_step == self.step:
            with torch.no_grad():
                trainer.model.lin.weight[0, 0] = float("inf")


def test_nan_weights_without_a_nan_loss_are_not_saved_either(tmp_path):
    saver = ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=1)
    with pytest.raises(NonFiniteWeightsError, match=r"NaN or Inf in epoch 1, after optimizer step 4 \(first: "
                                                    rf"lin\.weight\); not saved: {tmp_path / 'last.ckpt'} still holds"):
        nan_trainer([saver, PoisonWeights(4)]).fit(*loaders())
    assert ckpt_names(tmp_path) == ["epoch=1-step=2.ckpt", "last.ckpt"]
    assert_finite_checkpoint(tmp_path / "last.ckpt", step=2)


def test_the_clean_end_and_a_signal_save_are_checked_too(tmp_path):
    class PoisonAtEnd(Callback):
        order = 50

        def after_epoch(self, trainer: Trainer) -> None:
            if trainer.state.epoch == 2:
                with torch.no_grad():
                    trainer.model.lin.weight[0, 0] = float("nan")

    saver = ModelCheckpoint(tmp_path, every_n_epochs=0)  # only the clean end (after_fit) saves
    with pytest.raises(NonFiniteWeightsError, match="no checkpoint was saved yet"):
        nan_trainer([saver, PoisonAtEnd()], max_epochs=2).fit(*loaders())
    assert not tmp_path.exists() or ckpt_names(tmp_path) == []

    # A SIGTERM after the NaN batch: the save it asks for is refused, and the NaN is what fit reports.
    saver = ModelCheckpoint(tmp_path, every_n_epochs=1, save_top_k=1)
    with pytest.raises(NonFiniteLossError, match="epoch 2, batch 3"):
        nan_trainer([saver, SendSignal(10, signal.SIGTERM)], bad_call=9).fit(*loaders())
    assert ckpt_names(tmp_path) == ["epoch=1-step=6.ckpt", "last.ckpt"]
    assert_finite_checkpoint(tmp_path / "last.ckpt", step=6)


# ---------------------------------------------------------------------- signals, in-process
class SendSignal(Callback):
    """Sends ``signals`` to this process after the ``at``-th batch."""

    order = 99

    def __init__(self, at: int, *signals: int) -> None:
        self.at, self.signals, self.seen = at, signals, 0

    def after_batch(self, trainer: Trainer) -> None:
        self.seen += 1
        if self.seen == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)  # delivered to the handler before os.kill returns


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_at_the_next_step_and_resume_matches(tmp_path, signum, code):
    before = signal.getsignal(signum)
    trainer = make_trainer([ModelCheckpoint(tmp_path), SendSignal(9, signum)], accumulate_grad_batches=2)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(*loaders())
    assert stop.value.code == code and isinstance(stop.value, SystemExit)
    assert signal.getsignal(signum) is before  # handlers put back
    # batch 9 = epoch 2, batch 3: mid-window (steps every 2 batches); the step at batch 4 is step 5
    assert (stop.value.signal_step, stop.value.saved_step) == (4, 5)
    assert str(stop.value).startswith(f"{signal.Signals(signum).name} received at step 4: training stopped, "
                                      f"saved {tmp_path / 'last.ckpt'} at step 5")
    assert load_checkpoint(tmp_path / "last.ckpt")["counters"]["global_step"] == 5

    reference = make_trainer(accumulate_grad_batches=2)
    reference.fit(*loaders())
    resumed = make_trainer([ModelCheckpoint(tmp_path)], accumulate_grad_batches=2)
    resumed.fit(*loaders(), ckpt_path="last")
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), reference.model.parameters()))


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    trainer = make_trainer([ModelCheckpoint(tmp_path, every_n_epochs=0), SendSignal(3, signal.SIGINT, signal.SIGINT)])
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(*loaders())
    assert trainer.state.global_step == 3  # no further step, and nothing saved
    assert not (tmp_path / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_sigusr1_under_slurm_saves_and_requeues(tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    trainer = make_trainer([ModelCheckpoint(tmp_path / "ckpt"), SendSignal(2, signal.SIGUSR1)])
    with pytest.raises(TrainingInterrupted, match="the job was requeued") as stop:
        trainer.fit(*loaders())
    assert stop.value.code == 138 and stop.value.requeued
    assert calls.read_text() == "requeue 4242\n"
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_a_failed_requeue_warns_and_still_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    trainer = make_trainer([ModelCheckpoint(tmp_path), SendSignal(2, signal.SIGUSR1)])
    with pytest.warns(UserWarning, match="could not run 'scontrol requeue 7'"), \
            pytest.raises(TrainingInterrupted, match="resume with") as stop:
        trainer.fit(*loaders())
    assert not stop.value.requeued and (tmp_path / "last.ckpt").is_file()


def test_handlers_are_restored_after_fit_and_after_errors(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    make_trainer([ModelCheckpoint(tmp_path)], max_epochs=1).fit(*loaders())
    assert signal.getsignal(signal.SIGTERM) is before
    during = []

    class Boom(Callback):
        def after_step(self, trainer):
            during.append(signal.getsignal(signal.SIGTERM))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make_trainer([ModelCheckpoint(tmp_path), Boom()]).fit(*loaders())
    assert during[0] is not before and signal.getsignal(signal.SIGTERM) is before


def test_an_explicit_signal_handler_replaces_the_checkpoints_own(tmp_path):
    handler = SignalHandler(signals=(signal.SIGTERM,))
    trainer = make_trainer([ModelCheckpoint(tmp_path), handler, SendSignal(2, signal.SIGTERM)])
    with pytest.raises(TrainingInterrupted):
        trainer.fit(*loaders())
    assert trainer.callbacks.find(ModelCheckpoint)[0]._signals is None
    with pytest.raises(ConfigError, match="no ModelCheckpoint to save with"):
        make_trainer([SignalHandler()]).fit(*loaders())


def test_outside_the_main_thread_it_warns_and_trains(tmp_path):
    messages: list[str] = []

    def train() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([ModelCheckpoint(tmp_path)], max_epochs=1).fit(*loaders())
        messages.extend(str(w.message) for w in caught)

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    assert any("outside the main thread" in m for m in messages) and (tmp_path / "last.ckpt").is_file()


class EpochEnds(Callback):
    """Runs after ModelCheckpoint (order 90), like the loggers (95) and the progress bar (100)."""

    order = 95

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.steps: list[int] = []

    def after_step(self, trainer: Trainer) -> None:
        self.steps.append(trainer.state.global_step)

    def after_epoch(self, trainer: Trainer) -> None:
        self.epochs.append(trainer.state.epoch)


class SignalDuringValidation(Callback):
    def before_validate(self, trainer: Trainer) -> None:
        if trainer.state.epoch == 1:  # the second epoch's validation
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_during_validation_reaches_every_after_epoch_before_fit_stops(tmp_path):
    late = EpochEnds()
    trainer = make_trainer([ModelCheckpoint(tmp_path), SignalDuringValidation(), late])
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(*loaders())
    assert stop.value.code == 143
    assert late.epochs == [1, 2]  # the callback after ModelCheckpoint saw the interrupted epoch's end too
    assert len(trainer.state.history.records) == 2
    assert load_checkpoint(tmp_path / "last.ckpt")["counters"]["epoch"] == 2


def test_a_signal_mid_epoch_reaches_every_after_step_before_fit_stops(tmp_path):
    late = EpochEnds()
    trainer = make_trainer([ModelCheckpoint(tmp_path), SendSignal(3, signal.SIGTERM), late])
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(*loaders())
    assert late.steps[-1] == stop.value.saved_step == 4  # signalled after batch 3: saved at the next step
