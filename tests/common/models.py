"""Tiny models covering the input/output structures the trainer supports."""

from __future__ import annotations

import torch
from torch import nn


def mlp(features: int = 8, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


class TupleOut(nn.Module):
    """One input, two outputs as a tuple: (class logits, regression value)."""

    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(features, 16)
        self.cls = nn.Linear(16, classes)
        self.reg = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h), self.reg(h).squeeze(1)


class DictInDictOut(nn.Module):
    """Two keyword inputs, dict outputs."""

    def __init__(self, features: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(features, 8)
        self.b = nn.Linear(features, 8)
        self.cls = nn.Linear(16, classes)
        self.reg = nn.Linear(16, 1)

    def forward(self, left, right):
        h = torch.relu(torch.cat([self.a(left), self.b(right)], 1))
        return {"cls": self.cls(h), "reg": self.reg(h).squeeze(1)}


class NanAtCall(nn.Module):
    """A linear model whose output turns NaN on the given forward calls (1-based)."""

    def __init__(self, bad_calls, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.lin, self.calls, self.bad_calls = nn.Linear(features, classes), 0, bad_calls

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        return out * float("nan") if self.bad_calls(self.calls) else out
