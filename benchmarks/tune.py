"""``Trainer(auto=True)`` against an exhaustive sweep of the space it searches, on two workloads.

* data-bound: ``dataloader.py``'s CPU-heavy data set (zlib-decode a 3x64x64 image, crop, flip,
  jitter, box blurs: 1-3 ms a sample) into a small pooled MLP (no Conv2d: channels-last is not in
  its space).
* compute-bound: 3x32x32 in-memory images (a TensorDataset) into a small 3-layer CNN (channels-last
  is in its space).

For each workload:

1. **The sweep**: every static combination of precision {32, bf16-mixed, 16-mixed} x batch size
   {the user's and its doublings up to the tuner's cap, ``len(dataset) // 4``} x loader
   {``num_workers=0``; 1, 2, 4 workers x prefetch 2, 4; persistent} x channels-last {off, on} where it
   applies, each a real ``Trainer.fit`` of the same ``--*-sweep-epochs`` (samples/s = samples trained /
   wall time of ``fit``). A run still going after :data:`CAP` times the fastest sweep run so far is
   stopped there: it would have been at most 1/CAP of a run already measured, so it cannot be the
   maximum (shown as ``<`` that bound). This is what makes the slow precisions (bf16 and fp16 run
   5-20x slower than fp32 on this CPU) affordable without leaving any point out. The machine is
   shared: a run *starved* by other processes (they kept more than :data:`LOADED` cores busy and the
   machine had under :data:`IDLE` cores idle) is run once more (the faster kept: others' load only
   slows a run down), after waiting up to ``--wait`` s for their load to pass; the ``--recheck``
   fastest points are measured a second time. ``torch.compile`` is tried once, at
   the best eager point, as one whole run (its ~25 s first step can only pay over a whole run).
2. ``trainer.tune(loader, budget=--budget)`` once from the user's default: what the search finds
   when the 5% budget does not bind.
3. **Whole runs, interleaved**: ``--repeats`` rounds, each running every setting once in a rotated
   order: the tuned run (``Trainer(auto=True)`` given the user's default: fp32, the default batch,
   ``num_workers=0``, no compile; the tuning runs inside ``fit`` and counts in its time), the user's
   default, the sweep's ``--top`` fastest points, the budgeted ``tune``'s choice and the first tuned
   run's choice re-run statically (a loaded run re-run up to ``--retries`` times, the faster kept).
   Figures are medians over rounds; "best" is the fastest static setting over these whole runs.

Reported: tuned / best, tuned / default, the tuning's share of the run (its seconds over the tuned
run's wall time, and ``report.share``, over the expected run the tuner estimated), the tuner's
report table, and the CPU other processes used during each run (``/proc/stat`` less this process
tree: the machine is shared). Goals (issue 21): tuned >= 0.95 of the best, tuning under 5% of the run.

    nice -n -10 .venv/bin/python benchmarks/tune.py --only data-bound     # ~10 min on 2 cores, 20+ under load
    nice -n -10 .venv/bin/python benchmarks/tune.py --only compute-bound  # ~9 min, 20+ under load
    # whole runs 6x longer against the sweep's best points, no new sweep (~7 min):
    nice -n -10 .venv/bin/python benchmarks/tune.py --only compute-bound --given 32,256,0,0,cl --scale 6 \
        --repeats 2 --budget 0 --no-compile
    .venv/bin/python benchmarks/tune.py --quick                   # a smoke run of every step (~5 min)

One torch thread in the training process (``--threads``: with loader workers on 2 cores a second
intra-op thread spins against them); workers always use 1.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaptrain import Callback, CancelFitException, Trainer
from adaptrain.core.loader_trials import stop_workers_now
from dataloader import AugmentedImages, cpu_seconds, other_cores, sample_cost_ms

warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on 2 cores: swept on purpose

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
LOADERS = [(0, None)] + [(w, p) for w in (1, 2, 4) for p in (2, 4)]
CAP = 2.0  # a sweep run is stopped after this many times the fastest sweep run's wall time
LOADED = 0.3  # cores other processes kept busy during a run above which it is run again
TUNED = "tuned (auto=True)"
IDLE = 0.25  # ... and the machine's cores were idle less than this
CORES = psutil.cpu_count()  # /proc/stat counts the whole machine
GATE = {"starved": False, "waited": 0.0, "wait": 10.0}  # the last run was starved, seconds waited, the most to wait
RETRIES = 1  # at most this many re-runs of a loaded run (the fastest kept)


@dataclass(frozen=True)
class Config:
    """One static point of the space."""

    precision: str = "32"
    batch_size: int = 32
    num_workers: int = 0
    prefetch_factor: int | None = None
    channels_last: bool = False
    compile: bool = False
    micro_batch_size: int | None = None

    def describe(self) -> str:
        loader = f"w{self.num_workers}" + (f"/pf{self.prefetch_factor}" if self.num_workers else "")
        extra = (" cl" if self.channels_last else "") + (" compile" if self.compile else "")
        extra += f" micro{self.micro_batch_size}" if self.micro_batch_size else ""
        return f"{self.precision:<10} b{self.batch_size:<4} {loader:<6}{extra}"


@dataclass
class Workload:
    name: str
    dataset: Dataset
    make_model: Callable[[], nn.Module]
    default_batch: int
    run_epochs: int
    sweep_epochs: int
    channels_last: bool  # whether channels-last is in the tuner's space (Conv2d and 4-D inputs)

    def batch_sizes(self) -> list[int]:
        sizes, size = [], self.default_batch
        while size <= max(len(self.dataset) // 4, 1):  # the tuner's cap (core/autotune.py tune_space)
            sizes.append(size)
            size *= 2
        return sizes

    def grid(self) -> list[Config]:
        layouts = (False, True) if self.channels_last else (False,)
        return [Config(p, b, w, pf, cl) for p, cl, b, (w, pf) in
                itertools.product(PRECISIONS, layouts, self.batch_sizes(), LOADERS)]

    @property
    def default(self) -> Config:
        return Config(batch_size=self.default_batch)


def pooled_mlp() -> nn.Module:
    """The data-bound workload's small model: no Conv2d, so channels-last is not in its space."""
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 14 * 14, 128), nn.ReLU(), nn.Linear(128, 10))


