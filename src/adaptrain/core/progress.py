"""The progress bar: a live rich bar on a terminal; plain lines elsewhere (SLURM, nohup, ``tee``, CI).

On a terminal, one line per running epoch, fitted to the console's width (an 80-column terminal
keeps the batch counter, the elapsed time and the ETA; the bar and values give way first, whole
``name value`` pairs at a time, so nothing is cut mid-number)::

    epoch 3/10 ━━━━━━━━━╺━━━━━━━━━━ 120/500 0:12 eta 0:38 9.8 it/s  loss 0.4321  acc 0.8812  lr 0.001

Without a terminal, a plain line every ``plain_every`` (10% of the epoch by default, and at least
``plain_min_s`` = 5 s apart, so short epochs print only their summary), then the epoch's summary
line (the same line ``train.log`` holds)::

    epoch 3/10  batch 120/500 (24%)  loss 0.4321  acc 0.8812  lr 0.001  812 samples/s  eta 0:38
    epoch 3/10  lr 0.001  train_loss 0.4102  ...  val_acc 0.8951  2.1s  798 samples/s

Values are those read at the trainer's refresh points (every ``log_every_n_steps`` batches), so
neither mode adds a host-device sync; plain lines are printed at the first refresh point past each
interval. Which refresh points print is decided by :func:`plain_line_due`, a pure function.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Iterable

from rich.console import Console, RenderableType
from rich.progress import Progress, ProgressColumn, Task
from rich.table import Column
from rich.text import Text

from adaptrain.core.callback import Callback
from adaptrain.core.history import format_values, value_pairs

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

# format_values lives with the records it formats (core.history), so loggers can use it too; kept
# importable from here, where it always was.
__all__ = ["ProgressBar", "format_values", "live_line", "plain_line", "plain_line_due", "parse_every"]


def clock(seconds: float | None) -> str:
    """``m:ss`` under an hour, else ``h:mm:ss``; ``?`` when unknown.

    Example:
        >>> clock(41.2), clock(725), clock(3723), clock(None)
        ('0:41', '12:05', '1:02:03', '?')
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta(done: int, total: int | None, elapsed: float) -> float | None:
    """Seconds left in the epoch at the pace so far; None when it cannot be told.

    Example:
        >>> eta(25, 100, 10.0), eta(0, 100, 1.0), eta(5, None, 1.0)
        (30.0, None, None)
    """
    if not total or done <= 0 or elapsed <= 0:
        return None
    return elapsed / done * max(total - done, 0)


# ---------------------------------------------------------------------- plain lines
def parse_every(value: str | int | float | None) -> tuple[str, float] | None:
    """``plain_every`` -> ``("%", 10.0)`` / ``("s", 30.0)`` / ``("batches", 100.0)``, or None (off).

    ``"10%"``: every 10% of the epoch; ``"30s"``: every 30 seconds of the epoch's loop time; an
    integer: every N batches; None or 0: only the per-epoch summary.

    Example:
        >>> parse_every("10%"), parse_every("30s"), parse_every(100), parse_every(None)
        (('%', 10.0), ('s', 30.0), ('batches', 100.0), None)
    """
    if value is None or value == 0:
        return None
    if isinstance(value, bool):
        raise ValueError(f"ProgressBar(plain_every={value!r}): expected e.g. \"10%\", \"30s\", 100 or None.")
    if isinstance(value, (int, float)):
        if value < 0 or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"ProgressBar(plain_every={value!r}): a number means every N batches; expected "
                             "a positive integer (or \"10%\", \"30s\").")
        return ("batches", float(value))
    text = str(value).strip()
    for suffix, kind in (("%", "%"), ("s", "s")):
        if text.endswith(suffix):
            try:
                number = float(text[:-len(suffix)])
            except ValueError:
                break
            if number > 0 and (kind != "%" or number <= 100):
                return (kind, number)
            break
    raise ValueError(f"ProgressBar(plain_every={value!r}): expected a percentage of the epoch (\"10%\", "
                     "0 < p <= 100), seconds (\"30s\"), a number of batches (100), or None.")


#: Without a length (an iterable loader), a percentage cannot be told: fall back to seconds.
FALLBACK_EVERY_S = 30.0


def plain_line_due(every: tuple[str, float] | None, batch: int, total: int | None,
                   last_batch: int, seconds_since_last: float, min_seconds: float = 0.0) -> bool:
    """Whether a plain progress line is due at this refresh point.

    ``batch``: train batches done this epoch; ``last_batch``: where the last line was printed (0
    at the epoch's start); ``seconds_since_last``: loop time since that line (or the epoch's
    start). The epoch's last batch prints nothing: the epoch's summary line follows. Nothing is
    due before ``min_seconds``: short epochs print their summary only, not a line per 10%.

    Example:
        >>> [b for b in range(1, 9) if plain_line_due(("%", 25), b, 8, 2 * ((b - 1) // 2), 0.0)]
        [2, 4, 6]
        >>> plain_line_due(("s", 30), 7, None, 3, 29.9), plain_line_due(("s", 30), 7, None, 3, 30.0)
        (False, True)
        >>> [plain_line_due(("%", 25), 4, 8, 2, seconds, min_seconds=5) for seconds in (4.9, 5.0)]
        [False, True]
    """
    if every is None or batch <= last_batch or (total is not None and batch >= total):
        return False
    if seconds_since_last < min_seconds:
        return False
    kind, n = every
    if kind == "%" and not total:
        kind, n = "s", FALLBACK_EVERY_S
    if kind == "s":
        return seconds_since_last >= n
    if kind == "batches":
        return batch // int(n) > last_batch // int(n)
    # Crossed a multiple of n% since the last line (the small epsilon absorbs float error at exact multiples).
    return math.floor(batch * 100 / (n * total) + 1e-9) > math.floor(last_batch * 100 / (n * total) + 1e-9)


