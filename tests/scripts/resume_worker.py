"""A small training run that checkpoints often, for the fault-injection and signal tests.

Usage: ``python resume_worker.py DIR [--epochs N] [--every-n-steps K] [--step-sleep S] [--slow-write S]
[--workers W] [--new-session] [--signal-in-worker-start]``

It resumes from ``DIR/checkpoints/last.ckpt`` when that exists and says, one line each:
``started <global_step>`` once restored, ``step <n>`` after each optimizer step, ``epoch <n>`` after
each epoch, ``writing`` when a checkpoint write begins (with ``--slow-write``), ``done`` at the end (after writing
``DIR/final.safetensors`` and ``DIR/history.json``). On SIGTERM / SIGINT it says
``interrupted signal_step=.. saved_step=.. path=..`` and exits with adaptrain's code (143 / 130).

As a script it prints the lines. Tests that start many workers call :func:`run` in processes
forked from a server that imported torch once (a fresh interpreter costs ~2 s of CPU each);
the lines then go through ``channel``.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader, TensorDataset

import adaptrain.checkpoint.io
from adaptrain import Callback, Trainer
from adaptrain.callbacks.checkpointing import ModelCheckpoint
from adaptrain.callbacks.signals import TrainingInterrupted
from adaptrain.checkpoint.io import save_weights

_channel: Any = None  # a multiprocessing Connection when run in a forked worker; None: print


def _say(text: str) -> None:
    if _channel is not None:
        _channel.send(text)
    else:
        print(text, flush=True)


class _Report(Callback):
    """Says where training is, and makes each step take at least ``step_sleep`` seconds."""

    def __init__(self, step_sleep: float, arm: Path | None = None) -> None:
        self.step_sleep, self.arm = step_sleep, arm

    def before_fit(self, trainer: Trainer) -> None:
        _say(f"started {trainer.state.global_step}")

    def after_step(self, trainer: Trainer) -> None:
        time.sleep(self.step_sleep)
        _say(f"step {trainer.state.global_step}")

    def after_epoch(self, trainer: Trainer) -> None:
        if self.arm is not None and trainer.state.epoch == 1:
            self.arm.touch()  # the next loader worker to start signals the group (see _signal_in_worker_start)
        _say(f"epoch {trainer.state.epoch}")


def _signal_in_worker_start(arm: Path) -> None:
    """Fault injection: once ``arm`` exists, the first loader worker to start sends SIGTERM to the process
    group from inside torch's worker start-up, right after torch installed its own SIGTERM handler and
    before ``worker_init_fn`` runs: the moment a group signal used to kill the workers."""
    from torch.utils.data._utils import signal_handling

    install = signal_handling._set_worker_signal_handlers

    def install_then_signal(*args: Any) -> None:
        install(*args)
        try:
            os.rename(arm, arm.with_suffix(".fired"))  # atomic: one worker of one epoch fires, once
        except FileNotFoundError:
            return
        os.killpg(0, signal.SIGTERM)

    signal_handling._set_worker_signal_handlers = install_then_signal


def _slow_writes(delay: float, hold: bool = False) -> None:
    """Sleep ``delay`` after every 4 KiB of a checkpoint write, and say when a write begins.

    With ``hold``, a write that has begun stops there (its first bytes are in the temporary file)
    until the process is killed: a kill "inside a checkpoint write" that does not depend on timing.
    """
    seen = [0]

    def hook(written: int) -> None:
        if written < seen[0] or seen[0] == 0:  # the count went back: a new file
            _say("writing")
            while hold:
                time.sleep(60)
        if written // 4096 > seen[0] // 4096:
            time.sleep(delay)
        seen[0] = written

    adaptrain.checkpoint.io._write_hook = hook


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()  # a callable metric: torchmetrics takes 2 s to import


def build(folder: Path, epochs: int, every_n_steps: int, step_sleep: float,
          workers: int = 0, arm: Path | None = None) -> tuple[Trainer, DataLoader, DataLoader]:
    """Dropout, a shuffling loader with its own generator, OneCycleLR, windows of 3 batches (30 per epoch)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 8, generator=g)
    data = TensorDataset(x, x[:, :3].argmax(1))
    # Workers forked from this process (Linux's default up to Python 3.13), also when this process was
    # itself started by a forkserver, whose children default to asking the server for theirs: those
    # would be no children of this process and outside its process group.
    train = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1),
                       num_workers=workers, multiprocessing_context="fork" if workers else None)
    val = DataLoader(data, batch_size=80)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=0.01), nn.CrossEntropyLoss(),
                      metrics={"acc": _accuracy}, scheduler=functools.partial(OneCycleLR, max_lr=0.05),
                      accumulate_grad_batches=3, max_epochs=epochs, progress=False, seed=0, device="cpu",
                      callbacks=[ModelCheckpoint(folder / "checkpoints", every_n_train_steps=every_n_steps,
                                                 save_top_k=2), _Report(step_sleep, arm)])
    return trainer, train, val


def run(argv: list[str], channel: Any = None) -> int:
    global _channel
    _channel = channel
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--every-n-steps", type=int, default=5)
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--slow-write", type=float, default=0.0)
    parser.add_argument("--hold-write", action="store_true", help="stop inside the first checkpoint write")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--new-session", action="store_true",
                        help="lead a process group of its own (with its loader workers): os.killpg reaches only them")
    parser.add_argument("--signal-in-worker-start", action="store_true",
                        help="after epoch 1, a starting loader worker sends SIGTERM to the process group")
    args = parser.parse_args(argv)
    if args.new_session:
        os.setsid()
    arm = args.dir / "arm-signal" if args.signal_in_worker_start else None
    if arm is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        _signal_in_worker_start(arm)
    torch.set_num_threads(1)  # the same reduction order in every process: bit-identical results
    if args.slow_write or args.hold_write:
        _slow_writes(args.slow_write, hold=args.hold_write)
    trainer, train, val = build(args.dir, args.epochs, args.every_n_steps, args.step_sleep, args.workers, arm)
    last = args.dir / "checkpoints" / "last.ckpt"
    try:
        history = trainer.fit(train, val, ckpt_path="last" if last.exists() else None)
    except TrainingInterrupted as stop:
        _say(f"interrupted signal_step={stop.signal_step} saved_step={stop.saved_step} path={stop.checkpoint}")
        raise
    save_weights(trainer.model, args.dir / "final.safetensors")
    history.to_json(args.dir / "history.json")
    _say("done")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
