"""Adaptive validation: what validating every epoch costs, against OTX's rule and AdaptiveTrainScheduling.

Two workloads on a small synthetic 10-class problem (an MLP, real Trainer runs on the CPU, one torch thread):

- ``costly-val``: 1024 train samples (16 iterations an epoch, where OTX validates every 3rd epoch)
  and a val set 8x larger: a validation costs about as much as a training epoch, or more.
- ``cheap-val``: the same train set and 128 val samples: a validation costs a few % of an epoch;
  OTX still waits 3 epochs, AdaptiveTrainScheduling validates every epoch.

Each is trained three ways, interleaved over ``--repeats`` rounds (the median time is reported):
``every epoch`` (no callback), ``OTX rule`` (every ``otx_interval(16) = 3`` epochs, plus the last:
OTX's interval without its LR stretching), and ``adaptive`` (``AdaptiveTrainScheduling()``,
defaults). Training is seeded and validation draws no random numbers, so the trained model is the
same whichever epochs validate: the final metric must not move; what changes is the time spent and
how many validations early stopping or checkpoints get to see (and the best value they saw).

Times are this process's CPU seconds (``time.process_time``; with one torch thread and no loader
workers that is what the run costs, and other processes on a shared machine do not inflate it) and
wall seconds.

    .venv/bin/python benchmarks/validation.py                # ~1.5 min on 2 cores
    .venv/bin/python benchmarks/validation.py --epochs 40 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptrain import AdaptiveTrainScheduling, Callback, CancelValidateException, Trainer  # noqa: E402
from adaptrain.tuning.validation import otx_interval, should_validate  # noqa: E402

FEATURES, CLASSES, TRAIN, BATCH = 128, 10, 1024, 64
WORKLOADS = {"costly-val": 8 * TRAIN, "cheap-val": TRAIN // 8}  # val samples


class OTXRule(Callback):
    """OTX's interval from the epoch length (no LR stretching here), and the last epoch, as adaptrain does."""

    def before_validate(self, trainer: Trainer) -> None:
        state = trainer.state
        if not should_validate(state.epoch + 1, otx_interval(state.num_batches), state.max_epochs):
            raise CancelValidateException


class ValTimer(Callback):
    """CPU seconds spent inside validation passes that ran (a skipped one is not timed)."""

    order = -30  # before AdaptiveTrainScheduling may cancel: after_validate then sees validated False

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0

    def before_validate(self, trainer: Trainer) -> None:
        self._start = time.process_time()

    def after_validate(self, trainer: Trainer) -> None:
        if trainer.state.validated:
            self.seconds += time.process_time() - self._start


def dataset(n: int, seed: int) -> TensorDataset:
    """A noisy linear 10-class problem: accuracy climbs over tens of epochs and stays below 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(0))
    logits = x @ w + 4.0 * torch.randn(n, CLASSES, generator=g)
    return TensorDataset(x, logits.argmax(1))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


def run(policy: str, val: DataLoader, epochs: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, CLASSES))
    callbacks = {"every epoch": [], "OTX rule": [OTXRule()], "adaptive": [AdaptiveTrainScheduling()]}[policy]
    timer = ValTimer()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9), nn.CrossEntropyLoss(),
                      metrics={"acc": accuracy}, max_epochs=epochs, callbacks=[*callbacks, timer], progress=False,
                      seed=0, device="cpu")
    train = DataLoader(dataset(TRAIN, seed=1), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    log = io.StringIO()  # the callback's decision lines, printed after the table
    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(log):
        history = trainer.fit(train, val)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    measured = [r for r in history.records if "val_acc" in r]
    best = max(measured, key=lambda r: r["val_acc"])
    plan = callbacks[0].plan if policy == "adaptive" else None
    return {"cpu": cpu, "wall": wall, "val_cpu": timer.seconds, "validations": len(measured),
            "final": history.records[-1]["val_acc"],
            "best": best["val_acc"], "best_epoch": best["epoch"], "interval": plan.interval if plan else None,
            "ratio": plan.cost_ratio if plan else None, "log": log.getvalue()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    policies = ("every epoch", "OTX rule", "adaptive")
    print(f"{TRAIN} train samples in batches of {BATCH} ({TRAIN // BATCH} iterations an epoch: OTX validates every "
          f"{otx_interval(TRAIN // BATCH)} epochs), {args.epochs} epochs, median of {args.repeats} interleaved rounds; "
          f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| workload | policy | validations | CPU s | of which validating | wall s | time saved (CPU) | final val_acc "
          "| best val_acc (epoch) | interval (cost ratio) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    logs = []
    for workload, val_samples in WORKLOADS.items():
        val = DataLoader(dataset(val_samples, seed=2), batch_size=256)
        runs: dict[str, list[dict]] = {policy: [] for policy in policies}
        for _ in range(args.repeats):
            for policy in policies:
                runs[policy].append(run(policy, val, args.epochs))
        base = statistics.median(r["cpu"] for r in runs["every epoch"])
        for policy in policies:
            rs = runs[policy]
            cpu, wall = statistics.median(r["cpu"] for r in rs), statistics.median(r["wall"] for r in rs)
            val_cpu = statistics.median(r["val_cpu"] for r in rs)
            first = rs[-1]
            assert all(r["final"] == first["final"] for r in rs)  # seeded: the same model every round
            ratios = sorted(r["ratio"] for r in rs if r["ratio"] is not None)
            plan = (f"{'/'.join(str(i) for i in sorted({r['interval'] for r in rs}))} "
                    f"({ratios[0]:.2f}-{ratios[-1]:.2f}x)" if ratios else
                    ("3 (OTX)" if policy == "OTX rule" else "1"))
            print(f"| {workload} | {policy} | {first['validations']} | {cpu:.2f} | {val_cpu:.2f} | {wall:.1f} | "
                  f"{100 * (1 - cpu / base):.0f}% | {first['final']:.4f} | {first['best']:.4f} ({first['best_epoch']}) "
                  f"| {plan} |")
        # The same model whichever epochs validate: the final value is equal to the last bit.
        assert len({runs[policy][-1]["final"] for policy in policies}) == 1
        logs.append(f"{workload}, last adaptive round:\n{runs['adaptive'][-1]['log']}")
    print("\n" + "\n".join(logs), end="")


if __name__ == "__main__":
    main()