def small_cnn() -> nn.Module:
    """The compute-bound workload's model: 3x32x32 -> 16x16x16 -> 32x8x8 -> 32x8x8 -> 10."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(512, 10))


def workloads(args) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(args.samples, 3, 32, 32, generator=g),
                           torch.randint(0, 10, (args.samples,), generator=g))
    return [Workload("data-bound", AugmentedImages(args.samples, args.blur), pooled_mlp, args.batch_size,
                     args.data_epochs * args.scale, args.data_sweep_epochs, False),
            Workload("compute-bound", images, small_cnn, args.batch_size, args.compute_epochs * args.scale,
                     args.compute_sweep_epochs, True)]


class StopAfter(Callback):
    """Ends ``fit`` once it has run ``seconds`` (a sweep run already slower than the cap)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.stopped, self.started = seconds, False, 0.0

    def before_fit(self, trainer) -> None:
        self.started = time.perf_counter()

    def after_batch(self, trainer) -> None:
        if time.perf_counter() - self.started > self.seconds:
            self.stopped = True
            raise CancelFitException


@dataclass
class Run:
    rate: float
    seconds: float
    samples: int
    stopped: bool = False
    attempts: int = 1
    others: float = 0.0
    steal: float = 0.0
    idle: float = 0.0
    own: float = 0.0  # cores this process tree used, and the most it could use
    demand: float = 1.0

    @property
    def starved(self) -> bool:
        """Other processes took cores this run could have used: they were busy, no core was left idle and
        the run used less than it could (a run without workers uses one core; one other busy process does
        not starve it on 2 cores)."""
        return self.others > LOADED and self.idle < IDLE and self.own < self.demand - 0.1
    tune_s: float | None = None  # the auto run's tuning seconds, its share of the expected run, its choice
    tune_share: float | None = None
    chosen: Config | None = None
    table: str | None = None


