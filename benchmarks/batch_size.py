"""Batch-size search on real CPU training steps.

(a) ``"full"`` vs an exhaustive sweep on workloads whose throughput plateaus (an MLP and a small
    Conv1d net on random data, one thread): the batch found, its samples/s over the sweep's best,
    trials, seconds.
(b) On a model whose forward raises ``torch.OutOfMemoryError`` above a known batch size: the same
    search (``"full"`` from 2, ``"safe"`` from 8192) vs Lightning's ``Tuner.scale_batch_size``
    (``power`` and ``binsearch``, run in a separate venv as a subprocess): result, trials, seconds,
    and the result's samples/s over the best batch that fits.
(c) The pure search on the test suite's simulated throughput curves, 5000 per noise level.
(d) ``Trainer(adaptive_batch_size="full")`` end to end (its own probes on a real DataLoader) vs the sweep.

Steps are the trainer's own (``Trainer.run_step``: forward, backward, optimizer step), on random
batches; throughput is the median step time of >= 3 timed steps after one warm-up step, and the
model is restored after each probe (``state.snapshot`` / ``restore``), as the trainer's search does.

    python benchmarks/batch_size.py                       # all three parts (~4 min on 2 cores)
    python benchmarks/batch_size.py --part simulated      # (c) alone, ~1 min
    python benchmarks/batch_size.py --part trainer        # (d) alone, ~3 min
    python benchmarks/batch_size.py --part lightning --peers-python /work/peers-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

IN_FEATURES, CLASSES = 64, 10
DATASET = 16384  # samples in the (random) data set: the cap of "full"
OOM_ABOVE = 700  # part (b): the forward runs out of memory above this batch size
# Step times are this process's CPU time, not wall time: on a shared machine the wall time of a step
# includes the slices other processes ran in (30% pass-to-pass spread here with load ~1.5 on 2 cores);
# with one torch thread, CPU time is what the step costs. --wall switches to time.perf_counter.
CLOCK = time.process_time
OOM_TEXT = "DefaultCPUAllocator: can't allocate memory: you tried to allocate {} bytes (simulated above {})"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv(nn.Module):
    """Conv1d over the 64 features as a 1-channel signal: 64 -> 31 -> 15 positions, 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 32, 5, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv1d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(32 * 16, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))


class OOMAbove(nn.Module):
    """A real model whose forward raises ``torch.OutOfMemoryError`` above ``limit`` samples, with the
    text of a real CPU allocation failure (Lightning recognises an OOM only by that text)."""

    def __init__(self, model: nn.Module, limit: int | None) -> None:
        super().__init__()
        self.model, self.limit, self.sizes, self.steps = model, limit, [], 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        if not self.sizes or self.sizes[-1] != x.shape[0]:
            self.sizes.append(x.shape[0])  # one entry per run of same-size batches: a trial
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(OOM_TEXT.format(x.shape[0] * 4096, self.limit))
        return self.model(x)


MODELS = {"mlp": MLP, "conv1d": Conv}


def make_trainer(name: str, limit: int | None = None):
    from adaptrain import Trainer

    torch.manual_seed(0)
    model = OOMAbove(MODELS[name](), limit)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss(),
                   device="cpu", progress=False)


def measure(trainer, batch_size: int, min_time: float = 0.2, min_steps: int = 4) -> tuple[float, float] | None:
    """(samples/s, its relative standard error), or None on OOM. The step time is the fastest timed
    step: on a shared machine other processes only ever slow a step down."""
    saved = trainer.state.snapshot()
    x, y = torch.randn(batch_size, IN_FEATURES), torch.randint(0, CLASSES, (batch_size,))
    try:
        trainer.run_step((x, y))  # warm-up: allocator, kernels, optimizer state
        times, start = [], time.perf_counter()
        while len(times) < min_steps or time.perf_counter() - start < min_time:
            t = CLOCK()
            trainer.run_step((x, y))
            times.append(CLOCK() - t)
    except torch.OutOfMemoryError:
        return None
    finally:
        trainer.state.restore(saved)
    q1, median, q3 = statistics.quantiles(times, n=4)
    return batch_size / min(times), (q3 - q1) / 1.35 / median / math.sqrt(len(times))  # IQR / 1.35: a robust std


