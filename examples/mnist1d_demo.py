"""The demo behind `make demo`: the MNIST-1D CNN trained on data generated locally.

Writes the history (CSV, JSON), its plot, the last checkpoint and the weights (safetensors) into
runs/demo/<time>/ and prints the final test accuracy.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
import torchmetrics
from torch import nn

from adaptrain import ModelCheckpoint, Trainer, save_weights
from adaptrain.datasets import mnist1d
from adaptrain.models import MNIST1DCNN


def main(epochs: int = 50, lr: float = 0.02, batch_size: int = 64, seed: int = 0) -> float:
    run_dir = Path("runs") / "demo" / time.strftime("%Y%m%d-%H%M%S")
    data = mnist1d()  # 4,000 train / 1,000 test sequences, generated locally (no download)
    train_loader, val_loader, test_loader = data.loaders(batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    model = MNIST1DCNN(channels=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    trainer = Trainer(
        model, optimizer, nn.CrossEntropyLoss(),
        metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")},
        # A factory: the trainer fills in total_steps from the loader length and epochs.
        scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=lr),
        max_epochs=epochs, seed=seed,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0)],  # last.ckpt: resumable
    )
    history = trainer.fit(train_loader, val_loader)
    history.to_csv(run_dir / "history.csv")
    history.to_json(run_dir / "history.json")
    history.plot(run_dir / "history.png")
    save_weights(model, run_dir / "model.safetensors")
    test = trainer.test(test_loader)
    print(f"\nrun folder: {run_dir}  (history.csv, history.json, history.png, model.safetensors, "
          "checkpoints/last.ckpt)")
    print(f"final test accuracy: {test['test_acc']:.4f}  (MNIST-1D paper, CNN: ~0.94)")
    return test["test_acc"]


if __name__ == "__main__":
    main()
