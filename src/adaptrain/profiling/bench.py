"""Precision x batch-size benchmark of training steps: time/iter, samples/s, peak memory, MFU.

The decision rules (peak FLOP/s, MFU, speedups) are pure functions; :func:`run_bench` is the thin
measuring layer around them. Which precision a device supports is the project's single rule,
:func:`adaptrain.core.precision.precision_support`: a combination it rejects is a row whose ``skipped``
holds its reason. The measuring primitives come from :mod:`adaptrain.profiling.measure`.

Example:
    >>> import torch, torch.nn as nn
    >>> from adaptrain.profiling.bench import run_bench
    >>> table = run_bench(lambda: nn.Linear(8, 2), lambda b: (torch.randn(b, 8), torch.randint(0, 2, (b,))),
    ...                   precisions=("32",), batch_sizes=(4,), device="cpu", steps=3, warmup=1)
    >>> table.rows[0].speedup_vs_fp32
    1.0
"""

from __future__ import annotations

import csv
import gc
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptrain.core.precision import PRECISIONS, precision_support
from adaptrain.core.trainer import Trainer
from adaptrain.profiling.measure import (
    CPU_MEMORY_MEASURE,
    CUDA_MEMORY_MEASURE,
    LiveTensorMeter,
    MiB,
    count_flops,
    map_tensors,
    resolve_device,
    tensor_bytes,
)

# Dense (no sparsity) peak FLOP/s from NVIDIA datasheets, matched by substring of
# torch.cuda.get_device_name(); the more specific names come first.
_H100_SXM = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}
_H100_NVL = {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12}
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", _H100_NVL),
    ("H200 NVL", _H100_NVL),
    ("H100", _H100_SXM),
    ("H200", _H100_SXM),  # same compute as H100 SXM, more and faster memory
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
)


# ---- pure rules ----
def peak_flops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """Peak dense FLOP/s of a known GPU for ``precision`` ("32" uses TF32 if ``tf32``), else None.

    >>> peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed"), peak_flops("NVIDIA A100-SXM4-40GB", "32")
    (989000000000000.0, 19500000000000.0)
    """
    key = {"16-mixed": "fp16", "bf16-mixed": "bf16"}.get(precision, "tf32" if tf32 else "fp32")
    for name, peaks in GPU_PEAK_FLOPS:
        if name.lower() in device_name.lower():
            return peaks[key]
    return None