def prober(trainer, log: list):
    from adaptrain.tuning.batch_size import Probe

    def probe(batch_size: int) -> Probe:
        got = measure(trainer, batch_size)
        log.append((batch_size, got))
        if got is None:
            return Probe(batch_size, False, error="out of memory")
        return Probe(batch_size, True, got[0], spread=got[1])
    return probe


def search(mode: str, name: str, start: int, limit: int | None = None) -> tuple:
    from adaptrain.tuning.batch_size import search_batch_size

    trainer, log = make_trainer(name, limit), []
    t = time.perf_counter()
    found = search_batch_size(mode, start, prober(trainer, log), DATASET)
    return found, time.perf_counter() - t, trainer.model.steps


def sweep(name: str, sizes: list[int], limit: int | None = None, passes: int = 3):
    """samples/s of every size, the best of ``passes`` interleaved passes (a load burst from another
    process hits one pass, not all); the seconds one pass took (what a sweep costs); and the noise:
    the median over sizes of (best - worst pass) / best."""
    trainer, seen, t = make_trainer(name, limit), {}, time.perf_counter()
    for _ in range(passes):
        for b in sizes:
            got = measure(trainer, b)
            if got is not None:
                seen.setdefault(b, []).append(got[0])
    noise = statistics.median((max(r) - min(r)) / max(r) for r in seen.values())
    return {b: max(r) for b, r in seen.items()}, (time.perf_counter() - t) / passes, noise


def duel(name: str, a: int, b: int, limit: int | None = None, rounds: int = 5) -> float:
    """samples/s of ``a`` over ``b``: the median of ``rounds`` back-to-back pairs, so the slow drift of a
    shared machine (15-30% from one pass to the next here) hits both sides of each pair alike."""
    if a == b:
        return 1.0
    trainer = make_trainer(name, limit)
    return statistics.median(measure(trainer, a)[0] / measure(trainer, b)[0] for _ in range(rounds))


def grid(lo: int, hi: int) -> list[int]:
    """Quarter-octave sizes from lo to hi (2^(k/4), rounded), both ends included."""
    k0, k1 = math.ceil(4 * math.log2(lo)), math.floor(4 * math.log2(hi))
    return sorted({lo, hi, *(round(2 ** (k / 4)) for k in range(k0, k1 + 1))})


def part_sweep(starts=(16, 64), repeats: int = 3, verbose: bool = False) -> list[str]:
    lines = [f"(a) full (capped at the data set size {DATASET}) vs an exhaustive sweep: a quarter-octave grid from "
             "the start to the cap plus every size the searches probed; 'best' is the sweep's fastest, "
             "'found/best' the median of 5 back-to-back pairs; 'sweep s' is one pass over the grid"]
    for name in MODELS:
        runs = [(start, *search("full", name, start)) for start in starts for _ in range(repeats)]
        sizes = sorted(set(grid(min(starts), DATASET)) | {p.batch_size for _, f, _, _ in runs for p in f.probes})
        rates, sweep_s, noise = sweep(name, sizes)
        lines.append(f"{name}: {len(sizes)} sizes, best of 3 passes each; pass-to-pass spread {noise:.0%} (median)")
        lines.append(f"  {'start':>5} {'found':>6} {'best':>6} {'found/best':>10} {'trials':>6} {'search s':>8} "
                     f"{'sweep s':>7} {'sweep/search':>12}")
        for start, found, secs, _ in runs:
            eligible = {b: r for b, r in rates.items() if b >= start}
            best = max(eligible, key=eligible.get)
            lines.append(f"  {start:>5} {found.chosen:>6} {best:>6} {duel(name, found.chosen, best):>10.3f} "
                         f"{found.trials:>6} {secs:>8.1f} {sweep_s:>7.1f} {sweep_s / secs:>11.1f}x")
            if verbose:
                lines.append(f"        {found.reason}")
    return lines


