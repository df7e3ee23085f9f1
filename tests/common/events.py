"""A callback that counts every event it receives."""

from __future__ import annotations

from collections import Counter

from adaptrain import Callback, Event


class EventCounter(Callback):
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.sequence: list[str] = []


def _make_hook(name: str):
    def hook(self, trainer) -> None:
        self.counts[name] += 1
        self.sequence.append(name)

    hook.__name__ = name
    return hook


for _event in Event:
    setattr(EventCounter, _event.value, _make_hook(_event.value))