def fit_run(w: Workload, setting: Config | str, epochs: int, cap_s: float | None = None) -> Run:
    """One whole ``fit`` (fresh model, same seed); ``setting`` a Config or ``"auto"``."""
    before, started = cpu_seconds(), time.perf_counter()
    run = _fit(w, setting, epochs, cap_s)
    gc.collect()  # the persistent workers are joined here: their CPU time counts as ours
    # over the whole window (set-up and the workers' shutdown included), not fit's seconds: the CPU
    # the workers spend finishing their prefetched batches at shutdown is ours
    after, seconds = cpu_seconds(), time.perf_counter() - started
    run.others, run.steal = other_cores(before, after, seconds)
    run.idle = max(CORES - (after[0] - before[0]) / seconds - run.steal, 0.0)
    run.own = (after[1] - before[1]) / seconds
    # what the run could use: one core without workers (one torch thread), every core with them
    run.demand = float(CORES) if setting == "auto" or setting.num_workers else 1.0
    return run


def build(w: Workload, config: Config, epochs: int, auto: bool = False, callbacks=None) -> tuple[Trainer, DataLoader]:
    """A fresh model (same seed), its Trainer and the user's DataLoader at ``config``."""
    torch.manual_seed(0)
    model = w.make_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss(),
                      max_epochs=epochs, progress=False, seed=0, precision=config.precision,
                      channels_last=config.channels_last, compile=config.compile, auto=auto,
                      micro_batch_size=config.micro_batch_size, callbacks=callbacks)
    trainer.print = lambda *a, **k: None  # the tuner's line is read from the history
    kwargs = {}
    if config.num_workers:
        kwargs = dict(num_workers=config.num_workers, prefetch_factor=config.prefetch_factor, persistent_workers=True)
    loader = DataLoader(w.dataset, batch_size=config.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(1), **kwargs)
    return trainer, loader


def as_config(chosen: dict[str, Any]) -> Config:
    """A TuneReport's ``chosen`` dict as a static Config."""
    workers = chosen["num_workers"]
    return Config(chosen["precision"], chosen["batch_size"], workers, chosen["prefetch_factor"] if workers else None,
                  chosen["channels_last"], chosen["compile"], chosen["micro_batch_size"])


def _fit(w: Workload, setting: Config | str, epochs: int, cap_s: float | None) -> Run:
    auto = setting == "auto"
    stopper = StopAfter(cap_s) if cap_s else None
    trainer, loader = build(w, w.default if auto else setting, epochs, auto, [stopper] if stopper else None)
    started = time.perf_counter()
    trainer.fit(loader)
    seconds = time.perf_counter() - started
    samples = trainer.state.samples_seen
    for used in {id(loader): loader, id(trainer.state.train_loader): trainer.state.train_loader}.values():
        # the persistent workers are done: a graceful shutdown waits for their prefetched batches (~2 s here)
        stop_workers_now(getattr(used, "_iterator", None))
    run = Run(samples / seconds, seconds, samples, stopped=bool(stopper and stopper.stopped))
    if auto:
        entry = next(a for a in trainer.state.history.adaptations if a.get("kind") == "auto")
        run.tune_s, run.tune_share, run.chosen = entry["seconds"], entry["share"], as_config(entry["after"])
        run.table = trainer.autotune.report.table()
    return run


def advised(w: Workload, budget: float) -> tuple[Config, str]:
    """``trainer.tune(loader, budget=budget)`` from the user's default: its choice and report table."""
    trainer, loader = build(w, w.default, w.run_epochs)
    report = trainer.tune(loader, budget=budget)
    return as_config(report.chosen), report.table()


# ---------------------------------------------------------------------- the sweep
def measured(w: Workload, setting: Config | str, epochs: int, cap_s: float | None = None,
             retries: int = RETRIES) -> Run:
    """The fastest of up to ``1 + retries`` runs: a run starved by other processes (they kept more than
    :data:`LOADED` cores busy and under :data:`IDLE` cores were left idle) is run again (others can only
    slow a run down); after a starved run the next waits up to ``GATE["wait"]`` s for their load to pass."""
    best = None
    for attempt in range(1 + retries):
        if GATE["starved"]:
            GATE["waited"] += quiet(GATE["wait"])
        run = fit_run(w, setting, epochs, cap_s)
        GATE["starved"] = run.starved
        if best is None or run.rate > best.rate:
            best = run
        best.attempts = attempt + 1
        if not run.starved:
            break
    return best