def part_trainer(start: int = 16, repeats: int = 3) -> list[str]:
    """(d) The shipped layer end to end: ``Trainer(adaptive_batch_size="full")``'s own search (its
    probes: one warm-up and 3 wall-clock-timed steps of ``run_step`` on real batches of the train
    loader's data set, under a CPU snapshot) vs the exhaustive sweep of (a)."""
    from torch.utils.data import DataLoader, TensorDataset

    from adaptrain import AdaptiveBatchSize, Trainer

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(DATASET, IN_FEATURES, generator=g), torch.randint(0, CLASSES, (DATASET,),
                                                                                        generator=g))
    lines = [f"(d) Trainer(adaptive_batch_size='full') from {start}, its own probes (wall clock, 3 steps), vs the "
             "sweep; found/best: median of 5 back-to-back pairs"]
    for name in MODELS:
        runs = []
        for _ in range(repeats):
            torch.manual_seed(0)
            model = MODELS[name]()
            trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), nn.CrossEntropyLoss(),
                              device="cpu", progress=False, adaptive_batch_size=AdaptiveBatchSize(mode="full"))
            trainer.state.train_loader = DataLoader(data, batch_size=start, shuffle=True)
            t = time.perf_counter()
            found = trainer.batch_sizing.search(trainer)
            runs.append((found, time.perf_counter() - t))
        sizes = sorted(set(grid(start, DATASET)) | {p.batch_size for f, _ in runs for p in f.probes})
        rates, sweep_s, noise = sweep(name, sizes)
        best = max(rates, key=rates.get)
        lines.append(f"{name}: sweep's best {best} (pass-to-pass spread {noise:.0%}); one sweep pass {sweep_s:.1f} s")
        for found, secs in runs:
            lines.append(f"  found {found.chosen:>6}  found/best {duel(name, found.chosen, best):.3f}  trials "
                         f"{found.trials}  search {secs:.1f} s  ({sweep_s / secs:.1f}x faster than one pass)")
    return lines


def part_simulated(curves: int = 5000) -> list[str]:
    """The test suite's random throughput curves (saturating, declining, cliff, knee, sawtooth; a
    memory limit moving by 3 samples per probe), on many more seeds than the test asserts on."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tuning.test_batch_size import full_vs_exhaustive

    lines = [f"(c) full on {curves} simulated curves per noise level: true samples/s of the pick over the best size "
             "of an exhaustive sweep of every size", f"  {'noise':>5} {'>=0.95':>7} {'min':>6} {'mean':>6} "
             f"{'trials mean':>11} {'max':>4}  worst kinds"]
    for sigma in (0.0, 0.01, 0.02):
        results = [full_vs_exhaustive(seed, sigma) for seed in range(curves)]
        ratios = [r for _, r, _ in results]
        trials = [f.trials for _, _, f in results]
        misses = {}
        for kind, r, _ in results:
            misses[kind] = misses.get(kind, 0) + (r < 0.95)
        worst = ", ".join(f"{k} {n}" for k, n in sorted(misses.items(), key=lambda kv: -kv[1]) if n)
        lines.append(f"  {sigma:>5.0%} {sum(r >= 0.95 for r in ratios) / curves:>7.2%} {min(ratios):>6.3f} "
                     f"{statistics.mean(ratios):>6.3f} {statistics.mean(trials):>11.2f} {max(trials):>4}  {worst}")
    return lines


def lightning_worker(limit: int) -> None:
    """Run in the peers venv: Lightning's batch-size finder on the same OOM-above-limit model; JSON out."""
    import lightning.pytorch as pl
    from lightning.pytorch.tuner import Tuner

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = 2
            self.model = OOMAbove(MLP(), limit)
            self.data = torch.utils.data.TensorDataset(torch.randn(DATASET, IN_FEATURES),
                                                       torch.randint(0, CLASSES, (DATASET,)))

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    out = {}
    for mode in ("power", "binsearch"):
        torch.manual_seed(0)
        module = Module()
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        t = time.perf_counter()
        found = Tuner(trainer).scale_batch_size(module, mode=mode)  # defaults: init_val=2, 3 steps per trial
        out[mode] = {"result": found, "seconds": time.perf_counter() - t, "trials": len(module.model.sizes),
                     "steps": module.model.steps, "sizes": module.model.sizes}
    print(json.dumps(out))


