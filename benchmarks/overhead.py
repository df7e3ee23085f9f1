"""Framework overhead: adaptrain vs a hand-written PyTorch loop, interleaved in one run.

Same model, data, optimizer and seed; adaptrain runs with its progress bar drawing to a
(discarded) terminal and default logging. Each round runs both loops back to back (which goes
first alternates), so machine noise hits both; the extra time per step is the median over rounds
of the paired ratio, with its range.

    .venv/bin/python benchmarks/overhead.py            # both cases, ~2 minutes on 2 cores
    .venv/bin/python benchmarks/overhead.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import ProgressBar, Trainer


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


CASES = {
    # name: (model factory, input shape, samples, batch size)
    "tiny MLP": (tiny_mlp, (64,), 8192, 64),
    "small CNN": (small_cnn, (3, 32, 32), 2048, 64),
}


def make_loader(shape: tuple[int, ...], samples: int, batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *shape, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def hand_written(model: nn.Module, loader: DataLoader, epochs: int) -> float:
    """The loop a careful user writes: no per-step .item(), loss summed on the device."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    steps, start = 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        total = torch.zeros(())
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            steps += 1
        print(f"loss {float(total) / len(loader):.4f}", file=open(os.devnull, "w"))
    return steps / (time.perf_counter() - start)


def with_adaptrain(model: nn.Module, loader: DataLoader, epochs: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bar = ProgressBar(console=Console(file=open(os.devnull, "w"), force_terminal=True))
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), max_epochs=epochs, callbacks=[bar])
    start = time.perf_counter()
    trainer.fit(loader)
    return trainer.state.global_step / (time.perf_counter() - start)


def compare(name: str, rounds: int, epochs: int) -> dict[str, float]:
    factory, shape, samples, batch_size = CASES[name]
    loader = make_loader(shape, samples, batch_size)
    hand, ours = [], []
    for round_index in range(rounds + 1):
        runs = {}
        # Alternate which loop goes first, so neither always inherits the other's cache and allocator state.
        order = ("hand", "adaptrain") if round_index % 2 == 0 else ("adaptrain", "hand")
        for which in order:
            torch.manual_seed(round_index)
            runs[which] = (hand_written if which == "hand" else with_adaptrain)(factory(), loader, epochs)
        h, a = runs["hand"], runs["adaptrain"]
        if round_index:  # round 0 warms up allocators and caches
            hand.append(h)
            ours.append(a)
    hand_sps, ours_sps = statistics.median(hand), statistics.median(ours)
    # Paired per-round ratios: each pair ran back to back, so slow drifts of the machine cancel.
    ratios = sorted(h / a - 1 for h, a in zip(hand, ours))
    return {"hand": hand_sps, "adaptrain": ours_sps, "step_ms": 1000 / hand_sps,
            "overhead": statistics.median(ratios), "low": ratios[0], "high": ratios[-1]}


def import_time(module: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, epochs = (3, 1) if args.quick else (9, 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"{'case':<10} {'step (hand)':>12} {'hand steps/s':>13} {'adaptrain steps/s':>18} "
          f"{'extra time/step (median of paired rounds)':>44} {'range':>18}")
    for name in CASES:
        r = compare(name, rounds, epochs)
        print(f"{name:<10} {r['step_ms']:>10.2f}ms {r['hand']:>13.1f} {r['adaptrain']:>18.1f} {r['overhead']:>+44.1%} "
              f"{r['low']:>+8.1%} .. {r['high']:>+6.1%}")
    torch_s, ours_s = import_time("torch"), import_time("adaptrain")
    print(f"import torch {torch_s:.2f}s, import adaptrain {ours_s:.2f}s (+{ours_s - torch_s:.2f}s over torch)")


if __name__ == "__main__":
    main()
