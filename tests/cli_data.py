"""Tiny data factories and configs for the CLI / config / logger tests (named by class_path)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import Callback


def tiny_datasets(n: int = 96, features: int = 8, classes: int = 3, seed: int = 0) -> tuple[TensorDataset, ...]:
    """(train, val, test) data sets of a separable 3-class problem."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = x[:, :classes].argmax(1)
    third = n // 3
    return (TensorDataset(x[:third], y[:third]), TensorDataset(x[third:2 * third], y[third:2 * third]),
            TensorDataset(x[2 * third:], y[2 * third:]))


def tiny_data(n: int = 96, batch_size: int = 8) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, val, test) loaders; the train loader is not shuffled (no RNG in the test's way)."""
    train, val, test = tiny_datasets(n)
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=32), DataLoader(test, batch_size=32)


def tiny_dict(n: int = 96) -> dict[str, Any]:
    """A dict of data sets: the CLI wraps them in loaders with data.batch_size."""
    train, val, test = tiny_datasets(n)
    return {"train": train, "val": val, "test": test}


def base_config(root: Path, **sections: Any) -> dict[str, Any]:
    """A minimal valid config: a linear model on the tiny data, one epoch, no progress bar."""
    config: dict[str, Any] = {
        "experiment": "tiny",
        "root_dir": str(root),
        "model": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 8, "out_features": 3}},
        "data": {"class_path": "tests.cli_data.tiny_data"},
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
        "metrics": {"acc": {"class_path": "torchmetrics.classification.MulticlassAccuracy",
                            "init_args": {"num_classes": 3, "average": "micro"}}},
        "trainer": {"max_epochs": 2, "progress": False, "seed": 0, "log_every_n_steps": 2},
    }
    config.update(sections)
    return config


def write_config(path: Path, config: dict[str, Any] | str) -> Path:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


_MLFLOW_TEMPLATE: list[Path] = []


def mlflow_store(path: Path) -> str:
    """An empty MLflow sqlite store at ``path``; returns its URI.

    Creating a store runs MLflow's schema migrations (several seconds on 2 cores), so that is done
    once per test session and the migrated file is copied.
    """
    if not _MLFLOW_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="adaptrain-mlflow-template-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        template = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables
        _MLFLOW_TEMPLATE.append(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_MLFLOW_TEMPLATE[0], path)
    return f"sqlite:///{path}"


class InterruptAfterFirstEpoch(Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) after the first epoch."""

    def after_epoch(self, trainer: Any) -> None:
        raise KeyboardInterrupt


def accuracy(outputs, targets):
    """A plain metric function, importable by path (``call: false`` in a config)."""
    return (outputs.argmax(1) == targets).float().mean()


def empty_data():
    """A data factory whose train split is empty (a filter that matched nothing)."""
    return TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), None


def edit(**changes: Any):
    """A base-config edit for tests: dotted key -> new value (None deletes the key)."""
    def apply(config: dict) -> dict:
        for dotted, value in changes.items():
            *parents, last = dotted.split(".")
            node = config
            for part in parents:
                node = node.setdefault(part, {})
            if value is None:
                node.pop(last, None)
            else:
                node[last] = value
        return config
    return apply
