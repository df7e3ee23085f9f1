"""What :class:`~adaptrain.ResourceMonitor` reads at a measurement point, and how windows add up.

The readers: host CPU and RAM (psutil), the GPU (NVML through ``pynvml``, and torch's allocator),
and the time of one host-to-device copy. Each returns only what it measured: a field it cannot
read is absent, never 0, so a CPU run has no GPU fields at all. Every read is non-blocking except
:func:`copy_seconds`, which synchronises the device twice (once per window, on CUDA only).

A window is a dict of those fields plus the loop's ``data_time`` / ``compute_time`` over it, its
wall ``seconds``, ``samples`` and ``batches``; :func:`summarize` adds windows up (an epoch, the
run), :func:`verdict` names the bottleneck of the result and :func:`format_block` prints it.

Example:
    >>> sorted(HostReader().read())
    ['cpu_percent', 'process_cpu_percent', 'ram_fraction', 'ram_gb']
    >>> s = summarize([{"data_time": 3.0, "compute_time": 1.0, "seconds": 4.0, "samples": 400, "cpu_percent": 50.0},
    ...                {"data_time": 1.0, "compute_time": 1.0, "seconds": 2.0, "samples": 200, "cpu_percent": 80.0}])
    >>> s["data_share"], s["samples_per_s"], s["cpu_percent"]  # the CPU mean is weighted by seconds
    (0.6666666666666666, 100.0, 60.0)
    >>> verdict(s).name, metric_values(s)["resource_data_share"]
    ('data', 0.6666666666666666)
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import psutil
import torch

from adaptrain.core.batching import to_device
from adaptrain.tuning.bottleneck import Bottleneck, Recommendation, name_bottleneck

__all__ = ["METRICS", "GpuReader", "HostReader", "copy_seconds", "format_block", "metric_values", "record_values",
           "summarize", "verdict"]

GB = 1e9
_SUMS = ("data_time", "compute_time", "transfer_time", "seconds", "samples", "batches")
_MEANS = ("cpu_percent", "process_cpu_percent", "gpu_util", "mfu")  # weighted by the windows' seconds
_PEAKS = ("ram_gb", "ram_fraction", "memory_fraction", "gpu_memory_gb")  # pressure is about the worst moment
#: Summary field -> (logged metric name, scale). Fractions are logged as percentages, except the shares and MFU.
METRICS = {
    "data_share": ("resource_data_share", 1), "transfer_share": ("resource_transfer_share", 1),
    "samples_per_s": ("resource_samples_per_s", 1), "cpu_percent": ("resource_cpu_percent", 1),
    "process_cpu_percent": ("resource_process_cpu_percent", 1), "ram_gb": ("resource_ram_gb", 1),
    "ram_fraction": ("resource_ram_percent", 100), "gpu_util": ("resource_gpu_util_percent", 100),
    "memory_fraction": ("resource_gpu_memory_percent", 100), "gpu_memory_gb": ("resource_gpu_memory_gb", 1),
    "mfu": ("resource_mfu", 1),
}
#: The fields each epoch's history record gets (a column each in history.csv; the rest go per window).
RECORD_FIELDS = ("data_share", "cpu_percent", "ram_gb", "gpu_util", "memory_fraction", "mfu")


class HostReader:
    """CPU utilisation since the previous read (system-wide, and this process's: 100 = one core busy),
    RAM of this process (its loader workers included when asked) and the machine's RAM in use."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start()

    def start(self) -> None:
        """Begin a new interval: the next :meth:`read` averages CPU use from here."""
        self._mark = (time.perf_counter(), time.process_time())
        psutil.cpu_percent(None)  # psutil keeps the system's mark itself

    def read(self, workers: bool = False) -> dict[str, float]:
        """The figures since :meth:`start` or the previous read; ``workers`` adds the child processes' RAM."""
        # This process's CPU from its own clock (one syscall) rather than psutil's /proc read: ~50 us less a read.
        now, cpu = time.perf_counter(), time.process_time()
        wall = now - self._mark[0]
        process_cpu = 100 * (cpu - self._mark[1]) / wall if wall > 0 else 0.0
        self._mark = (now, cpu)
        rss = self.process.memory_info().rss
        if workers:  # walking the children costs a /proc scan: only when loader workers exist
            for child in self.process.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.Error:  # a worker that exited between the listing and the read
                    pass
        memory = psutil.virtual_memory()
        return {"cpu_percent": float(psutil.cpu_percent(None)), "process_cpu_percent": process_cpu,
                "ram_gb": rss / GB, "ram_fraction": (memory.total - memory.available) / memory.total}


class GpuReader:
    """The training GPU: its utilisation and memory in use through NVML (when ``pynvml`` imports and NVML
    answers), and the peak memory this process allocated over the card's (torch's allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = torch.cuda.get_device_properties(device).total_memory
        self.nvml: Any = None
        self.handle: Any = None
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, _nvml_handle(pynvml, device)
        except Exception:  # noqa: BLE001 - no driver, no permission, a MIG slice: NVML fields stay absent
            self.nvml = self.handle = None

    def read(self) -> dict[str, float]:
        out = {"memory_fraction": min(torch.cuda.max_memory_allocated(self.device) / self.total, 1.0)}
        if self.handle is not None:
            try:
                out["gpu_util"] = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu / 100
                out["gpu_memory_gb"] = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / GB
            except Exception:  # noqa: BLE001 - a read that fails once is dropped, training goes on
                pass
        return out

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting NVML down is best effort
                pass
            self.nvml = self.handle = None


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """NVML's handle of ``device``: by UUID, since CUDA_VISIBLE_DEVICES renumbers torch's indices."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 - fall back to the index (right without CUDA_VISIBLE_DEVICES)
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None else 0)


