"""Regenerate benchmarks/data/learning_curves.json: real learning curves trained with adaptrain.

Several small models, optimizers and learning rates (two with step schedules, two cosine) on
MNIST-1D (generated locally, nothing is downloaded) and scikit-learn's digits; 60 epochs each,
recording per epoch lr, train/val loss and accuracy; every run with seeds 0 and 1 (34 curves).
CPU, one thread, about 4 minutes.

Usage:
    python benchmarks/make_learning_curves.py [--out benchmarks/data/learning_curves.json] [--only NAME] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchmetrics
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR

from adaptrain import Trainer
from adaptrain.datasets import digits, mnist1d
from adaptrain.models import MLP, MNIST1DCNN

EPOCHS = 60
# name: (dataset, model, optimizer, lr, schedule). Learning rates span slow to fast learners, so the
# curves range from still-rising at the end to flat after a few epochs.
RUNS: dict[str, tuple[str, str, str, float, str | None]] = {
    "mnist1d-mlp-adam-3e-4": ("mnist1d", "mlp", "adam", 3e-4, None),
    "mnist1d-mlp-adam-1e-3": ("mnist1d", "mlp", "adam", 1e-3, None),
    "mnist1d-mlp-sgd-0.005": ("mnist1d", "mlp", "sgd", 0.005, None),
    "mnist1d-mlp-sgd-0.02": ("mnist1d", "mlp", "sgd", 0.02, None),
    "mnist1d-cnn-adam-3e-4": ("mnist1d", "cnn", "adam", 3e-4, None),
    "mnist1d-cnn-adam-1e-3": ("mnist1d", "cnn", "adam", 1e-3, None),
    "mnist1d-cnn-sgd-0.003": ("mnist1d", "cnn", "sgd", 0.003, None),
    "mnist1d-cnn-sgd-0.01": ("mnist1d", "cnn", "sgd", 0.01, None),
    "mnist1d-cnn-sgd-0.05-step": ("mnist1d", "cnn", "sgd", 0.05, "step"),
    "mnist1d-cnn-adam-1e-3-cosine": ("mnist1d", "cnn", "adam", 1e-3, "cosine"),
    "digits-mlp-sgd-1e-3": ("digits", "mlp", "sgd", 1e-3, None),
    "digits-mlp-sgd-3e-3": ("digits", "mlp", "sgd", 3e-3, None),
    "digits-mlp-adam-1e-4": ("digits", "mlp", "adam", 1e-4, None),
    "digits-mlp-adam-3e-4": ("digits", "mlp", "adam", 3e-4, None),
    "digits-mlp-adam-1e-3": ("digits", "mlp", "adam", 1e-3, None),
    "digits-mlp-sgd-0.01-step": ("digits", "mlp", "sgd", 0.01, "step"),
    "digits-mlp-sgd-0.01-cosine": ("digits", "mlp", "sgd", 0.01, "cosine"),
}
KEYS = ("lr", "train_loss", "train_acc", "val_loss", "val_acc")


def train_curve(dataset: str, model: str, optimizer: str, lr: float, schedule: str | None,
                epochs: int = EPOCHS, seed: int = 0) -> dict[str, list[float]]:
    """Train one configuration with adaptrain's Trainer and return its per-epoch history."""
    data = mnist1d() if dataset == "mnist1d" else digits(seed=seed)
    train, val, _ = data.loaders(batch_size=100 if dataset == "mnist1d" else 64, seed=seed)
    torch.manual_seed(seed)
    width = 40 if dataset == "mnist1d" else 64
    net = MNIST1DCNN() if model == "cnn" else MLP(width, (100, 100) if dataset == "mnist1d" else (64,))
    opt = (torch.optim.Adam(net.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9))
    scheduler = {"step": MultiStepLR(opt, milestones=[epochs // 3, 2 * epochs // 3], gamma=0.1),
                 "cosine": CosineAnnealingLR(opt, T_max=epochs), None: None}[schedule]
    trainer = Trainer(net, opt, torch.nn.CrossEntropyLoss(), scheduler=scheduler, max_epochs=epochs,
                      metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")},
                      seed=seed, progress=False, device="cpu")
    records = trainer.fit(train, val).records
    out: dict[str, list[float]] = {"epochs": [r["epoch"] for r in records]}
    out.update({k: [round(float(r[k]), 6) for r in records] for k in KEYS})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "learning_curves.json"))
    parser.add_argument("--only", help="train only this run (for a quick check)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds of init, data order and digits split; each run is trained once per seed")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    curves = []
    for seed in args.seeds:
        for name, (dataset, model, optimizer, lr, schedule) in RUNS.items():
            if args.only and name != args.only:
                continue
            start = time.perf_counter()
            curve = train_curve(dataset, model, optimizer, lr, schedule, seed=seed)
            curves.append({"name": name, "seed": seed, "dataset": dataset, "model": model, "optimizer": optimizer,
                           "base_lr": lr, "schedule": schedule, **curve})
            print(f"{name:<30} seed {seed}  val_acc {curve['val_acc'][0]:.3f} -> {curve['val_acc'][-1]:.3f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"generator": "benchmarks/make_learning_curves.py", "epochs": EPOCHS, "seeds": args.seeds,
            "torch": torch.__version__,
            "note": "MNIST-1D validates on its 1,000-sample test split; digits on a 15% validation split."}
    out.write_text(json.dumps({"meta": meta, "curves": curves}, separators=(",", ":")) + "\n")
    print(f"wrote {len(curves)} curves to {out}")


if __name__ == "__main__":
    main()