def quiet(wait_s: float, window: float = 0.3) -> float:
    """Wait, up to ``wait_s``, until other processes keep at most :data:`LOADED` cores busy over ``window``
    seconds (other sessions' runs come in bursts of 10-90 s here); returns the seconds waited."""
    started = time.perf_counter()
    while True:
        before = cpu_seconds()
        time.sleep(window)
        if other_cores(before, cpu_seconds(), window)[0] <= LOADED or time.perf_counter() - started > wait_s:
            return time.perf_counter() - started


def show(run: Run, total: int) -> str:
    rate = f"<{total / run.seconds:7.0f}" if run.stopped else f"{run.rate:8.0f}"
    retried = f", {run.attempts} tries" if run.attempts > 1 else ""
    return (f"{rate} samples/s {run.seconds:5.2f} s (others {run.others:.2f} cores, own {run.own:.2f}"
            f"{', starved' if run.starved else ''}{retried})")


def sweep_rate(run: Run, total: int) -> float:
    """A stopped run's rate is bounded by what it would have had at the cap (it ran longer)."""
    return total / run.seconds if run.stopped else run.rate


def sweep(w: Workload, recheck: int) -> dict[Config, Run]:
    """Every static point, the same sweep-run length, slow ones stopped at the cap (see the module doc),
    then the ``recheck`` fastest measured once more (the faster of the two kept)."""
    grid, total = w.grid(), w.sweep_epochs * len(w.dataset)
    print(f"\n== {w.name}: sweep of {len(grid)} static points, {w.sweep_epochs} epoch(s) of {len(w.dataset)} "
          f"samples each", flush=True)
    results: dict[Config, Run] = {}
    fastest = None
    started = time.perf_counter()
    for i, config in enumerate(grid, 1):
        run = results[config] = measured(w, config, w.sweep_epochs, CAP * fastest if fastest else None)
        if not run.stopped:
            fastest = min(fastest or run.seconds, run.seconds)
        print(f"  [{i:3}/{len(grid)}] {config.describe():<28} {show(run, total)}", flush=True)
    ranked = sorted(results, key=lambda c: sweep_rate(results[c], total), reverse=True)
    print(f"  re-measuring the {recheck} fastest (the faster of the two kept):", flush=True)
    for config in ranked[:recheck]:
        again = measured(w, config, w.sweep_epochs)
        print(f"    {config.describe():<28} {show(again, total)} (first {results[config].rate:.0f})", flush=True)
        if again.rate > results[config].rate:
            results[config] = again
    ranked = sorted(results, key=lambda c: sweep_rate(results[c], total), reverse=True)
    stopped = sum(r.stopped for r in results.values())
    print(f"  sweep took {time.perf_counter() - started:.0f} s ({stopped} of {len(grid)} runs stopped at the cap, "
          f"{sum(r.attempts > 1 for r in results.values())} re-run for load); top 5:")
    for config in ranked[:5]:
        print(f"    {config.describe():<28} {results[config].rate:8.0f} samples/s")
    for precision in PRECISIONS:
        best = max((c for c in results if c.precision == precision), key=lambda c: sweep_rate(results[c], total))
        print(f"    best at {precision:<10}: {best.describe():<28} {show(results[best], total)}")
    return results


