"""ResourceMonitor's overhead: the same training with and without it, interleaved in one run.

A small MLP (784-256-256-10, batch 64, SGD with momentum, a shuffled DataLoader over tensors: a few
milliseconds a step here; a harsh case, since the monitor costs per window, not per FLOP) is trained
for ``--epochs`` epochs of ``--batches`` batches, once with ``ResourceMonitor(every_n_steps=N)`` (its
per-epoch block printed, to a discarded stdout) and once without, alternating which goes first, for
``--rounds`` rounds. Each round gives the paired ratio of the two fits' times (``fit`` as a whole:
the monitor's set-up, epoch summaries and end-of-run verdict included); the median over rounds is
the end-to-end overhead, and ``--null`` (no monitor in either arm) shows how far noise alone moves
it. On a shared 2-core machine single rounds spread by +-25%, more than the 1% to resolve, so the
monitor's own time is also measured directly (the seconds inside its hooks) and split into its
cost per window, per epoch and per fit: per step at the interval, the window's cost over N steps.

    .venv/bin/python benchmarks/resource_monitor.py            # default interval, about a minute
    .venv/bin/python benchmarks/resource_monitor.py --null     # control: no monitor in either arm
    .venv/bin/python benchmarks/resource_monitor.py --every 10 --rounds 10
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptrain import ResourceMonitor, Trainer

HOOKS = ("before_fit", "before_train", "after_batch", "after_train", "after_epoch", "after_fit")


class TimedMonitor(ResourceMonitor):
    """ResourceMonitor that adds up the wall time spent inside its own hooks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_seconds = 0.0
        self.by_hook = dict.fromkeys(HOOKS, 0.0)


def _timed(name: str):
    base = getattr(ResourceMonitor, name)

    def hook(self: TimedMonitor, trainer: Trainer) -> None:
        start = time.perf_counter()
        base(self, trainer)
        took = time.perf_counter() - start
        self.hook_seconds += took
        self.by_hook[name] += took

    return hook


for _name in HOOKS:
    setattr(TimedMonitor, _name, _timed(_name))


def make_loader(batches: int, batch_size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = batches * batch_size
    x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)


def fit(loader: DataLoader, epochs: int, monitor: TimedMonitor | None) -> tuple[float, float]:
    """Wall and CPU seconds (this process, user + system) of one ``fit``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss(),
                      max_epochs=epochs, callbacks=[monitor] if monitor else [], progress=False)
    with contextlib.redirect_stdout(io.StringIO()):  # the block is printed, as in a real run, and discarded
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.fit(loader)
        return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=ResourceMonitor().every_n_steps, help="every_n_steps")
    parser.add_argument("--rounds", type=int, default=40, help="an even number balances the order")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100, help="batches per epoch")
    parser.add_argument("--null", action="store_true", help="control: the 'with' arm runs without the monitor too")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core for training: the other absorbs the machine's noise
    loader = make_loader(args.batches)
    fit(loader, 1, TimedMonitor(every_n_steps=args.every))  # warm-up: imports, allocator, psutil
    ratios, cpu_ratios, shares, plain_times = [], [], [], []
    by_hook: dict[str, list[float]] = {name: [] for name in HOOKS}
    for round_ in range(args.rounds):
        monitor = TimedMonitor(every_n_steps=args.every)
        arm = None if args.null else monitor
        if round_ % 2:
            with_s, without_s = fit(loader, args.epochs, arm), fit(loader, args.epochs, None)
        else:
            without_s, with_s = fit(loader, args.epochs, None), fit(loader, args.epochs, arm)
        ratios.append(with_s[0] / without_s[0])
        cpu_ratios.append(with_s[1] / without_s[1])
        shares.append(monitor.hook_seconds / with_s[0])
        plain_times.append(without_s[0])
        for name, seconds in monitor.by_hook.items():
            by_hook[name].append(seconds)
    steps = args.epochs * args.batches
    step_ms = 1e3 * statistics.median(plain_times) / steps
    print(f"ResourceMonitor(every_n_steps={args.every}): {args.rounds} rounds of {args.epochs} epochs x "
          f"{args.batches} batches; a step without it {step_ms:.2f} ms"
          + ("; null control: no monitor in either arm" if args.null else f" ({monitor.bottleneck}-bound)"))
    for what, values in (("wall-time", ratios), ("CPU-time", cpu_ratios)):
        print(f"paired {what} ratio, with / without: median {statistics.median(values):.4f} "
              f"(range {min(values):.4f} .. {max(values):.4f})")
    print(f"time inside the monitor's hooks: median {statistics.median(shares):.3%} of the fit "
          f"(max {max(shares):.3%}), {1e6 * statistics.median(shares) * step_ms / 1e3:.1f} us per step")

    windows = max(args.epochs * (args.batches // args.every), 1)  # after_batch samples (the rest: after_train)
    per_window = statistics.median(by_hook["after_batch"]) / windows
    per_epoch = statistics.median([sum(v) for v in zip(by_hook["before_train"], by_hook["after_train"],
                                                        by_hook["after_epoch"])]) / args.epochs
    per_fit = statistics.median([a + b for a, b in zip(by_hook["before_fit"], by_hook["after_fit"])])
    print(f"median cost: {1e3 * per_window:.2f} ms a window (all after_batch calls / windows), "
          f"{1e3 * per_epoch:.2f} ms an epoch (summary, verdict, printed block), {1e3 * per_fit:.2f} ms a fit "
          "(set-up, resources.yaml)")
    print(f"so per step at every_n_steps={args.every}: {per_window / args.every / (step_ms / 1e3):.3%} of a "
          f"{step_ms:.2f} ms step, plus the epoch's and fit's fixed costs spread over their steps")


if __name__ == "__main__":
    main()
