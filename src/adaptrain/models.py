"""Small reference models for the examples, tests and benchmarks."""

from __future__ import annotations

import torch
from torch import nn


class MNIST1DCNN(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 conv layers and a linear head (~94% test accuracy).

    Example:
        >>> MNIST1DCNN()(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: int = 25, num_classes: int = 10, length: int = 40) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, length)).numel()
        self.head = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class MLP(nn.Module):
    """A plain MLP: ``in_features -> hidden... -> num_classes`` with ReLU; flattens its input."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (128, 64), num_classes: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class TwoHeadNet(nn.Module):
    """Multi-input / multi-output: ``(top, bottom) -> {"digit": logits, "odd": logit}``."""

    def __init__(self, half_features: int = 32, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.top = nn.Sequential(nn.Linear(half_features, hidden), nn.ReLU())
        self.bottom = nn.Sequential(nn.Linear(half_features, hidden), nn.ReLU())
        self.digit = nn.Linear(2 * hidden, num_classes)
        self.odd = nn.Linear(2 * hidden, 1)

    def forward(self, top: torch.Tensor, bottom: torch.Tensor) -> dict[str, torch.Tensor]:
        joint = torch.cat([self.top(top), self.bottom(bottom)], dim=1)
        return {"digit": self.digit(joint), "odd": self.odd(joint).squeeze(1)}
