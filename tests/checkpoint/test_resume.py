"""Exact resume: a run interrupted anywhere and resumed ends bit-identical to one that never stopped.

In-process tests interrupt with a crash or a CancelFitException and resume with a fresh Trainer whose
model, optimizer and loader generator start elsewhere (so only the checkpoint can make them match).
Subprocess tests kill a real training process with SIGKILL at random moments, mid-write included,
and stop one with SIGTERM.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torchmetrics
from safetensors.torch import load_file
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from adaptrain import Callback, CancelFitException, Trainer
from adaptrain.callbacks.checkpointing import ModelCheckpoint
from adaptrain.checkpoint.io import CheckpointError, load_checkpoint
from adaptrain.core.history import TIMING_KEYS  # wall-clock columns: they differ between runs
from tests.common import data
from tests.scripts import resume_worker

WORKER = Path(__file__).parents[1] / "scripts" / "resume_worker.py"


def make_trainer(callbacks=(), model_seed=0, accumulate=3, max_epochs=3, **kwargs) -> Trainer:
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    return Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                   metrics={"acc": torchmetrics.classification.MulticlassAccuracy(3),
                            "top": lambda out, y: (out.argmax(1) == y).float().mean()},
                   scheduler=functools.partial(OneCycleLR, max_lr=0.05), accumulate_grad_batches=accumulate,
                   max_epochs=max_epochs, callbacks=list(callbacks), progress=False, seed=0, device="cpu", **kwargs)


def loaders(own_generator: bool, generator_seed: int = 0):
    """100 samples in batches of 8: 13 batches, windows of 3 -> steps at batches 3, 6, 9, 12, 13."""
    dataset = data.classification(n=100)
    generator = torch.Generator().manual_seed(generator_seed) if own_generator else None
    train = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, generator=generator)
    return train, torch.utils.data.DataLoader(dataset, batch_size=50)


class _Interrupt(Callback):
    """Raises ``error`` at the ``at``-th event of its kind in the run (counted across epochs)."""

    order = 99  # after ModelCheckpoint: a checkpoint due at that point is written first

    def __init__(self, at: int, error: type[BaseException] = RuntimeError) -> None:
        self.at, self.error, self.seen = at, error, 0

    def _count(self) -> None:
        self.seen += 1
        if self.seen == self.at:
            raise self.error("interrupted by the test")


class _AfterBatch(_Interrupt):
    def after_batch(self, trainer: Trainer) -> None:
        self._count()


class _AfterStep(_Interrupt):
    def after_step(self, trainer: Trainer) -> None:
        self._count()


def records(history) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history.records]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), f"{name} differs after resume"


@pytest.fixture(scope="module")
def reference():
    """Uninterrupted runs, one per shuffle source (the loader's generator, or the global RNG)."""
    runs = {}
    for own_generator in (True, False):
        trainer = make_trainer()
        history = trainer.fit(*loaders(own_generator))
        runs[own_generator] = (trainer, records(history))
    return runs


@pytest.mark.parametrize("own_generator", [True, False], ids=["loader-generator", "global-rng"])
@pytest.mark.parametrize("case", ["mid-window", "epoch-boundary", "cancel-after-step"])
def test_interrupted_run_resumes_bit_identical(tmp_path, reference, own_generator, case):
    ref_trainer, ref_records = reference[own_generator]
    if case == "mid-window":  # saves at even steps; dies at epoch 2, batch 7: 4 batches after step 6's save
        saver, stopper = ModelCheckpoint(tmp_path, every_n_train_steps=2), _AfterBatch(20)
    elif case == "epoch-boundary":  # epoch checkpoints only; dies in the middle of epoch 2
        saver, stopper = ModelCheckpoint(tmp_path), _AfterBatch(19)
    else:  # a clean stop right after step 8 (epoch 2, batch 9), saved by a step checkpoint
        saver, stopper = ModelCheckpoint(tmp_path, every_n_train_steps=1), _AfterStep(8, CancelFitException)
    first = make_trainer([saver, stopper])
    try:
        first.fit(*loaders(own_generator))
    except RuntimeError:
        pass
    assert first.state.epoch < 3  # really interrupted
    saved = load_checkpoint(tmp_path / "last.ckpt")["counters"]
    expected = {"mid-window": (1, 6, 3), "epoch-boundary": (1, 5, 0), "cancel-after-step": (1, 8, 9)}[case]
    assert (saved["epoch"], saved["global_step"], saved["batch_idx"]) == expected

    # A fresh process would rebuild everything: other initial weights and another loader seed.
    resumed = make_trainer([ModelCheckpoint(tmp_path, every_n_train_steps=2)], model_seed=123)
    history = resumed.fit(*loaders(own_generator, generator_seed=7), ckpt_path="last")

    assert_same_weights(resumed.model, ref_trainer.model)
    assert records(history) == ref_records  # epochs 1-3 once each; the resumed epoch's train_loss is whole
    assert resumed.state.global_step == ref_trainer.state.global_step


@pytest.mark.filterwarnings("ignore:.*holds the state of callback")
def test_resume_from_a_named_checkpoint_and_from_the_end(tmp_path, reference):
    ref_trainer, ref_records = reference[True]
    make_trainer([ModelCheckpoint(tmp_path, save_top_k=-1, every_n_train_steps=4)]).fit(*loaders(True))
    names = sorted(p.name for p in tmp_path.glob("epoch=*.ckpt"))
    assert "epoch=1-step=4.ckpt" in names and "epoch=3-step=15.ckpt" in names

    from_step_4 = make_trainer(model_seed=5)
    history = from_step_4.fit(*loaders(True), ckpt_path=tmp_path / "epoch=1-step=4.ckpt")
    assert_same_weights(from_step_4.model, ref_trainer.model)
    assert records(history) == ref_records

    finished = make_trainer(model_seed=5)  # resuming a finished run trains nothing more
    history = finished.fit(*loaders(True), ckpt_path=tmp_path / "last.ckpt")
    assert_same_weights(finished.model, ref_trainer.model)
    assert records(history) == ref_records


@pytest.mark.filterwarnings("ignore:.*holds the state of callback")
def test_resumed_epoch_loss_covers_the_whole_epoch(tmp_path, reference):
    """Without the saved sums the resumed epoch's train_loss would average only its last batches."""
    ref_trainer, ref_records = reference[True]
    first = make_trainer([ModelCheckpoint(tmp_path, every_n_train_steps=1), _AfterBatch(12)], max_epochs=3)
    with pytest.raises(RuntimeError):
        first.fit(*loaders(True))
    progress = load_checkpoint(tmp_path / "last.ckpt")["progress"]
    assert progress["losses"]["loss"]["count"] == 96  # 12 batches of 8 trained before the crash
    resumed = make_trainer()
    history = resumed.fit(*loaders(True), ckpt_path=tmp_path / "last.ckpt")
    assert history.records[0]["train_loss"] == ref_records[0]["train_loss"]
    assert history.records[0]["train_acc"] == ref_records[0]["train_acc"]


def test_last_needs_a_model_checkpoint_and_a_saved_file(tmp_path):
    with pytest.raises(CheckpointError, match="needs a ModelCheckpoint"):
        make_trainer().fit(*loaders(True), ckpt_path="last")
    with pytest.raises(CheckpointError, match=r"last\.ckpt: does not exist"):
        make_trainer([ModelCheckpoint(tmp_path)]).fit(*loaders(True), ckpt_path="last")


@pytest.mark.filterwarnings("ignore:.*steps_per_epoch")
def test_changed_accumulation_warns_but_resumes(tmp_path):
    make_trainer([ModelCheckpoint(tmp_path)], max_epochs=1).fit(*loaders(True))
    with pytest.warns(UserWarning, match="accumulate_grad_batches=3; resuming with 2"):
        make_trainer([ModelCheckpoint(tmp_path)], accumulate=2, max_epochs=1).fit(
            *loaders(True), ckpt_path=tmp_path / "last.ckpt")


# ---------------------------------------------------------------------- real processes, real signals
class Worker:
    """``python tests/scripts/resume_worker.py`` in a fresh interpreter, its stdout read line by line."""

    def __init__(self, folder: Path, *args: str, new_session: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
        self.process = subprocess.Popen([sys.executable, str(WORKER), str(folder), *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=new_session)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.process.kill()
                raise AssertionError(f"worker gave no {prefix!r} line; stderr:\n{self.process.stderr.read()}")
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout)
        self.stderr = self.process.stderr.read()
        return code


class ForkedWorker:
    """:func:`resume_worker.run` in a process forked from a server that imported torch once.

    A real process with its own memory, killed by a real SIGKILL, resuming from disk; it only skips
    the ~2 s of CPU a fresh interpreter spends importing torch (ten restarts would cost 20 s or more).
    """

    def __init__(self, context, folder: Path, *args: str) -> None:
        self.messages, writer = context.Pipe(duplex=False)
        self.process = context.Process(target=resume_worker.run, args=([str(folder), *args], writer), daemon=True)
        self.process.start()
        writer.close()  # the child holds the only writer: its death ends the pipe

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.messages.poll(max(0.0, deadline - time.monotonic())):
                    raise EOFError
                line = self.messages.recv()
            except EOFError:
                self.process.kill()
                raise AssertionError(f"worker gave no {prefix!r} line (exit code {self.process.exitcode})") from None
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float = 120.0) -> int:
        self.process.join(timeout)
        return self.process.exitcode


@pytest.fixture(scope="module")
def fork_server():
    context = multiprocessing.get_context("forkserver")
    # torch and adaptrain, imported once; torch._dynamo too: building any optimizer imports it (~2 s)
    context.set_forkserver_preload(["tests.scripts.resume_worker", "torch._dynamo"])
    return context


def final_state(folder: Path) -> tuple[dict, list]:
    history = json.loads((folder / "history.json").read_text())
    return load_file(folder / "final.safetensors"), [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                                                     for r in history]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_or_corrupts(tmp_path, fork_server):
    """Ten SIGKILLs at random moments (every third one inside a checkpoint write), each followed by a resume.

    The kills inside a write do not depend on timing: that worker stops in its write (``--hold-write``)
    and is killed there; the others are killed after a random delay, wherever they are.
    """
    reference = ForkedWorker(fork_server, tmp_path / "reference")  # alongside: no sleeps, same arithmetic
    folder, rng = tmp_path / "killed", random.Random(0)
    slow = ["--step-sleep", "0.025", "--slow-write", "0.01"]  # ~60% of the time is spent writing
    resumed_at, mid_write_kills = [], 0
    for attempt in range(10):
        inside_write = attempt % 3 == 2
        worker = ForkedWorker(fork_server, folder, *slow, *(["--hold-write"] if inside_write else []))
        resumed_at.append(int(worker.wait_for("started").split()[1]))  # restored: last.ckpt loaded fine
        if inside_write:
            worker.wait_for("writing")  # it now waits inside the write, its temporary file begun
        else:
            time.sleep(rng.uniform(0.2, 1.5))
        worker.process.kill()  # SIGKILL: no handler, no clean-up
        assert worker.finish() == -signal.SIGKILL, "the worker finished before it was killed"
        mid_write_kills += any(folder.glob("checkpoints/.*.tmp-*"))
        for path in (folder / "checkpoints").glob("*.ckpt"):
            load_checkpoint(path)  # every file that has a checkpoint's name is complete and readable
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > 0  # progress kept, never went back
    assert mid_write_kills >= 3, "a kill inside a checkpoint write left no temporary file behind"

    last = ForkedWorker(fork_server, folder)  # the last leg at full speed: sleeps change timing, not arithmetic
    assert last.finish() == 0 and reference.finish() == 0
    assert not list(folder.glob("checkpoints/.*.tmp-*"))  # stale temporaries were cleaned up
    (weights, history), (ref_weights, ref_history) = final_state(folder), final_state(tmp_path / "reference")
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert history == ref_history and [r["epoch"] for r in history] == list(range(1, 17))


@pytest.mark.slow
def test_sigterm_saves_within_one_step_and_exits_143(tmp_path):
    worker = Worker(tmp_path, "--step-sleep", "0.02", "--every-n-steps", "1000")
    worker.wait_for("step 7")
    worker.process.send_signal(signal.SIGTERM)
    assert "SIGTERM received" in worker.wait_for("SIGTERM")  # the trainer says what it did
    line = worker.wait_for("interrupted")
    assert worker.finish() == 143, worker.stderr
    fields = dict(item.split("=", 1) for item in line.split()[1:])
    signal_step, saved_step = int(fields["signal_step"]), int(fields["saved_step"])
    assert signal_step >= 7 and saved_step - signal_step in (0, 1)
    ckpt = load_checkpoint(fields["path"])
    assert ckpt["counters"]["global_step"] == saved_step and fields["path"].endswith("last.ckpt")


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_with_loader_workers_still_saves(tmp_path):
    # SLURM's time limit signals every process of the job, DataLoader workers included.
    worker = Worker(tmp_path, "--step-sleep", "0.02", "--every-n-steps", "1000", "--workers", "2", new_session=True)
    worker.wait_for("step 5")
    os.killpg(worker.process.pid, signal.SIGTERM)
    line = worker.wait_for("interrupted")
    assert worker.finish() == 143, worker.stderr
    fields = dict(item.split("=", 1) for item in line.split()[1:])
    assert load_checkpoint(fields["path"])["counters"]["global_step"] == int(fields["saved_step"]) >= 5


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    make = lambda: Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),  # noqa: E731
                           max_epochs=2, progress=False, device="cpu", callbacks=[ModelCheckpoint(tmp_path)])
    loader = data.loader(data.classification(n=16), batch_size=8)
    make().fit(loader)
    with pytest.warns(UserWarning, match="the checkpoint is at epoch 2 and max_epochs is 2: nothing left to train"):
        make().fit(loader, ckpt_path="last")