def copy_seconds(batch: Any, device: torch.device) -> float:
    """Seconds to copy ``batch`` to ``device`` as the loop does (``non_blocking``), synchronised on both
    sides so the copy alone is timed. A second copy of one batch per window: its cost is that copy."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    to_device(batch, device)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------- windows (pure)
def summarize(windows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Windows added up: sums of times and counts, seconds-weighted means of rates, peaks of memory;
    then ``data_share``, ``transfer_share`` (of data + compute time) and ``samples_per_s``. A field no
    window has stays absent."""
    out: dict[str, float] = {}
    for key in _SUMS:
        values = [w[key] for w in windows if key in w]
        if values:
            out[key] = float(sum(values))
    for key in _MEANS:
        pairs = [(w[key], w.get("seconds", 0.0)) for w in windows if key in w]
        if pairs:
            weight = sum(s for _, s in pairs)
            out[key] = sum(v * s for v, s in pairs) / weight if weight > 0 else sum(v for v, _ in pairs) / len(pairs)
    for key in _PEAKS:
        values = [w[key] for w in windows if key in w]
        if values:
            out[key] = float(max(values))
    step = out.get("data_time", 0.0) + out.get("compute_time", 0.0)
    if step > 0:
        out["data_share"] = out["data_time"] / step
        if "transfer_time" in out:
            out["transfer_share"] = out["transfer_time"] / step
    if out.get("seconds", 0.0) > 0 and "samples" in out:
        out["samples_per_s"] = out["samples"] / out["seconds"]
    return out


def verdict(summary: Mapping[str, float]) -> Bottleneck | None:
    """The bottleneck of a :func:`summarize` result; None when no time was measured (no batch)."""
    data, compute = summary.get("data_time", 0.0), summary.get("compute_time", 0.0)
    if data + compute <= 0:
        return None
    mfu = summary.get("mfu")
    return name_bottleneck(data, compute, transfer_time=summary.get("transfer_time"), gpu_util=summary.get("gpu_util"),
                           memory_fraction=summary.get("memory_fraction"), ram_fraction=summary.get("ram_fraction"),
                           mfu=mfu if mfu is not None and 0 <= mfu <= 1 else None)  # a wrong FLOP count: not judged


