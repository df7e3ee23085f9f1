"""The LR finder's suggestion as OneCycleLR's max_lr, against a sweep of max_lr values.

Two workloads, real Trainer runs on the CPU (one torch thread), OneCycleLR over the whole run:

- ``digits``: scikit-learn's 8x8 digits, ``MLP(64, (128, 64), 10)``, SGD (momentum 0.9, Nesterov),
  batch 32, 10 epochs;
- ``mnist1d``: MNIST-1D (4,000 train / 1,000 test sequences), ``MNIST1DCNN(channels=32)``, AdamW,
  batch 64, 10 epochs.

Per seed (the model's initialisation and the shuffle order; the data split is fixed): one
``trainer.lr_find(train_loader)`` with its defaults (100 steps, 1e-7 .. 10), then a full run with
``max_lr`` = each rule's suggestion, and a full run at each of 7 ``max_lr`` values log-spaced over
three decades (1e-3 .. 1). Reported: val accuracy at the end (the mean over seeds), the sweep's best
and its ``max_lr``, and acc(suggested) / acc(best). For comparison, the peers' rules read off the same
sweeps (reimplemented here from their documentation: fastai's ``valley``, the longest decreasing
subsequence of the moving average, halfway along; Lightning's ``suggestion()``, the steepest
gradient of the moving average with respect to the LR, skipping the first 10 points and the last).

    .venv/bin/python benchmarks/lr_find.py                      # ~4 min on 2 cores
    .venv/bin/python benchmarks/lr_find.py --seeds 1 --workloads digits
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from adaptrain import Trainer  # noqa: E402
from adaptrain.datasets import digits, mnist1d  # noqa: E402
from adaptrain.models import MLP, MNIST1DCNN  # noqa: E402
from adaptrain.tuning.lr_rules import RULES, smooth, suggest  # noqa: E402

SWEEP = [10 ** (-3 + 0.5 * i) for i in range(7)]  # 1e-3 .. 1, three decades


def workload(name: str, seed: int, epochs: int, max_lr: float = 0.1) -> tuple[Trainer, object, object]:
    torch.manual_seed(seed)
    if name == "digits":
        data, batch_size = digits(seed=0), 32
        model: nn.Module = MLP(64, (128, 64), 10)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    else:
        data, batch_size = mnist1d(num_samples=5000), 64
        model = MNIST1DCNN(channels=32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    train, val, _ = data.loaders(batch_size=batch_size, seed=seed)
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), metrics={"acc": accuracy}, max_epochs=epochs,
                      scheduler=functools.partial(OneCycleLR, max_lr=max_lr), progress=False, seed=seed, device="cpu")
    return trainer, train, val


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


def final_accuracy(name: str, seed: int, epochs: int, max_lr: float) -> tuple[float, float]:
    trainer, train, val = workload(name, seed, epochs, max_lr)
    started = time.perf_counter()
    trainer.fit(train)
    seconds = time.perf_counter() - started
    return trainer.validate(val)["val_acc"], seconds


def fastai_valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's valley as documented: on the moving average (beta 0.98) without the first tenth and the last
    5 points, the longest decreasing subsequence; the point halfway along it."""
    smoothed = smooth(losses, 0.98)
    finite = next((i for i, v in enumerate(smoothed) if not math.isfinite(v)), len(smoothed))
    begin, end = len(lrs) // 10, min(finite, len(lrs) - 5)
    y = smoothed[begin:end]
    length, start = [1] * len(y), list(range(len(y)))
    for i in range(1, len(y)):
        for j in range(i):
            if y[j] > y[i] and length[j] + 1 > length[i]:
                length[i], start[i] = length[j] + 1, start[j]
    last = max(range(len(y)), key=lambda i: (length[i], -i))
    return lrs[begin + start[last] + (last - start[last]) // 2]


def lightning_steepest(lrs: list[float], losses: list[float]) -> float:
    """Lightning's suggestion(): the most negative gradient of the moving average w.r.t. the LR,
    skipping the first 10 points and the last one."""
    smoothed = smooth(losses, 0.98)
    points = [(lr, v) for lr, v in list(zip(lrs, smoothed))[10:-1] if math.isfinite(v)]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    slopes = [(ys[min(i + 1, len(ys) - 1)] - ys[max(i - 1, 0)]) / (xs[min(i + 1, len(xs) - 1)] - xs[max(i - 1, 0)])
              for i in range(len(ys))]
    return xs[min(range(len(slopes)), key=slopes.__getitem__)]


def run(name: str, seeds: list[int], epochs: int) -> dict:
    suggestions: dict[str, list[float]] = {rule: [] for rule in (*RULES, "fastai valley", "Lightning steepest")}
    accs: dict[str, list[float]] = {rule: [] for rule in suggestions}
    finder_seconds, fit_seconds = [], []
    sweep_accs: dict[float, list[float]] = {lr: [] for lr in SWEEP}
    for seed in seeds:
        trainer, train, _ = workload(name, seed, epochs)
        result = trainer.lr_find(train)
        finder_seconds.append(result.seconds)
        found = {rule: suggest(result.lrs, result.losses, rule).lr for rule in RULES}
        found["fastai valley"] = fastai_valley(result.lrs, result.losses)
        found["Lightning steepest"] = lightning_steepest(result.lrs, result.losses)
        for rule, lr in found.items():
            suggestions[rule].append(lr)
            accs[rule].append(final_accuracy(name, seed, epochs, lr)[0] if lr is not None else math.nan)
        for lr in SWEEP:
            acc, seconds = final_accuracy(name, seed, epochs, lr)
            sweep_accs[lr].append(acc)
            fit_seconds.append(seconds)
        print(f"  {name} seed {seed}: " + ", ".join(f"{r} {v:.3g}" for r, v in found.items() if v is not None),
              flush=True)
    means = {lr: statistics.fmean(v) for lr, v in sweep_accs.items()}
    best_lr = max(means, key=means.__getitem__)
    return {"workload": name, "seeds": seeds, "epochs": epochs, "suggestions": suggestions, "accs": accs,
            "sweep": {f"{lr:.4g}": v for lr, v in sweep_accs.items()}, "best_lr": best_lr, "best_acc": means[best_lr],
            "finder_seconds": statistics.median(finder_seconds), "fit_seconds": statistics.median(fit_seconds)}


def table(results: list[dict]) -> str:
    lines = ["| workload | rule | suggested max_lr (per seed) | acc(suggested) | best sweep acc (max_lr) | ratio |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for rule, lrs in r["suggestions"].items():
            acc = statistics.fmean(r["accs"][rule])
            shown = ", ".join(f"{lr:.3g}" if lr is not None else "none" for lr in lrs)
            lines.append(f"| {r['workload']} | {rule} | {shown} | {acc:.3f} | {r['best_acc']:.3f} "
                         f"({r['best_lr']:.3g}) | {acc / r['best_acc']:.3f} |")
    lines += ["", "| workload | " + " | ".join(f"{lr:.3g}" for lr in SWEEP) + " | lr_find s | one run s |",
              "|---|" + "---|" * (len(SWEEP) + 2)]
    for r in results:
        cells = [f"{statistics.fmean(r['sweep'][f'{lr:.4g}']):.3f}" for lr in SWEEP]
        lines.append(f"| {r['workload']} | " + " | ".join(cells) + f" | {r['finder_seconds']:.1f} | "
                     f"{r['fit_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workloads", default="digits,mnist1d")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = [run(name, list(range(args.seeds)), args.epochs) for name in args.workloads.split(",")]
    print(table(results))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
