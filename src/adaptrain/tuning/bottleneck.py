"""Name what limits a training step, and recommend settings, as the project's own config keys.

:func:`name_bottleneck` reads one measurement window (the loop's ``data_time`` / ``compute_time``,
optionally the host-to-device copy time inside the compute span, GPU utilisation, device memory
and host RAM in use) and names one of :data:`BOTTLENECKS`, in this order:

1. ``"memory"``: device memory at ``memory_limit`` (95%) or more of the card, or host RAM at
   ``ram_limit`` (90%): the next larger batch or worker fails, and swapping slows everything.
2. ``"data"`` / ``"transfer"``: waiting for batches, or copying them to the device, takes
   ``share`` (10%) of the step time or more (the larger wins). Both are overhead that settings
   remove (workers, pinned memory), unlike the model's own compute.
3. ``"compute"`` otherwise; a GPU busy under half the time is named in the reason (kernels too
   small, or the CPU launching them too slowly).

:func:`recommend` turns that into changes keyed like a run config (``data.num_workers``,
``data.pin_memory``, ``data.batch_size``, ``trainer.precision``), each with its reason;
:func:`to_config` nests them as the YAML file's dict and :func:`to_yaml` writes the
``resources.yaml`` snippet with the reasons as comments, which ``adaptrain fit --config run.yaml
--config resources.yaml`` merges as it is. GPU fields that were not measured are absent, not 0.

Example:
    >>> b = name_bottleneck(data_time=4.0, compute_time=6.0)
    >>> b.name, b.numbers["data_share"]
    ('data', 0.4)
    >>> recs = recommend(b, {"data.num_workers": 2, "data.pin_memory": False}, cuda=True, max_workers=8)
    >>> to_config(recs)
    {'data': {'num_workers': 4, 'pin_memory': True}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BOTTLENECKS", "CONFIG_KEYS", "Bottleneck", "Recommendation", "name_bottleneck", "recommend",
           "to_config", "to_yaml"]

BOTTLENECKS = ("data", "compute", "memory", "transfer")
#: The config keys :func:`recommend` may set (``cli/config.py``'s schema has each; a test checks it).
CONFIG_KEYS = ("data.num_workers", "data.pin_memory", "data.batch_size", "trainer.precision")
LOW_GPU_UTIL = 0.5  # below this a compute-bound GPU is mostly idle: a larger batch feeds it better


@dataclass(frozen=True)
class Bottleneck:
    """One of :data:`BOTTLENECKS`, the numbers behind it (only those measured), and a one-line reason.

    ``memory`` says which memory ran short for a ``"memory"`` bottleneck: ``"device"`` or ``"host"``.
    """

    name: str
    numbers: dict[str, float]
    reason: str
    memory: str | None = None


@dataclass(frozen=True)
class Recommendation:
    """A value for one config key, and why."""

    value: Any
    reason: str


def _fraction(name: str, value: float | None) -> float | None:
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{name} is {value!r}; expected a fraction in [0, 1] or None.")
    return None if value is None else float(value)


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} is {value!r}; expected seconds >= 0.")
    return float(value)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def name_bottleneck(data_time: float, compute_time: float, transfer_time: float | None = None,
                    gpu_util: float | None = None, memory_fraction: float | None = None,
                    ram_fraction: float | None = None, mfu: float | None = None, *, share: float = 0.10,
                    memory_limit: float = 0.95, ram_limit: float = 0.90) -> Bottleneck:
    """Name the bottleneck of a measurement window.

    Args:
        data_time: seconds waiting for the loader.
        compute_time: seconds in the step (forward, backward, optimizer; the device copy included).
        transfer_time: seconds of host-to-device copies, a part of ``compute_time``; None: not measured.
        gpu_util: the share of time the GPU was busy (NVML), in [0, 1]; None on CPU.
        memory_fraction: peak device memory over the card's, in [0, 1]; None on CPU.
        ram_fraction: host RAM in use, in [0, 1]; None: not measured.
        mfu: model FLOP utilisation, in [0, 1], for the record; None: not measured.
        share: the share of step time from which data wait or copies are the bottleneck.
        memory_limit, ram_limit: device memory and host RAM fractions that count as memory pressure.

    Example:
        >>> name_bottleneck(0.1, 9.9, gpu_util=0.35).reason  # doctest: +ELLIPSIS
        'compute-bound: data wait 1% of step time; GPU busy only 35%: ...'
        >>> name_bottleneck(0.1, 9.9, memory_fraction=0.97).name
        'memory'
        >>> name_bottleneck(0.5, 9.5, transfer_time=3.0).name
        'transfer'
    """
    data, compute = _seconds("data_time", data_time), _seconds("compute_time", compute_time)
    step = data + compute
    if step <= 0:
        raise ValueError("data_time + compute_time is 0; measure over at least one batch.")
    numbers: dict[str, float] = {"data_time": data, "compute_time": compute, "data_share": data / step}
    if transfer_time is not None:
        if _seconds("transfer_time", transfer_time) > compute * (1 + 1e-9):
            raise ValueError(f"transfer_time is {transfer_time!r}, more than compute_time ({compute_time!r}); "
                             "the copy time is measured inside the compute span.")
        numbers.update(transfer_time=float(transfer_time), transfer_share=transfer_time / step)
    for name, value in (("gpu_util", gpu_util), ("memory_fraction", memory_fraction),
                        ("ram_fraction", ram_fraction), ("mfu", mfu)):
        if _fraction(name, value) is not None:
            numbers[name] = float(value)  # type: ignore[arg-type]
    shares = f"data wait {_pct(numbers['data_share'])}"
    if "transfer_share" in numbers:
        shares += f", copies {_pct(numbers['transfer_share'])}"
    shares += " of step time"
    if memory_fraction is not None and memory_fraction >= memory_limit:
        return Bottleneck("memory", numbers, f"memory pressure: device memory {_pct(memory_fraction)} used "
                                             f"(limit {_pct(memory_limit)}); {shares}", memory="device")
    if ram_fraction is not None and ram_fraction >= ram_limit:
        return Bottleneck("memory", numbers, f"memory pressure: host RAM {_pct(ram_fraction)} used "
                                             f"(limit {_pct(ram_limit)}); {shares}", memory="host")
    data_share, transfer_share = numbers["data_share"], numbers.get("transfer_share", 0.0)
    if max(data_share, transfer_share) >= share:
        name = "data" if data_share >= transfer_share else "transfer"
        return Bottleneck(name, numbers, f"{name}-bound: {shares} (from {_pct(share)} it is the bottleneck)")
    reason = f"compute-bound: {shares}"
    if gpu_util is not None:
        reason += (f"; GPU busy only {_pct(gpu_util)}: kernels too small or launched too slowly"
                   if gpu_util < LOW_GPU_UTIL else f"; GPU busy {_pct(gpu_util)}")
    if mfu is not None:
        reason += f"; model FLOP utilisation {mfu:.1%}"
    return Bottleneck("compute", numbers, reason)


def recommend(bottleneck: Bottleneck, current: Mapping[str, Any], *, cuda: bool = False,
              bf16_supported: bool = False, max_workers: int | None = None,
              tuned: Mapping[str, Any] | None = None) -> dict[str, Recommendation]:
    """Settings to change for the next run, keyed by :data:`CONFIG_KEYS`; only values that differ from ``current``.

    Args:
        bottleneck: what :func:`name_bottleneck` named.
        current: the run's values by config key (``{"data.num_workers": 2, "trainer.precision": "32", ...}``);
            a key left out is not recommended on (its current value is unknown).
        cuda: the run trains on a CUDA device (precision and pinned memory only help there).
        bf16_supported: the device computes in bfloat16 (Ampere or newer): bf16-mixed, else 16-mixed.
        max_workers: the most workers to recommend (twice the cores per process is the tuner's ceiling).
        tuned: the loader tuner's settled settings (``trainer.loader_settings``): measured, so they win.

    Example:
        >>> b = name_bottleneck(0.1, 9.9, gpu_util=0.3, memory_fraction=0.2)
        >>> recs = recommend(b, {"data.batch_size": 64, "trainer.precision": "32"}, cuda=True, bf16_supported=True)
        >>> {key: r.value for key, r in recs.items()}
        {'trainer.precision': 'bf16-mixed', 'data.batch_size': 128}
    """
    if bottleneck.name not in BOTTLENECKS:
        raise ValueError(f"bottleneck.name is {bottleneck.name!r}; expected one of {', '.join(BOTTLENECKS)}.")
    out: dict[str, Recommendation] = {}
    n = bottleneck.numbers

    def propose(key: str, value: Any, reason: str) -> None:
        if key in current and current[key] != value and key not in out:
            out[key] = Recommendation(value, reason)

    if tuned is not None and tuned.get("num_workers") is not None:
        propose("data.num_workers", int(tuned["num_workers"]), "measured by the loader tuner in this run")
    workers, batch = current.get("data.num_workers"), current.get("data.batch_size")
    if bottleneck.name == "data" and isinstance(workers, int):
        more = max(2 * workers, 1) if max_workers is None else min(max(2 * workers, 1), max_workers)
        if more > workers:
            propose("data.num_workers", more, f"data wait is {_pct(n['data_share'])} of step time: more "
                                              "loader workers (or trainer.auto_num_workers to tune them)")
    if cuda and bottleneck.name in ("data", "transfer"):
        propose("data.pin_memory", True, "pinned host memory makes host-to-device copies faster and asynchronous")
    if cuda and bottleneck.name in ("compute", "memory") and current.get("trainer.precision") == "32":
        precision = "bf16-mixed" if bf16_supported else "16-mixed"
        propose("trainer.precision", precision, f"{precision} runs matrix math on tensor cores and halves "
                                                "activation memory")
    if bottleneck.name == "compute" and isinstance(batch, int) and n.get("gpu_util", 1.0) < LOW_GPU_UTIL \
            and n.get("memory_fraction", 1.0) < 0.5:
        propose("data.batch_size", 2 * batch, f"the GPU is busy only {_pct(n['gpu_util'])} with "
                                              f"{_pct(n['memory_fraction'])} of its memory: a larger batch feeds "
                                              "it better (scale the learning rate with it)")
    if bottleneck.memory == "device" and isinstance(batch, int) and batch > 1:
        propose("data.batch_size", batch // 2, f"device memory is {_pct(n['memory_fraction'])} used: a smaller "
                                               "batch leaves headroom (or keep it with accumulate_grad_batches=2)")
    if bottleneck.memory == "host" and isinstance(workers, int) and workers > 0:
        propose("data.num_workers", workers // 2, f"host RAM is {_pct(n['ram_fraction'])} used: each loader "
                                                  "worker holds its own copy of what it touches")
    return out


def to_config(recommendations: Mapping[str, Recommendation]) -> dict[str, dict[str, Any]]:
    """Nest ``{"data.num_workers": r}`` as ``{"data": {"num_workers": r.value}}``, the YAML file's shape.

    Example:
        >>> to_config({"trainer.precision": Recommendation("bf16-mixed", "tensor cores")})
        {'trainer': {'precision': 'bf16-mixed'}}
    """
    nested: dict[str, dict[str, Any]] = {}
    for key, rec in recommendations.items():
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise ValueError(f"recommendation key {key!r}; expected section.name, e.g. data.num_workers.")
        nested.setdefault(section, {})[name] = rec.value
    return nested


def _scalar(value: Any) -> str:
    """A YAML scalar: booleans and numbers as YAML writes them, strings JSON-quoted (valid YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def to_yaml(recommendations: Mapping[str, Recommendation], header: str | None = None) -> str:
    """The ``resources.yaml`` snippet: the nested keys, each with its reason as a comment above it.

    Example:
        >>> print(to_yaml({"data.num_workers": Recommendation(4, "data wait is 40% of step time")},
        ...               header="adaptrain ResourceMonitor"), end="")
        # adaptrain ResourceMonitor
        data:
          # data wait is 40% of step time
          num_workers: 4
    """
    lines = [f"# {line}" for line in (header or "").splitlines()]
    if not recommendations:
        lines.append("{}  # nothing to change")
    for section, values in to_config(recommendations).items():
        lines.append(f"{section}:")
        for name, value in values.items():
            reason = recommendations[f"{section}.{name}"].reason
            lines += [f"  # {part}" for part in reason.splitlines()] + [f"  {name}: {_scalar(value)}"]
    return "\n".join(lines) + "\n"
