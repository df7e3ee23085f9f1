"""The progress bar: rich on a terminal, one plain line per epoch elsewhere (CI, log files)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adaptrain.core.callback import Callback

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

_SKIP = {"epoch", "epoch_time", "samples_per_s"}


def format_values(values: dict[str, Any], skip: set[str] = _SKIP) -> str:
    """``name value`` pairs with 4 significant digits, for bars and log lines.

    Example:
        >>> format_values({"train_loss": 0.123456, "lr": 0.001, "epoch": 3})
        'train_loss 0.1235  lr 0.001'
    """
    parts = []
    for key, value in values.items():
        if key in skip:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class ProgressBar(Callback):
    """Shows epoch i/N, batch j/M, lr, running loss and metrics, speed; a summary line per epoch.

    An observer: reads the state, changes nothing. Values are those read at the trainer's
    refresh points (every ``log_every_n_steps`` batches), so the bar adds no host-device sync.
    """

    order = 100  # after every other callback, so summaries include what they added

    def __init__(self, console: Console | None = None, min_interval_s: float = 0.25) -> None:
        self.console = console or Console()
        self.min_interval_s = min_interval_s
        self._last_update = 0.0
        self._progress: Progress | None = None
        self._task: Any = None

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def print(self, *args: Any) -> None:
        self.console.print(*args, highlight=False, soft_wrap=True)

    def before_fit(self, trainer: "Trainer") -> None:
        if self.interactive and trainer.is_global_zero:
            def fixed(width: int) -> Column:  # on a narrow terminal only the values column gives way
                return Column(no_wrap=True, min_width=width)

            self._progress = Progress(
                TextColumn("[bold]{task.description}", table_column=fixed(13)),
                BarColumn(bar_width=20, table_column=fixed(20)), MofNCompleteColumn(table_column=fixed(9)),
                TimeElapsedColumn(table_column=fixed(7)), TextColumn("{task.fields[speed]}", table_column=fixed(15)),
                TextColumn("{task.fields[values]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                console=self.console, transient=False, auto_refresh=False,
            )
            self._progress.start()

    def before_train(self, trainer: "Trainer") -> None:
        if self._progress is None:
            return
        state = trainer.state
        total = _length(state.train_loader)
        description = f"epoch {state.epoch + 1}/{state.max_epochs}"
        self._task = self._progress.add_task(description, total=total, values="", speed="")

    def after_batch(self, trainer: "Trainer") -> None:
        if self._progress is None or self._task is None:
            return
        now = time.perf_counter()
        if now - self._last_update < self.min_interval_s:
            return  # drawing costs ~2 ms; at most a few redraws a second keep it under 1% of a step
        state = trainer.state
        elapsed = state.data_time + state.compute_time
        speed = f"{state.batch_idx / elapsed:.1f} it/s" if elapsed else ""
        values = format_values({"lr": state.lr, **state.running})
        self._progress.update(self._task, completed=state.batch_idx, values=values, speed=speed)
        self._progress.refresh()  # drawn here, in the loop's thread: no refresh thread competing with torch's
        self._last_update = now

    def after_train(self, trainer: "Trainer") -> None:
        if self._progress is not None and self._task is not None:  # the last position, which throttling skipped
            self._progress.update(self._task, completed=trainer.state.batch_idx)

    def after_epoch(self, trainer: "Trainer") -> None:
        if not trainer.is_global_zero:
            return
        state = trainer.state
        record = state.history.records[-1]
        summary = (f"epoch {record['epoch']}/{state.max_epochs}  {format_values(record)}  "
                   f"{record.get('epoch_time', 0):.1f}s  {record.get('samples_per_s', 0):.0f} samples/s")
        if self._progress is not None and self._task is not None:
            # The finished epoch leaves one full summary line above the live bar, like the plain mode.
            self._progress.remove_task(self._task)
            self._task = None
        self.print(summary)
        if self._progress is not None:
            self._progress.refresh()

    def after_fit(self, trainer: "Trainer") -> None:
        self._close(trainer)

    def exception(self, trainer: "Trainer") -> None:
        self._close(trainer)

    def _close(self, trainer: "Trainer") -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if trainer.state.stop_reason and trainer.is_global_zero:
            self.print(f"stopped: {trainer.state.stop_reason}")


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