def metric_values(summary: Mapping[str, float], suffix: str = "") -> dict[str, float]:
    """The summary as the loggers' metrics (``resource_<name><suffix>``), only the fields it has."""
    return {name + suffix: summary[key] * scale for key, (name, scale) in METRICS.items() if key in summary}


def record_values(summary: Mapping[str, float]) -> dict[str, float]:
    """The :data:`RECORD_FIELDS` of an epoch's summary, as its history record's columns."""
    values = metric_values(summary)
    return {METRICS[key][0]: values[METRICS[key][0]] for key in RECORD_FIELDS if key in summary}


# ---------------------------------------------------------------------- the printed block (pure)
def format_block(title: str, summary: Mapping[str, float], found: Bottleneck,
                 recommendations: Mapping[str, Recommendation],
                 adaptations: Sequence[Mapping[str, Any]] = ()) -> str:
    """The plain-text block printed at an epoch's end: averages, the bottleneck, what to change, what
    the tuner changed (``history.adaptations`` entries). Lines only for what was measured.

    Example:
        >>> from adaptrain.tuning.bottleneck import name_bottleneck
        >>> s = {"data_time": 9.0, "compute_time": 1.0, "data_share": 0.9, "samples_per_s": 320.0,
        ...      "cpu_percent": 97.0, "process_cpu_percent": 99.0, "ram_gb": 0.5, "ram_fraction": 0.4}
        >>> print(format_block("resources, epoch 1/3", s, name_bottleneck(9.0, 1.0),
        ...                    {"data.num_workers": Recommendation(2, "more loader workers")},
        ...                    [{"kind": "num_workers", "before": 0, "after": 2, "reason": "data-bound"}]))
        resources, epoch 1/3
          time: data wait 90% of step time (9.00s of 10.00s), 320 samples/s
          host: CPU 97% (this process 99%, 100 = one core), RAM 0.50 GB process peak, 40% of the machine
          bottleneck: data-bound: data wait 90% of step time (from 10% it is the bottleneck)
          recommend data.num_workers: 2 (more loader workers)
          tuner: num_workers 0 -> 2 (data-bound)
    """
    lines = [title]
    step = summary.get("data_time", 0.0) + summary.get("compute_time", 0.0)
    if step > 0:
        line = (f"  time: data wait {summary['data_share']:.0%} of step time ({summary['data_time']:.2f}s of "
                f"{step:.2f}s)")
        if "samples_per_s" in summary:
            line += f", {summary['samples_per_s']:,.0f} samples/s"
        lines.append(line)
    if "cpu_percent" in summary:
        lines.append(f"  host: CPU {summary['cpu_percent']:.0f}% (this process {summary['process_cpu_percent']:.0f}%"
                     f", 100 = one core), RAM {summary['ram_gb']:.2f} GB process peak, "
                     f"{summary['ram_fraction']:.0%} of the machine")
    gpu = [text.format(summary[key]) for key, text in (
        ("gpu_util", "busy {:.0%}"), ("memory_fraction", "peak memory {:.0%} of the card"),
        ("gpu_memory_gb", "{:.2f} GB in use"), ("transfer_share", "copies {:.0%} of step time"),
        ("mfu", "MFU {:.1%}")) if key in summary]
    if gpu:
        lines.append("  gpu: " + ", ".join(gpu))
    lines.append(f"  bottleneck: {found.reason}")
    lines += [f"  recommend {key}: {rec.value} ({rec.reason})" for key, rec in recommendations.items()] or \
        ["  recommend: nothing to change"]
    for change in adaptations:
        reason = f" ({change['reason']})" if change.get("reason") else ""
        lines.append(f"  tuner: {change.get('kind', 'change')} {change.get('before')} -> {change.get('after')}{reason}")
    return "\n".join(lines)