def plain_line(epoch: int, max_epochs: int, batch: int, total: int | None, values: dict[str, Any],
               samples_per_s: float | None, seconds_left: float | None) -> str:
    """One in-epoch progress line for logs.

    Example:
        >>> plain_line(3, 10, 120, 500, {"loss": 0.43214, "lr": 0.001}, 812.4, 38.0)
        'epoch 3/10  batch 120/500 (24%)  loss 0.4321  lr 0.001  812 samples/s  eta 0:38'
    """
    where = f"batch {batch}/{total} ({100 * batch // total}%)" if total else f"batch {batch}"
    parts = [f"epoch {epoch}/{max_epochs}", where, *value_pairs(values)]
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.0f} samples/s")
    if total:
        parts.append(f"eta {clock(seconds_left)}")
    return "  ".join(parts)


# ---------------------------------------------------------------------- the live line
# (bar cells, speed shown), tried in turn for each number of value pairs kept: the bar shrinks to
# 10 cells, the speed goes, then the bar, before any value is dropped.
_LAYOUTS = ((20, True), (10, True), (10, False), (0, False))


def live_line(description: str, completed: int, total: int | None, elapsed: float, seconds_left: float | None,
              speed: str, values: list[str], width: int) -> Text:
    """The live bar's line, at most ``width`` cells: never wrapped, never cut inside a number.

    What gives way, in order: the bar (20 -> 10 cells), the speed, the bar altogether, then the
    trailing ``name value`` pairs; the description, the batch counter, elapsed and ETA stay.

    Example:
        >>> line = live_line("epoch 10/100", 12345, 60000, 60.0, 231.6, "205.8 it/s", ["loss 0.1234", "lr 0.001"], 80)
        >>> line.plain
        'epoch 10/100 ━━╺━━━━━━━ 12345/60000 1:00 eta 3:51  loss 0.1234  lr 0.001'
        >>> live_line("epoch 10/100", 12345, 60000, 60.0, 231.6, "205.8 it/s", ["loss 0.1234", "lr 0.001"], 60).plain
        'epoch 10/100 12345/60000 1:00 eta 3:51  loss 0.1234'

    """
    counter = f"{completed}/{total}" if total else f"{completed}"
    times = f"{clock(elapsed)} eta {clock(seconds_left)}" if total else clock(elapsed)
    for keep in range(len(values), -1, -1):
        for bar, speed_on in _LAYOUTS:
            text = _compose(description, bar, completed, total, counter, times, speed if speed_on else "",
                            values[:keep])
            if text.cell_len <= width:
                return text
    text = _compose(description, 0, completed, total, counter, times, "", [])
    text.truncate(width, overflow="ellipsis")  # only on a console narrower than the essentials
    return text


