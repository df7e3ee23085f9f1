"""ProgressBar: plain in-epoch lines without a terminal, and a live line that fits 80 columns.

Nothing here depends on timing: which refresh points print is a pure function of batch counts
(tested with numbers), and the fits below are driven by batch counts only.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import Callback, ProgressBar, Trainer
from adaptrain.core.progress import clock, eta, live_line, parse_every, plain_line, plain_line_due


# ---------------------------------------------------------------------- the interval, as numbers
@pytest.mark.parametrize("every, total, expected", [
    (("%", 25), 10, [3, 5, 8]),            # past 25%, 50%, 75%; batch 10 is the epoch's end: its summary follows
    (("%", 10), 10, list(range(1, 10))),
    (("%", 50), 7, [4]),
    (("%", 100), 10, []),
    (("batches", 4), 10, [4, 8]),
    (("batches", 4), None, [4, 8]),        # no length: counts still work, and no "last batch" to skip
])
def test_due_at_every_refresh_point(every, total, expected):
    printed, last = [], 0
    for batch in range(1, 11):
        if plain_line_due(every, batch, total, last, seconds_since_last=0.0):
            printed.append(batch)
            last = batch
    assert printed == expected


def test_due_only_at_the_refresh_points_it_is_asked_about():
    # Refresh every 4 batches of 10, every 25%: the first refresh point past each threshold prints.
    printed, last = [], 0
    for batch in (4, 8):
        if plain_line_due(("%", 25), batch, 10, last, 0.0):
            printed.append(batch)
            last = batch
    assert printed == [4, 8]


def test_due_by_seconds_and_the_fallback_without_a_length():
    assert not plain_line_due(("s", 30), 5, 100, 2, 29.99)
    assert plain_line_due(("s", 30), 5, 100, 2, 30.0)
    assert not plain_line_due(("s", 30), 100, 100, 2, 99.0)  # the last batch: the summary follows
    assert not plain_line_due(("%", 10), 5, None, 2, 29.0)    # no length: a percentage falls back to 30 s
    assert plain_line_due(("%", 10), 5, None, 2, 30.0)
    assert not plain_line_due(None, 5, 100, 0, 1e9)
    assert not plain_line_due(("batches", 1), 5, 100, 5, 0.0)  # nothing new since the last line
    # A minimum time apart: the crossing waits for the first refresh point after it (short epochs: none).
    assert not plain_line_due(("%", 10), 20, 100, 0, 4.99, min_seconds=5.0)
    assert plain_line_due(("%", 10), 20, 100, 0, 5.0, min_seconds=5.0)


def test_short_epochs_print_only_their_summary_by_default():
    bar = ProgressBar(Console(file=io.StringIO(), force_terminal=False, width=200))
    bar._plain_batch, bar._plain_time, bar._total, bar._first_batch = 0, 0.0, 10, 0

    class State:  # an epoch 30% done after 1 s of loop time
        batch_idx, data_time, compute_time, epoch, max_epochs, running, lr = 3, 0.2, 0.8, 0, 1, {"loss": 1.0}, 0.1

    bar._plain(State())
    assert bar.console.file.getvalue() == ""  # 1 s < plain_min_s (5 s)
    State.compute_time = 4.8
    bar._plain(State())
    assert bar.console.file.getvalue().startswith("epoch 1/1  batch 3/10 (30%)  loss 1  lr 0.1  ")


@pytest.mark.parametrize("value, parsed", [("10%", ("%", 10.0)), (" 2.5% ", ("%", 2.5)), ("30s", ("s", 30.0)),
                                           (100, ("batches", 100.0)), (None, None), (0, None)])
def test_parse_every(value, parsed):
    assert parse_every(value) == parsed


@pytest.mark.parametrize("value", ["0%", "150%", "-5s", "often", "10", True, 2.5, -3])
def test_parse_every_refuses_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"ProgressBar\(plain_every="):
        ProgressBar(plain_every=value)


def test_clock_and_eta():
    assert [clock(s) for s in (0, 59.9, 60, 3599, 3600, 90061)] == \
        ["0:00", "0:59", "1:00", "59:59", "1:00:00", "25:01:01"]
    assert clock(float("nan")) == "?" and clock(-1) == "?"
    assert eta(10, 40, 5.0) == 15.0 and eta(40, 40, 5.0) == 0.0
    assert eta(0, 40, 5.0) is None and eta(3, None, 1.0) is None


def test_plain_line_has_counter_values_speed_and_eta():
    line = plain_line(2, 5, 7, 28, {"loss": 0.123456, "acc": 0.5, "lr": 0.01}, 1234.5, 125.0)
    assert line == "epoch 2/5  batch 7/28 (25%)  loss 0.1235  acc 0.5  lr 0.01  1234 samples/s  eta 2:05"
    assert plain_line(1, 1, 7, None, {}, None, None) == "epoch 1/1  batch 7"  # an iterable without a length


# ---------------------------------------------------------------------- plain lines in a real fit
def _loader(n=40, batch_size=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=batch_size)


def _fit(bar, epochs=2, log_every=1, loader=None, extra=()):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
                      max_epochs=epochs, callbacks=[bar, *extra], seed=0, log_every_n_steps=log_every)
    trainer.fit(loader or _loader(), _loader(12))
    return trainer


def _plain_bar(**kwargs):
    # No minimum time between lines: the fits below are driven by batch counts alone.
    return ProgressBar(Console(file=io.StringIO(), force_terminal=False, width=200), plain_min_s=0, **kwargs)


def test_without_a_terminal_lines_inside_the_epoch_then_the_summary():
    bar = _plain_bar(plain_every="25%")
    _fit(bar)
    lines = bar.console.file.getvalue().splitlines()
    progress = [line for line in lines if "  batch " in line]
    assert [re.search(r"batch (\d+)/10", line).group(1) for line in progress] == ["3", "5", "8"] * 2
    first = progress[0]
    assert first.startswith("epoch 1/2  batch 3/10 (30%)  loss ") and "  lr 0.1  " in first
    assert re.search(r"  \d+ samples/s  eta \d+:\d\d$", first), first
    summaries = [line for line in lines if "  batch " not in line]
    assert [line.split("  ")[0] for line in summaries] == ["epoch 1/2", "epoch 2/2"]
    assert lines.index(summaries[0]) == 3  # after the epoch's three progress lines


def test_plain_lines_wait_for_the_refresh_points():
    bar = _plain_bar(plain_every="25%")
    _fit(bar, epochs=1, log_every=4)  # values are read from the device at batches 4 and 8 only
    progress = [line for line in bar.console.file.getvalue().splitlines() if "  batch " in line]
    assert [re.search(r"batch (\d+)/", line).group(1) for line in progress] == ["4", "8"]


def test_plain_every_batches_and_off():
    bar = _plain_bar(plain_every=3)
    _fit(bar, epochs=1)
    assert len([line for line in bar.console.file.getvalue().splitlines() if "  batch " in line]) == 3  # 3, 6, 9
    bar = _plain_bar(plain_every=None)
    _fit(bar, epochs=2)
    assert len(bar.console.file.getvalue().splitlines()) == 2  # the summaries only


# ---------------------------------------------------------------------- the live line at 80 columns
VALUES = ["loss 0.1235", "acc 0.9876", "digit_acc 0.9812", "odd_acc 0.9901", "lr 0.001"]


@pytest.mark.parametrize("width", range(45, 131, 5))
def test_live_line_fits_and_never_cuts_a_number(width):
    line = live_line("epoch 10/100", 12345, 60000, 61.0, 3600.0 * 4, "205.8 it/s", VALUES, width)
    console = Console(file=io.StringIO(), width=width, record=True, force_terminal=True)
    console.print(line)
    rendered = console.export_text().splitlines()
    assert len(rendered) == 1 and len(rendered[0]) <= width  # one line: nothing wrapped
    text = rendered[0]
    assert text.startswith("epoch 10/100 ") and " 12345/60000 1:01 eta 4:00:00" in text
    shown = text.split("  ")[1:]  # the name-value pairs after the fixed part
    assert shown == VALUES[:len(shown)]  # whole pairs, in order: never one cut short
    if width >= 80:
        assert shown[:2] == VALUES[:2]  # at 80 columns the loss and the first metric are there


def test_live_line_gives_way_in_order():
    wide = live_line("epoch 1/2", 5, 10, 1.0, 1.0, "5.0 it/s", ["loss 0.5"], 200).plain
    assert wide == "epoch 1/2 ━━━━━━━━━━╺━━━━━━━━━ 5/10 0:01 eta 0:01 5.0 it/s  loss 0.5"
    assert live_line("epoch 1/2", 5, 10, 1.0, 1.0, "5.0 it/s", ["loss 0.5"], 49).plain == \
        "epoch 1/2 ━━━━━╺━━━━ 5/10 0:01 eta 0:01  loss 0.5"  # the speed went first
    assert live_line("epoch 1/2", 5, 10, 1.0, 1.0, "5.0 it/s", ["loss 0.5"], 48).plain == \
        "epoch 1/2 5/10 0:01 eta 0:01  loss 0.5"  # then the bar
    assert live_line("epoch 1/2", 5, None, 1.0, None, "5.0 it/s", [], 200).plain == "epoch 1/2 5 0:01 5.0 it/s"
    narrow = live_line("epoch 10/100", 12345, 60000, 61.0, 1.0, "", VALUES, 20)
    assert narrow.plain == "epoch 10/100 12345/…"  # narrower than the essentials: cut, on one line


class _Snapshot(Callback):
    """After the bar drew a batch, render what the live display holds to an 80-column console."""

    order = 101

    def __init__(self, bar):
        self.bar, self.frames = bar, []

    def after_batch(self, trainer):
        console = Console(file=io.StringIO(), width=80, record=True, force_terminal=True)
        console.print(self.bar._progress.get_renderable())
        self.frames.append(console.export_text().splitlines())


def test_live_bar_in_a_fit_keeps_the_counter_and_eta_at_80_columns():
    bar = ProgressBar(Console(file=io.StringIO(), force_terminal=True, width=80), min_interval_s=0.0)
    # Long metric names: more values than 80 columns hold.
    metrics = {name: (lambda out, tgt: (out.argmax(1) == tgt).float().mean())
               for name in ("accuracy_of_the_digit_head", "accuracy_of_the_parity_head")}
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    snapshot = _Snapshot(bar)
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(), metrics=metrics,
            max_epochs=1, callbacks=[bar, snapshot], seed=0, log_every_n_steps=1).fit(_loader())
    assert len(snapshot.frames) == 10
    for batch, frame in enumerate(snapshot.frames, start=1):
        assert len(frame) == 1 and len(frame[0]) <= 80, frame
        assert f" {batch}/10 " in frame[0] and " eta " in frame[0]
        assert "  loss " in frame[0]