def mfu(flops_per_iter: float | None, time_per_iter_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over peak FLOP/s.

    >>> mfu(1e12, 0.01, 200e12)
    0.5
    """
    if flops_per_iter is None or peak is None or time_per_iter_s <= 0:
        return None
    return flops_per_iter / time_per_iter_s / peak


@dataclass(frozen=True)
class BenchRow:
    """One precision x batch-size combination; ``skipped`` holds the reason when it did not run."""

    precision: str
    batch_size: int
    time_per_iter_ms: float | None = None
    samples_per_s: float | None = None
    peak_mem_mb: float | None = None
    speedup_vs_fp32: float | None = None
    mfu: float | None = None
    skipped: str | None = None


def with_speedups(rows: Iterable[BenchRow]) -> list[BenchRow]:
    """Fill ``speedup_vs_fp32`` = fp32 time / row time at the same batch size (1.0 for fp32 itself;
    None when the fp32 row of that batch size did not run).

    >>> rows = with_speedups([BenchRow("32", 8, 10.0), BenchRow("bf16-mixed", 8, 4.0)])
    >>> [r.speedup_vs_fp32 for r in rows]
    [1.0, 2.5]
    """
    rows = list(rows)
    fp32 = {r.batch_size: r.time_per_iter_ms for r in rows if r.precision == "32" and r.skipped is None}
    out = []
    for r in rows:
        base = fp32.get(r.batch_size)
        ok = r.skipped is None and base is not None and r.time_per_iter_ms
        speedup = (1.0 if r.precision == "32" else base / r.time_per_iter_ms) if ok else None
        out.append(replace(r, speedup_vs_fp32=speedup))
    return out


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


@dataclass
class BenchTable:
    """The rows of a benchmark plus what they were measured on."""

    rows: list[BenchRow]
    device: str = "cpu"
    device_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    COLUMNS = ("precision", "batch_size", "time_per_iter_ms", "samples_per_s", "peak_mem_mb",
               "speedup_vs_fp32", "mfu", "skipped")

    def to_csv(self, path: str | Path) -> Path:
        """Write one line per row (empty cells for None) and return the path."""
        path = Path(path)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.COLUMNS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
        return path

    def _cells(self, r: BenchRow) -> list[str]:
        return [r.precision, str(r.batch_size), _fmt(r.time_per_iter_ms, ".3f"), _fmt(r.samples_per_s, ".1f"),
                _fmt(r.peak_mem_mb, ".2f"), _fmt(r.speedup_vs_fp32, ".2f"),
                "" if r.mfu is None else f"{100 * r.mfu:.1f}%", (r.skipped or "").replace("|", "/")]

    def to_markdown(self, path: str | Path | None = None) -> str:
        """A GitHub Markdown table (with a line on the device above it); written to ``path`` if given."""
        head = ["precision", "batch", "ms/iter", "samples/s", "peak MiB", "speedup vs fp32", "MFU", "skipped"]
        lines = [f"- device: {self.device_name or self.device}"] + [f"- {k}: {v}" for k, v in self.meta.items()]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def __rich__(self) -> Any:
        from rich.table import Table

        t = Table(title=f"training step benchmark on {self.device_name or self.device}")
        for col in ("precision", "batch", "ms/iter", "samples/s", "peak MiB", "speedup", "MFU", "skipped"):
            t.add_column(col, justify="left" if col in ("precision", "skipped") else "right",
                         no_wrap=col != "skipped")
        for r in self.rows:
            t.add_row(*self._cells(r), style="dim" if r.skipped else None)
        return t

    def print(self, console: Any = None) -> None:
        from rich.console import Console

        (console or Console()).print(self)


# ---- measuring ----
def _fp32_uses_tf32() -> bool:
    """Whether fp32 matmuls run on TF32 tensor cores (legacy or torch >= 2.9 setting)."""
    new_api = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    return torch.get_float32_matmul_precision() != "highest" or new_api == "tf32"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU {model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _measure(make_model: Callable[[], nn.Module], batch: Any, precision: str, dev: torch.device,
             compile: bool, steps: int, warmup: int, criterion: Callable[[Any, Any], torch.Tensor],
             optimizer_factory: Callable[[Any], torch.optim.Optimizer]) -> tuple[list[float], float | None]:
    """Per-step times (ms) of ``steps`` training steps after ``warmup``, and peak memory (MiB)."""
    model = make_model().to(dev).train()
    opt = optimizer_factory(model.parameters())
    # The step fit runs (same precision plugin, micro-batching, clipping, step stage), not a copy of it.
    trainer = Trainer(model, opt, criterion, precision=precision, device=dev, compile=compile, progress=False)

    def step() -> None:
        trainer.run_step(batch)

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(dev)  # one sync at the end: a sync per step would stall the launch queue
        return [s.elapsed_time(e) for s, e in events], torch.cuda.max_memory_allocated(dev) / MiB
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if compile:  # inductor's kernels allocate outside the dispatcher, where the meter cannot see
        return times, None
    resident = (list(model.parameters()), list(model.buffers()), list(opt.state.values()), batch)
    with LiveTensorMeter(resident) as meter:
        step()
    return times, (tensor_bytes(resident) + meter.peak_bytes) / MiB


def run_bench(make_model: Callable[[], nn.Module], make_batch: Callable[[int], tuple[Any, Any]],
              precisions: Sequence[str] = PRECISIONS, batch_sizes: Sequence[int] = (16, 32, 64),
              device: str | torch.device = "auto", compile: bool = False, steps: int = 20, warmup: int = 5,
              criterion: Callable[[Any, Any], torch.Tensor] | None = None,
              optimizer_factory: Callable[[Any], torch.optim.Optimizer] | None = None) -> BenchTable:
    """Time training steps for every precision x batch size the device supports.

    ``make_model()`` builds a fresh model for each combination; ``make_batch(batch_size)`` returns
    ``(inputs, targets)`` (inputs: a tensor, a tuple of positional args or a dict of keyword args).
    A step is forward under autocast (mixed precisions), ``criterion(outputs, targets)`` (default
    cross-entropy), backward (GradScaler for 16-mixed), ``optimizer.step()`` (default AdamW,
    lr 1e-3) and ``zero_grad(set_to_none=True)``; time/iter is the median of ``steps`` steps.
    MFU uses :func:`~adaptrain.profiling.measure.count_flops`' forward+backward FLOPs of one sample times the
    batch size. A precision this device cannot run (:func:`~adaptrain.core.precision.precision_support`)
    gives rows whose ``skipped`` holds the reason; an unknown precision name raises ValueError.
    On CPU both mixed precisions run (autocast supports float16 and bfloat16 there in every torch
    adaptrain supports); without AVX512-FP16/AMX they are slower than fp32, which the table shows.
    """
    for p in precisions:
        if p not in PRECISIONS:  # an unknown name is an error, before any work
            raise ValueError(precision_support(p, "cpu"))  # the reason names it and lists the known ones
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    dev = resolve_device(device)
    criterion = criterion or nn.functional.cross_entropy
    optimizer_factory = optimizer_factory or (lambda params: torch.optim.AdamW(params, lr=1e-3))
    cuda = dev.type == "cuda"
    capability = torch.cuda.get_device_capability(dev) if cuda else None
    name = torch.cuda.get_device_name(dev) if cuda else _cpu_name()
    to_dev = lambda x: map_tensors(x, lambda t: t.to(dev))  # noqa: E731
    flops_per_sample = count_flops(make_model().to(dev), to_dev(make_batch(1)[0])).train
    rows: list[BenchRow] = []
    for bs in map(int, batch_sizes):
        for prec in precisions:
            reason = precision_support(prec, dev.type, capability)
            if reason is not None:
                rows.append(BenchRow(prec, bs, skipped=reason))
                continue
            try:  # the batch is made here too, so that a batch too big for the GPU is an OOM row
                times, mem = _measure(make_model, to_dev(make_batch(bs)), prec, dev, compile, steps, warmup,
                                      criterion, optimizer_factory)
            except torch.cuda.OutOfMemoryError:
                rows.append(BenchRow(prec, bs, skipped="out of memory"))
            else:
                t = statistics.median(times)
                peak = peak_flops(name, prec, _fp32_uses_tf32()) if cuda else None
                fl = None if flops_per_sample is None else flops_per_sample * bs
                rows.append(BenchRow(prec, bs, t, bs / (t / 1e3), mem, mfu=mfu(fl, t / 1e3, peak)))
            gc.collect()  # free the combination's model/optimizer (and an OOM's frames) before the next
            if cuda:
                torch.cuda.empty_cache()
    meta = {"torch": torch.__version__, "compile": compile, "steps": steps, "warmup": warmup,
            "train_flops_per_sample": flops_per_sample,
            "memory": CUDA_MEMORY_MEASURE if cuda else CPU_MEMORY_MEASURE + ", plus optimizer state"}
    return BenchTable(with_speedups(rows), str(dev), name, meta)