def _compose(description: str, bar: int, completed: int, total: int | None, counter: str, times: str,
             speed: str, values: list[str]) -> Text:
    text = Text(description, style="bold", no_wrap=True)
    if bar and total:
        filled = min(bar, bar * completed // total)
        text.append(" ")
        text.append("━" * filled, style="magenta")
        if filled < bar:
            text.append("╺" + "━" * (bar - filled - 1), style="grey37")
    text.append(f" {counter} {times}")
    if speed:
        text.append(f" {speed}", style="cyan")
    if values:
        text.append("  " + "  ".join(values))
    return text


class _LineProgress(Progress):
    """rich's Progress, drawing each task's line as it is. rich would wrap the lines in a one-column
    table, which renders the same characters at about twice the cost (~0.5 vs ~0.3 ms a draw here)."""

    def get_renderables(self) -> Iterable[RenderableType]:
        column = self.columns[0]
        for task in self.tasks:
            if task.visible:
                yield column(task)


class _LiveColumn(ProgressColumn):
    """The whole line as one column: the layout is ours (rich's table would shrink the counter)."""

    def __init__(self, console: Console) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.console = console

    def render(self, task: Task) -> Text:
        fields = task.fields
        return live_line(task.description, int(task.completed), int(task.total) if task.total else None,
                         fields.get("elapsed", 0.0), fields.get("left"), fields.get("speed", ""),
                         fields.get("values", []), self.console.width)


# ---------------------------------------------------------------------- the callback
class ProgressBar(Callback):
    """Shows epoch i/N, batch j/M, elapsed and ETA, speed, running loss, metrics and lr; a summary
    line per epoch. See the module docstring for both modes.

    An observer: reads the state, changes nothing. Rank zero only.

    Args:
        console: where to draw; default a rich Console on stdout (a terminal -> the live bar).
        min_interval_s: the live bar is redrawn at most this often (a draw costs ~0.3 ms).
        plain_every: without a terminal, an in-epoch line every ``"10%"`` of the epoch, every
            ``"30s"`` of loop time, or every N batches (an int); None: the summary line only.
        plain_min_s: and at least this many seconds of loop time apart (counted from the epoch's
            start), so epochs shorter than that print their summary line only; 0: no minimum.

    Example:
        >>> bar = ProgressBar(plain_every="5%")  # Trainer(..., callbacks=[bar]) replaces the default one
    """

    order = 100  # after every other callback, so summaries include what they added

    def __init__(self, console: Console | None = None, min_interval_s: float = 0.5,
                 plain_every: str | int | None = "10%", plain_min_s: float = 5.0) -> None:
        self.console = console or Console()
        self.min_interval_s = min_interval_s
        self.plain_every = parse_every(plain_every)
        self.plain_min_s = plain_min_s
        self._last_update = 0.0
        self._progress: Progress | None = None
        self._task: Any = None
        self._total: int | None = None
        self._samples = 0
        self._plain_batch = 0  # where the last plain line was printed this epoch
        self._plain_time = 0.0
        self._first_batch = 0  # batches done before this epoch's first (a mid-epoch resume)

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def print(self, *args: Any) -> None:
        self.console.print(*args, highlight=False, soft_wrap=True)

    def before_fit(self, trainer: Trainer) -> None:
        if self.interactive and trainer.is_global_zero:
            self._progress = _LineProgress(_LiveColumn(self.console), console=self.console, transient=False,
                                          auto_refresh=False)
            self._progress.start()

    def before_train(self, trainer: Trainer) -> None:
        state = trainer.state
        self._total = state.num_batches  # the loader's length, or the dry run's limit
        self._samples = 0
        self._plain_batch, self._plain_time = state.batch_idx, 0.0  # a mid-epoch resume starts where it stopped
        self._first_batch = state.batch_idx
        if self._progress is None:
            return
        description = f"epoch {state.epoch + 1}/{state.max_epochs}"
        self._task = self._progress.add_task(description, total=self._total, completed=state.batch_idx,
                                             values=[], speed="", elapsed=0.0)

    def after_batch(self, trainer: Trainer) -> None:
        # Runs every batch: the live bar (rank zero only) checks its redraw timer and nothing else.
        if self._task is not None:
            now = time.perf_counter()
            if now - self._last_update >= self.min_interval_s:  # a draw costs ~0.3 ms: a few a second
                self._draw(trainer.state, now)
        elif trainer.is_global_zero:
            state = trainer.state
            self._samples += state.batch_samples  # counted by the loop already; plain lines show samples/s
            if self.plain_every is not None and state.batch_idx % trainer.log_every_n_steps == 0:
                self._plain(state)

    def _draw(self, state: Any, now: float) -> None:
        elapsed, left = self._pace(state)
        done = state.batch_idx - self._first_batch
        speed = f"{done / elapsed:.1f} it/s" if elapsed and done > 0 else ""
        values = value_pairs({**state.running, "lr": state.lr})
        self._progress.update(self._task, completed=state.batch_idx, values=values, speed=speed,  # type: ignore[union-attr]
                              elapsed=elapsed, left=left)
        self._progress.refresh()  # type: ignore[union-attr]  # in the loop's thread: no refresh thread competing with torch's
        self._last_update = now

    def _plain(self, state: Any) -> None:
        elapsed, left = self._pace(state)
        if not plain_line_due(self.plain_every, state.batch_idx, self._total, self._plain_batch,
                              elapsed - self._plain_time, self.plain_min_s):
            return
        speed = self._samples / elapsed if elapsed > 0 else None
        self.print(plain_line(state.epoch + 1, state.max_epochs, state.batch_idx, self._total,
                              {**state.running, "lr": state.lr}, speed, left))
        self._plain_batch, self._plain_time = state.batch_idx, elapsed

    def _pace(self, state: Any) -> tuple[float, float | None]:
        """Loop time this epoch (the trainer's own timers) and the seconds left at that pace."""
        elapsed = state.data_time + state.compute_time
        done = state.batch_idx - self._first_batch  # a mid-epoch resume timed only what it ran
        left = eta(done, None if self._total is None else self._total - self._first_batch, elapsed)
        return elapsed, left

    def after_train(self, trainer: Trainer) -> None:
        if self._progress is not None and self._task is not None:  # the last position, which throttling skipped
            self._progress.update(self._task, completed=trainer.state.batch_idx)

    def after_epoch(self, trainer: Trainer) -> None:
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

    def after_fit(self, trainer: Trainer) -> None:
        self._close(trainer)

    def exception(self, trainer: Trainer) -> None:
        self._close(trainer)

    def _close(self, trainer: Trainer) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress, self._task = None, None
        if trainer.state.stop_reason and trainer.is_global_zero:
            self.print(f"stopped: {trainer.state.stop_reason}")
