"""The per-epoch record of a run: a list of dicts, with CSV, JSON and plot output."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Per-epoch wall-clock figures in each record: they differ between two runs of the same training.
TIMING_KEYS = ("epoch_time", "samples_per_s", "data_time", "compute_time")


_SKIP = {"epoch", *TIMING_KEYS}  # shown apart in an epoch line (the time and speed at its end)


def ordered_record(logs: Mapping[str, Any]) -> dict[str, Any]:
    """An epoch's record in the column order of the CSV: epoch, lr, train_*, val_*, then the rest
    (times, forecasts), each group in the order it was written.

    Example:
        >>> list(ordered_record({"val_loss": 1.0, "epoch_time": 2.0, "train_loss": 3.0, "lr": 0.1, "epoch": 1}))
        ['epoch', 'lr', 'train_loss', 'val_loss', 'epoch_time']
    """
    rank = {"epoch": 0, "lr": 1}
    return dict(sorted(logs.items(), key=lambda kv: rank.get(kv[0], 2 if kv[0].startswith("train_")
                                                              else 3 if kv[0].startswith("val_") else 4)))


def format_values(values: Mapping[str, Any], skip: set[str] = _SKIP) -> str:
    """``name value`` pairs with 4 significant digits, for bars and log lines.

    Example:
        >>> format_values({"train_loss": 0.123456, "lr": 0.001, "epoch": 3})
        'train_loss 0.1235  lr 0.001'
    """
    return "  ".join(value_pairs(values, skip))


def value_pairs(values: Mapping[str, Any], skip: set[str] = _SKIP) -> list[str]:
    """The ``name value`` strings :func:`format_values` joins (bars drop whole pairs to fit a width)."""
    return [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in values.items() if key not in skip]


class History:
    """One dict per epoch (``records``), in this column order: ``epoch`` (1-based), ``lr``,
    ``train_loss`` and its parts (``train_loss_<part>``), ``train_<metric>``, ``val_loss``,
    ``val_<metric>``, then timings (``epoch_time``, ``samples_per_s``) and what callbacks add
    (``forecast_<monitor>``...).

    ``lr`` is the learning rate of the epoch's last optimizer step (param group 0): with a
    per-step scheduler (OneCycleLR) it is where the epoch ended, not where it started; a per-epoch
    scheduler's step at the epoch's end shows in the next record. An epoch without validation has
    no ``val_*`` keys.

    Example:
        >>> h = History([{"epoch": 1, "train_loss": 0.9, "val_acc": 0.5}, {"epoch": 2, "train_loss": 0.5}])
        >>> h["train_loss"], h["val_acc"], h.keys
        ([0.9, 0.5], [0.5], ['epoch', 'train_loss', 'val_acc'])
        >>> h.best("train_loss"), h.best("val_acc", mode="max"), h.last("train_loss"), h.last("val_loss", 0.0)
        (0.5, 0.5, 0.5, 0.0)
    """

    def __init__(self, records: Iterable[dict[str, Any]] = (), adaptations: Iterable[dict[str, Any]] = ()) -> None:
        self.records: list[dict[str, Any]] = [dict(r) for r in records]
        #: What the trainer changed by itself (batch size, micro-batch, loader settings), in order: dicts
        #: with ``kind``, ``before``, ``after``, ``reason``, ``epoch``, ``step`` and the numbers that decided.
        self.adaptations: list[dict[str, Any]] = [dict(a) for a in adaptations]

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[Any]:
        """The values of one key over the epochs that have it (epochs without it are skipped)."""
        return [r[key] for r in self.records if key in r]

    @property
    def keys(self) -> list[str]:
        """Every key of any record, in first-seen order (the CSV's columns)."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    def last(self, key: str, default: Any = None) -> Any:
        """The latest value of ``key``, or ``default`` when no epoch has it."""
        values = self[key]
        return values[-1] if values else default

    def best(self, key: str, mode: str = "min") -> Any:
        """The lowest (``mode="min"``) or highest (``"max"``) value of ``key``, NaNs ignored; None if none."""
        if mode not in ("min", "max"):
            raise ValueError(f'History.best(mode="{mode}"): expected "min" or "max".')
        values = [v for v in self[key] if isinstance(v, (int, float)) and not math.isnan(v)]
        if not values:
            return None
        return min(values) if mode == "min" else max(values)

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "adaptations": [dict(a) for a in self.adaptations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.adaptations = [dict(a) for a in state.get("adaptations", ())]  # older checkpoints have none

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write one row per epoch (columns: :attr:`keys`; a value an epoch lacks is empty), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_text(path) as handle:
            writer = csv.DictWriter(handle, fieldnames=self.keys, restval="")
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the records as a JSON list of objects, atomically (NaN is written as ``NaN``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_text(path) as handle:
            json.dump(self.records, handle, indent=1)
        return path

    def adaptations_to_json(self, path: str | os.PathLike) -> Path:
        """Write :attr:`adaptations` as a JSON list, atomically (the run folder's ``adaptations.json``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_text(path) as handle:
            json.dump(self.adaptations, handle, indent=1, default=str)
        return path

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> History:
        """Read a ``history.csv`` back: numbers become int or float, empty cells stay absent."""
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        return cls({k: _parse(v) for k, v in row.items() if v != ""} for row in rows)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        """Read a ``history.json`` back (the inverse of :meth:`to_json`)."""
        with open(path) as handle:
            return cls(json.load(handle))

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG of the curves (see :func:`_panels` for the panels and their order).

        Example:
            >>> import tempfile, pathlib
            >>> h = History([{"epoch": 1, "lr": 0.1, "train_loss": 0.9}, {"epoch": 2, "lr": 0.05, "train_loss": 0.5}])
            >>> h.plot(pathlib.Path(tempfile.mkdtemp()) / "h.png").suffix
            '.png'
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure().savefig(path, dpi=100)
        return path

    def figure(self) -> Any:
        """A matplotlib Figure of the curves: loss panels first, then one per metric, forecasts, the lr last.

        Epochs are whole numbers on every x axis. A bare Figure with the Agg canvas: no pyplot,
        so the user's backend (Jupyter inline) is untouched.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

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
                    bound = key.endswith(("_low", "_high"))  # a forecast's interval: thin dashed lines
                    ax.plot(xs, ys, marker=None if bound else "o", markersize=3, label=key,
                            linestyle="--" if bound else "-", linewidth=0.8 if bound else 1.5)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 1, 2, 3; never 1.25
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if title == "lr" and all(v > 0 for v in self["lr"] if isinstance(v, (int, float))):
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        return fig


#: Columns that are not curves: counters and timings.
_NOT_PLOTTED = {"epoch", "step", "skipped_steps", "skipped_batches", *TIMING_KEYS}


def _panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """Group the columns into titled panels, in a fixed order.

    ``train_x`` and ``val_x`` share the panel ``x``. Order: ``loss``, the loss parts
    (``loss_<part>``), the metrics in the order the record has them, any other column, the
    forecasts (``forecast_<m>`` with its ``_low`` / ``_high`` interval in one panel per monitored
    value), and ``lr`` last.

    Example:
        >>> _panels(["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "forecast_val_acc",
        ...          "forecast_val_acc_low", "forecast_val_acc_high"])  # doctest: +NORMALIZE_WHITESPACE
        [('loss', ['train_loss', 'val_loss']), ('acc', ['train_acc', 'val_acc']),
         ('forecast val_acc', ['forecast_val_acc', 'forecast_val_acc_low', 'forecast_val_acc_high']), ('lr', ['lr'])]
    """
    groups: dict[str, list[str]] = {}
    ranks: dict[str, int] = {}
    for key in keys:
        if key in _NOT_PLOTTED:
            continue
        if key.startswith("forecast_"):
            base, rank = "forecast " + key[len("forecast_"):].removesuffix("_low").removesuffix("_high"), 4
        elif key.startswith(("train_", "val_")):
            base = key.split("_", 1)[1]
            rank = 0 if base == "loss" else 1 if base.startswith("loss_") else 2
        else:
            base, rank = key, 5 if key == "lr" else 3  # a column a callback added
        groups.setdefault(base, []).append(key)
        ranks.setdefault(base, rank)
    return sorted(groups.items(), key=lambda kv: ranks[kv[0]])  # stable: first-seen order within a rank


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
