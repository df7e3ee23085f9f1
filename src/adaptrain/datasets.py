"""Offline data sets for the examples, tests and benchmarks: MNIST-1D (generated) and digits.

Nothing here downloads: MNIST-1D is generated locally by ``mnist1d.data.make_dataset`` (its
``get_dataset`` would download), and scikit-learn ships the digits data with the package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class Splits:
    """Train / val / test tensors as ``TensorDataset``s."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int

    def loaders(self, batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                pin_memory: bool = False, seed: int | None = None, prefetch_factor: int | None = None,
                persistent_workers: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Shuffled train loader (seeded by ``seed`` when given), and ordered val and test loaders;
        ``prefetch_factor`` and ``persistent_workers`` apply only with workers (as in ``DataLoader``)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        common = {"num_workers": num_workers, "pin_memory": pin_memory,
                  "prefetch_factor": prefetch_factor if num_workers else None,
                  "persistent_workers": bool(persistent_workers) and num_workers > 0}
        eval_bs = eval_batch_size or max(batch_size, 256)
        return (
            DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=generator, **common),
            DataLoader(self.val, batch_size=eval_bs, **common),
            DataLoader(self.test, batch_size=eval_bs, **common),
        )


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int) -> dict:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    return make_dataset(args)


def mnist1d(num_samples: int = 5000, seed: int = 42, val_is_test: bool = True) -> Splits:
    """MNIST-1D as in its paper: 4,000 train and 1,000 test sequences of length 40, 10 classes.

    With ``val_is_test`` (the default), validation runs on the test split, as the paper reports
    test accuracy per epoch; use it to monitor, not to select models. Otherwise 10% of train is
    held out for validation.

    Example:
        >>> data = mnist1d(num_samples=500)
        >>> tuple(data.train.tensors[0].shape[1:])
        (1, 40)
    """
    arrays = _mnist1d_arrays(num_samples, seed)
    x = torch.tensor(arrays["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(arrays["y"], dtype=torch.long)
    x_test = torch.tensor(arrays["x_test"], dtype=torch.float32).unsqueeze(1)
    y_test = torch.tensor(arrays["y_test"], dtype=torch.long)
    test = TensorDataset(x_test, y_test)
    if val_is_test:
        return Splits(TensorDataset(x, y), test, test, 10)
    n_val = len(x) // 10
    return Splits(TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val]), test, 10)


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images), standardised, as flat 64-feature vectors.

    Example:
        >>> data = digits()
        >>> data.train.tensors[0].shape[1], data.num_classes
        (64, 10)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=y_rest)
    mean, std = x_train.mean(0), x_train.std(0)
    std[std < 1e-6] = 1.0  # pixels constant in train (always 0) stay 0 instead of exploding in val/test

    def tensors(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor((features - mean) / std, dtype=torch.float32),
                             torch.tensor(labels, dtype=torch.long))

    return Splits(tensors(x_train, y_train), tensors(x_val, y_val), tensors(x_test, y_test), 10)


class _MultiIODataset(torch.utils.data.Dataset):
    """Digits as two inputs (top and bottom image halves) and two targets (digit, and is-odd)."""

    def __init__(self, base: TensorDataset) -> None:
        self.x, self.y = base.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x, y = self.x[i], self.y[i]
        return {"top": x[:32], "bottom": x[32:]}, {"digit": y, "odd": (y % 2).float()}


def digits_multi_io(seed: int = 0) -> Splits:
    """Digits for a multi-input / multi-output model: inputs {"top", "bottom"}, targets {"digit", "odd"}."""
    base = digits(seed)
    return Splits(_MultiIODataset(base.train), _MultiIODataset(base.val), _MultiIODataset(base.test), 10)  # type: ignore[arg-type]
