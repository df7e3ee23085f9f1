"""One training run for the distributed tests, the same script on 1 process or under torchrun.

Usage: ``python ddp_worker.py OUT --strategy ddp|fsdp [--batch B] [--accumulate A] [--shuffle] [--n-val N]
[--epochs E] [--checkpoint-dir DIR] [--resume CKPT] [--fail-rank R --fail-step S]``

Rank zero writes ``OUT/weights.pt`` (the full model state), ``OUT/history.json`` and
``OUT/ranks.json`` (world size, each rank's sampler length); every rank prints ``rank <r> done``.
On one process the loader gets a one-replica DistributedSampler, so its order is the one the ranks
share out: a global batch of ``world_size x B`` on N ranks then holds the samples one process sees
with batch ``N x B``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from adaptrain import Callback, CSVLogger, ModelCheckpoint, Trainer
from adaptrain.distributed.env import end_process_group

N_TRAIN = 44  # 22 per rank: batches of 3 end with a short one


def data(n_val: int) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + n_val, 6, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class FailAt(Callback):
    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def after_step(self, trainer):
        if int(os.environ.get("RANK", 0)) == self.rank and trainer.state.global_step == self.step:
            raise RuntimeError(f"rank {self.rank} fails at step {self.step} (injected)")


class SignalAt(Callback):
    """Sends SIGTERM to this process only, on one rank, after a given step (torchrun would send it to all)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def after_step(self, trainer):
        if int(os.environ.get("RANK", 0)) == self.rank and trainer.state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def mean_abs_error(outputs, targets):  # a plain callable metric: all-reduced with sample weights
    return (outputs.argmax(1) != targets).float().mean()


def uneven_batches(train: TensorDataset, rank: int, world: int) -> list:
    """Pre-cut batches (a plain list: not re-sharded): one process gets chunks of 6, 6, 6, 6, 6, 6, 4, 4;
    on 2 ranks rank 0 takes the first 3 samples of each chunk and rank 1 the rest, so the last two
    steps are 3 samples on rank 0 and 1 on rank 1 (a plain mean over ranks would weight them alike)."""
    x, y = train.tensors
    bounds = [(i, min(i + 6, 40)) for i in range(0, 40, 6)] + [(40, 44)]
    if world == 1:
        return [(x[a:b], y[a:b]) for a, b in bounds]
    split = [(a, min(a + 3, b)) if rank == 0 else (min(a + 3, b), b) for a, b in bounds]
    return [(x[a:b], y[a:b]) for a, b in split]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--batch", type=int, default=3, help="the loader's batch size on this process")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shuffle", action="store_true")
    parser.add_argument("--n-val", type=int, default=15, help="15: the ranks' val shares are 8 and 7 samples")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume")
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--fail-step", type=int)
    parser.add_argument("--auto-num-workers", action="store_true")
    parser.add_argument("--signal-rank", type=int)
    parser.add_argument("--signal-step", type=int)
    parser.add_argument("--uneven", action="store_true", help="pre-cut batches, the last step uneven over ranks")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train, val = data(args.n_val)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.uneven:
        train_loader = uneven_batches(train, int(os.environ.get("RANK", 0)), world)
    elif world == 1:  # the order the ranks share out, read whole
        sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=args.shuffle, seed=7)
        train_loader = DataLoader(train, batch_size=args.batch, sampler=sampler)
    else:
        train_loader = DataLoader(train, batch_size=args.batch, shuffle=args.shuffle)
    callbacks = [CSVLogger(run_dir=out / "run", plot=False)]
    if args.checkpoint_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, monitor="val_loss", every_n_epochs=1))
    if args.signal_rank is not None:
        callbacks.append(SignalAt(args.signal_rank, args.signal_step))
    if args.fail_rank is not None:
        callbacks.append(FailAt(args.fail_rank, args.fail_step))
    metrics = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro"),
               "err": mean_abs_error}
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), metrics=metrics, max_epochs=args.epochs,
                      accumulate_grad_batches=args.accumulate, strategy=args.strategy, seed=7, device="cpu",
                      progress=False, callbacks=callbacks, log_every_n_steps=2, auto_num_workers=args.auto_num_workers)
    try:
        trainer.fit(train_loader, DataLoader(val, batch_size=4), ckpt_path=args.resume)
    except SystemExit as stop:  # a signal: the checkpoint is written; say where this rank stopped
        print(f"rank {os.environ.get('RANK', 0)} interrupted at step {trainer.state.global_step}", flush=True)
        raise SystemExit(stop.code) from None
    weights = trainer.strategy.model_state_dict(model) if trainer.strategy else model.state_dict()
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in weights.items()}, out / "weights.pt")
        (out / "history.json").write_text(json.dumps(trainer.state.history.records))
        (out / "ranks.json").write_text(json.dumps({"world": world, "train_batches": len(trainer.state.train_loader),
                                                    "global_step": trainer.state.global_step}))
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
    # Known issue, not understood yet: on this 2-core machine a rank sometimes aborted in torch's
    # teardown at interpreter exit ("terminate called without an active exception", SIGABRT), after
    # its work was done and written (1 of 2 clean `make test` runs, 2 of 9 runs under extra load).
    # What these tests check is the run's result, so a rank that finished ends here, its group ended
    # and its output flushed; a rank that raised or was signalled still exits through Python.
    end_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