def part_lightning(peers_python: str) -> list[str]:
    lines = [f"(b) forward raises torch.OutOfMemoryError above {OOM_ABOVE}: adaptrain's search vs Lightning's "
             "Tuner.scale_batch_size (mlp, one thread)"]
    rows = []
    for mode, start in (("full", 2), ("safe", 8192)):
        found, secs, steps = search(mode, "mlp", start, OOM_ABOVE)
        rows.append((f"adaptrain {mode} from {start}", found.chosen, found.trials, steps, secs))
        lines.append(f"    {found.reason}")
    if not Path(peers_python).exists():
        lines.append(f"    Lightning skipped: {peers_python} not found")
    else:
        proc = subprocess.run([peers_python, __file__, "--lightning-worker", str(OOM_ABOVE)], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode:
            lines.append(f"    Lightning failed: {proc.stderr.strip().splitlines()[-1:]}")
        else:
            for mode, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                rows.append((f"Lightning {mode} from 2", got["result"], got["trials"], got["steps"], got["seconds"]))
    sizes = sorted(set(grid(2, OOM_ABOVE)) | {r[1] for r in rows})
    rates, _, noise = sweep("mlp", sizes, OOM_ABOVE)
    lines.append(f"sweep of {len(sizes)} sizes up to {OOM_ABOVE}, best of 3 passes; pass-to-pass spread {noise:.0%}; "
                 "'/best': median of 5 back-to-back pairs")
    best = max(rates, key=rates.get)
    ours = rows[0][4]
    lines.append(f"{'':26} {'found':>6} {'samples/s':>9} {'/best':>6} {'trials':>6} {'steps':>5} {'seconds':>7} "
                 f"{'s/ours':>6}")
    for label, result, trials, steps, secs in rows:
        lines.append(f"{label:26} {result:>6} {rates[result]:>9.0f} {duel('mlp', result, best, OOM_ABOVE):>6.3f} "
                     f"{trials:>6} {steps:>5} {secs:>7.1f} {secs / ours:>6.2f}")
    lines.append(f"{'best that fits (sweep)':26} {best:>6} {rates[best]:>9.0f} {1:>6.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["sweep", "lightning", "simulated", "trainer", "all"], default="all")
    parser.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                        help="a Python with lightning installed, for part (b)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print each search's reason line")
    parser.add_argument("--wall", action="store_true", help="time steps by wall clock, not process CPU time")
    parser.add_argument("--lightning-worker", type=int, metavar="LIMIT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.perf_counter if args.wall else time.process_time
    if args.lightning_worker:
        lightning_worker(args.lightning_worker)
        return 0
    lines = [f"torch {torch.__version__}, {args.threads} thread(s), steps timed by "
             f"{'wall clock' if args.wall else 'process CPU time'}"]
    if args.part in ("sweep", "all"):
        lines += part_sweep(verbose=args.verbose)
    if args.part in ("lightning", "all"):
        lines += part_lightning(args.peers_python)
    if args.part in ("simulated", "all"):
        lines += part_simulated()
    if args.part in ("trainer", "all"):
        lines += part_trainer()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