# ---------------------------------------------------------------------- whole runs
def interleaved(w: Workload, statics: dict[str, Config], repeats: int, retries: int) -> tuple[dict, dict]:
    """``repeats`` rounds of whole runs, rotated, a loaded run re-run up to ``retries`` times (the faster
    kept): the tuned run, the default, ``statics`` and (added in round 1) the tuned run's choice.
    Returns (label -> runs, label -> Config or "auto"), in the order run in round 1."""
    configs: dict[str, Any] = {TUNED: "auto", "default": w.default, **statics}
    runs: dict[str, list[Run]] = {label: [] for label in configs}
    print(f"\n== {w.name}: whole runs of {w.run_epochs} epochs x {len(w.dataset)} samples, {repeats} rounds",
          flush=True)
    for r in range(repeats):
        labels = list(configs)
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:  # round 1 appends the tuned static run once it knows the choice
            run = measured(w, configs[label], w.run_epochs, retries=retries)
            runs[label].append(run)
            extra = ""
            if run.chosen is not None:
                extra = (f" tuning {run.tune_s:.2f} s = {run.tune_s / run.seconds:.1%} of the run "
                         f"({run.tune_share:.1%} of the expected); chose {run.chosen.describe()}")
                if r == 0:  # the first tuned run's choice, re-run statically (even if it is a sweep point too)
                    configs["tuned, static"], runs["tuned, static"] = run.chosen, []
                    order.append("tuned, static")
            print(f"  round {r + 1} {label:<24} {show(run, 0)}{extra}", flush=True)
    return runs, configs


def report(w: Workload, runs: dict, configs: dict, compiled: tuple[Config, Run] | None) -> None:
    med = {label: statistics.median(r.rate for r in runs[label]) for label in configs}
    statics = [label for label in configs if label != TUNED]
    best = max(statics, key=med.get)
    print(f"\n| {w.name} | config | samples/s median [min..max] | x default | x best | others' cores |\n"
          "|---|---|---|---|---|---|")
    for label, config in configs.items():
        rates, others = [r.rate for r in runs[label]], [r.others for r in runs[label]]
        shown = "auto" if config == "auto" else config.describe().strip()
        print(f"| {label}{' (best)' if label == best else ''} | {shown} | {med[label]:.0f} [{min(rates):.0f}.."
              f"{max(rates):.0f}] | {med[label] / med['default']:.2f} | {med[label] / med[best]:.2f} | "
              f"{statistics.median(others):.2f} (max {max(others):.2f}) |")
    if compiled is not None:
        config, run = compiled
        print(f"| compile at the best eager point (1 run) | {config.describe().strip()} | {run.rate:.0f} | "
              f"{run.rate / med['default']:.2f} | {run.rate / med[best]:.2f} | {run.others:.2f} |")
    summary(w, runs, med, best, statics)


def summary(w: Workload, runs: dict, med: dict, best: str, statics: list[str]) -> None:
    auto = runs[TUNED]
    per_round = [a.rate / max(runs[s][i].rate for s in statics if i < len(runs[s])) for i, a in enumerate(auto)]
    shares = [a.tune_s / a.seconds for a in auto]
    ratio = med[TUNED] / med[best]
    print(f"\n{w.name}: tuned / best = {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}); "
          f"tuned / default = {med[TUNED] / med['default']:.3f}; tuned static / best = "
          f"{med['tuned, static'] / med[best]:.3f}; per round tuned / that round's best static: "
          f"{', '.join(f'{x:.3f}' for x in per_round)}")
    print(f"  tuning share of the run: median {statistics.median(shares):.1%} [{min(shares):.1%}..{max(shares):.1%}]"
          f" (goal < 5%: {'met' if max(shares) < 0.05 else 'NOT met'}); of the expected run (report.share): "
          + ", ".join(f"{a.tune_share:.1%}" for a in auto) + "; tuning seconds: "
          + ", ".join(f"{a.tune_s:.2f}" for a in auto))
    print("  choices: " + "; ".join(a.chosen.describe().strip() for a in auto))
    others = [r.others for label in runs for r in runs[label]]
    steal = [r.steal for label in runs for r in runs[label]]
    print(f"  other processes kept {statistics.median(others):.2f} cores busy (median over runs, max "
          f"{max(others):.2f}); hypervisor steal {statistics.median(steal):.2f} cores")
    table = "\n".join("    " + line for line in auto[0].table.splitlines())
    print(f"\n  the tuner's report (first tuned run):\n{table}")


