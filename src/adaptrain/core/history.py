"""The per-epoch record of a run: a list of dicts, with CSV, JSON and plot output."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable


class History:
    """One dict per epoch: ``epoch``, ``lr``, ``train_loss`` (and parts), ``train_<metric>``,
    ``val_loss``, ``val_<metric>``, ``epoch_time``, ``samples_per_s``.

    An epoch without validation has no ``val_*`` keys.

    Example:
        >>> h = History([{"epoch": 1, "train_loss": 0.9}, {"epoch": 2, "train_loss": 0.5}])
        >>> h["train_loss"]
        [0.9, 0.5]
    """

    def __init__(self, records: Iterable[dict[str, Any]] = ()) -> None:
        self.records: list[dict[str, Any]] = [dict(r) for r in records]

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[Any]:
        """The values of one key over the epochs that have it."""
        return [r[key] for r in self.records if key in r]

    @property
    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    def last(self, key: str, default: Any = None) -> Any:
        values = self[key]
        return values[-1] if values else default

    def best(self, key: str, mode: str = "min") -> Any:
        values = [v for v in self[key] if isinstance(v, (int, float)) and not math.isnan(v)]
        if not values:
            return None
        return min(values) if mode == "min" else max(values)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]

    def to_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_text(path) as handle:
            writer = csv.DictWriter(handle, fieldnames=self.keys, restval="")
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_text(path) as handle:
            json.dump(self.records, handle, indent=1)
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "History":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return cls({k: _parse(v) for k, v in row.items() if v != ""} for row in rows)

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG: one panel for the loss (and its parts), one per metric, one for the lr."""
        # A bare Figure with the Agg canvas: no pyplot, so the user's backend (Jupyter inline) is untouched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        panels = _panels(self.keys)
        cols = min(3, len(panels)) or 1
        rows = math.ceil(len(panels) / cols) or 1
        fig = Figure(figsize=(5 * cols, 3.6 * rows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax, (title, keys) in zip(axes.flat, panels):
            for key in keys:
                points = [(r["epoch"], r[key]) for r in self.records if key in r and "epoch" in r]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", markersize=3, label=key)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if title == "lr":
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path


_NOT_PLOTTED = {"epoch", "epoch_time", "samples_per_s", "step", "skipped_steps"}


def _panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """Group keys: train_x and val_x share a panel named x; the lr gets its own."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key in _NOT_PLOTTED:
            continue
        base = key.split("_", 1)[1] if key.startswith(("train_", "val_")) else key
        groups.setdefault(base, []).append(key)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0] != "loss", kv[0] == "lr", kv[0]))
    return ordered


def _parse(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


class _atomic_text:
    """Write text to ``path`` through a temporary file and a rename, so readers never see half a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")

    def __enter__(self):
        self.handle = open(self.tmp, "w", newline="")
        return self.handle

    def __exit__(self, exc_type, *_: Any) -> None:
        self.handle.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