def parse_config(text: str) -> Config:
    """``precision,batch,workers,prefetch[,cl]``, e.g. ``32,256,4,4`` or ``32,64,0,0,cl``."""
    parts = text.split(",")
    workers = int(parts[2])
    return Config(parts[0], int(parts[1]), workers, int(parts[3]) if workers else None, parts[4:] == ["cl"])


def bench(w: Workload, args) -> None:
    print(f"\n#### {w.name}: {sample_cost_ms(w.dataset):.2f} ms a sample in the main process; user default "
          f"{w.default.describe().strip()}; batch sizes {w.batch_sizes()}", flush=True)
    if args.given:  # the sweep's best from an earlier run, for longer whole runs without a new sweep
        ranked = [parse_config(text) for text in args.given]
        statics = {f"given #{i + 1}": c for i, c in enumerate(ranked)}
    else:
        results = sweep(w, args.recheck)
        total = w.sweep_epochs * len(w.dataset)
        ranked = sorted(results, key=lambda c: sweep_rate(results[c], total), reverse=True)
        statics = {f"sweep #{i + 1}": c for i, c in enumerate([c for c in ranked if c != w.default][:args.top])}
    if args.budget:
        started = time.perf_counter()
        config, table = advised(w, args.budget)
        print(f"\n== {w.name}: trainer.tune(budget={args.budget:g} s) from the default, "
              f"{time.perf_counter() - started:.1f} s: chose {config.describe()}\n"
              + "\n".join("    " + line for line in table.splitlines()), flush=True)
        statics[f"tune(budget={args.budget:g}s)"] = config
    compiled = None
    if args.compile:
        config = replace(ranked[0], compile=True)
        print(f"\n== {w.name}: torch.compile at the sweep's best eager point, one whole run", flush=True)
        run = fit_run(w, config, w.run_epochs)
        print(f"  {config.describe()} {show(run, 0)}")
        compiled = (config, run)
    runs, configs = interleaved(w, statics, args.repeats, args.retries)
    report(w, runs, configs, compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1024, help="samples in each data set (the batch cap is 1/4)")
    parser.add_argument("--batch-size", type=int, default=32, help="the user's default batch size")
    parser.add_argument("--data-epochs", type=int, default=8, help="epochs of a data-bound whole run")
    parser.add_argument("--compute-epochs", type=int, default=48, help="epochs of a compute-bound whole run")
    parser.add_argument("--data-sweep-epochs", type=int, default=2)
    parser.add_argument("--compute-sweep-epochs", type=int, default=4)
    parser.add_argument("--scale", type=int, default=1, help="whole runs this many times longer")
    parser.add_argument("--top", type=int, default=2, help="sweep points re-run as whole runs")
    parser.add_argument("--retries", type=int, default=1, help="re-runs of a loaded whole run")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="after a loaded run, wait up to this many seconds for the others' load to pass")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="also trainer.tune(budget=...) once, its choice re-run statically (0: skip)")
    parser.add_argument("--recheck", type=int, default=6, help="fastest sweep points measured a second time")
    parser.add_argument("--blur", type=int, default=6, help="box-blur passes per sample (its CPU cost)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the training process")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--only", choices=["data-bound", "compute-bound"])
    parser.add_argument("--given", action="append", metavar="P,B,W,PF[,cl]",
                        help="skip the sweep: whole runs against these static points (with --only)")
    parser.add_argument("--quick", action="store_true", help="1 round, 256 samples, short runs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.samples, args.data_epochs, args.compute_epochs, args.compile = 1, 256, 2, 8, False
        args.top, args.recheck, args.budget = 1, 2, 3.0
    torch.set_num_threads(args.threads)
    GATE["wait"] = args.wait
    print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, torch threads {torch.get_num_threads()},"
          f" {args.repeats} rounds, load before start {os.getloadavg()[0]:.2f}, nice {os.nice(0)}", flush=True)
    started = time.perf_counter()
    for w in workloads(args):
        if not args.only or w.name == args.only:
            bench(w, args)
    print(f"\nwhole benchmark: {time.perf_counter() - started:.0f} s, of which {GATE['waited']:.0f} s waiting for "
          "other processes' load to pass")


if __name__ == "__main__":
    main()
