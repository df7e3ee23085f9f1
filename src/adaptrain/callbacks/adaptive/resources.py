"""ResourceMonitor: where a training step's time goes, what limits it, and which settings to change.

Every ``every_n_steps`` train batches the monitor closes a measurement window: the loop's data wait
and compute time over it (deltas of ``state.data_time`` / ``state.compute_time``), samples/s, CPU
and RAM (:class:`~adaptrain.callbacks.adaptive.sampling.HostReader`) and, on CUDA only, GPU
utilisation and memory (NVML), the time of a host-to-device copy of the batch and the model FLOP
utilisation. At each epoch end the windows are summed up, the bottleneck is named
(:func:`~adaptrain.tuning.bottleneck.name_bottleneck`) with the numbers behind it, and a short
block with the recommendations (:func:`~adaptrain.tuning.bottleneck.recommend`) and the tuner's
adjustments is printed. At the end of ``fit`` the whole run is judged the same way and the
recommendations are written to ``resources.yaml`` in the run folder, keyed like a run config, so
``adaptrain fit --config run.yaml --config resources.yaml`` runs as it is.

An observer: it changes nothing in training. What it costs: a few psutil reads per window (well
under a millisecond), on CUDA two device synchronisations and a second copy of one batch.

Example:
    >>> import torch, torch.nn as nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from adaptrain import ResourceMonitor, Trainer
    >>> monitor = ResourceMonitor(every_n_steps=4, summary=False)
    >>> model = nn.Linear(4, 1)
    >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
    ...                   callbacks=[monitor], progress=False)
    >>> _ = trainer.fit(DataLoader(TensorDataset(torch.randn(64, 4), torch.randn(64, 1)), batch_size=8))
    >>> monitor.bottleneck in ("data", "compute", "memory", "transfer"), "gpu_util" in monitor.summary
    (True, False)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from adaptrain.callbacks.adaptive.sampling import (
    GpuReader,
    HostReader,
    copy_seconds,
    format_block,
    metric_values,
    record_values,
    summarize,
    verdict,
)
from adaptrain.core.batching import split_micro_batches, to_device, unpack_batch
from adaptrain.core.callback import Callback
from adaptrain.core.loader_autotune import LoaderAutotune
from adaptrain.data.loaders import loader_batch_size
from adaptrain.profiling.bench import peak_flops
from adaptrain.profiling.measure import count_flops
from adaptrain.tuning.bottleneck import Bottleneck, Recommendation, recommend, to_yaml

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["RESOURCES_FILE", "ResourceMonitor", "format_block"]

#: The run folder's file of recommendations (``RunDir.resources`` names the same; a test checks it).
RESOURCES_FILE = "resources.yaml"

#: The data section's loader options (cli.instantiate applies them only to data sets it wraps).
_LOADER_OPTIONS = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "prefetch_factor",
                   "persistent_workers")


def _positive(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"ResourceMonitor({name}={value!r}): expected a number > 0, or None.")
    return float(value)


class ResourceMonitor(Callback):
    """Measures CPU, RAM, GPU and data-vs-compute time every ``every_n_steps`` batches, names the
    bottleneck and recommends settings (printed per epoch, ``resources.yaml`` at the end).

    Args:
        every_n_steps: train batches between measurements (as ``log_every_n_steps`` counts them).
        flops_per_sample: training FLOPs of one sample (forward and backward), for the model FLOP
            utilisation on CUDA. None: counted once on CUDA with ``adaptrain.profile``'s counter
            (``profiling.measure.count_flops``) on one sample of the first measured batch.
        peak_flops: the device's peak FLOP/s for the run's precision. None: from the bench's table
            (``adaptrain.profiling.bench.peak_flops``; a GPU it does not know gets no MFU).
            MFU is reported only when the run trains on CUDA.
        summary: print the block at the end of each epoch (through ``trainer.print``).

    After ``fit``: :attr:`bottleneck` (one of ``"data"``, ``"compute"``, ``"memory"``, ``"transfer"``),
    :attr:`verdict` (the numbers and the reason), :attr:`summary` (the run's figures), :attr:`epochs`
    (each epoch's), :attr:`recommendations`, :attr:`yaml` (the snippet) and :attr:`path` (where it
    was written; None without a run folder).
    """

    order = 85  # after the callbacks that change training; before the loggers (MLflow uploads the file)

    def __init__(self, every_n_steps: int = 50, flops_per_sample: float | None = None,
                 peak_flops: float | None = None, summary: bool = True) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"ResourceMonitor(every_n_steps={every_n_steps!r}): expected an integer >= 1.")
        if not isinstance(summary, bool):
            raise ValueError(f"ResourceMonitor(summary={summary!r}): expected true or false.")
        self.every_n_steps = every_n_steps
        self.flops_per_sample = _positive("flops_per_sample", flops_per_sample)
        self.peak_flops = _positive("peak_flops", peak_flops)
        self.print_summary = summary
        self.verdict: Bottleneck | None = None
        self.summary: dict[str, float] = {}
        self.epochs: list[dict[str, float]] = []
        self.recommendations: dict[str, Recommendation] = {}
        self.yaml: str | None = None
        self.path: Path | None = None
        self._host: HostReader | None = None
        self._gpu: GpuReader | None = None
        self._windows: list[dict[str, float]] = []  # the running epoch's
        self._run_windows: list[dict[str, float]] = []
        self._mark: dict[str, float] = {}
        self._epoch_verdict: Bottleneck | None = None
        self._adaptations_seen = 0

    @property
    def bottleneck(self) -> str | None:
        """The run's bottleneck after ``fit`` (None before, or when no batch was timed)."""
        return self.verdict.name if self.verdict is not None else None

    # ------------------------------------------------------------------ events
    def before_fit(self, trainer: Trainer) -> None:
        self.verdict, self.summary, self.epochs, self._run_windows = None, {}, [], []
        self.recommendations, self.yaml, self.path = {}, None, None
        self._host = HostReader()
        self._gpu = GpuReader(trainer.device) if trainer.device.type == "cuda" else None
        self._adaptations_seen = len(getattr(trainer.state.history, "adaptations", ()))

    def before_train(self, trainer: Trainer) -> None:
        self._windows, self._epoch_verdict = [], None
        self._set_mark(trainer, time.perf_counter(), data=0.0, compute=0.0)  # the loop zeroes both now
        if self._host is not None:
            self._host.start()

    def after_batch(self, trainer: Trainer) -> None:
        if trainer.state.batch_idx % self.every_n_steps == 0:
            self._sample(trainer)

    def after_train(self, trainer: Trainer) -> None:
        state = trainer.state
        if state.batch_idx > self._mark.get("batches", 0):
            self._sample(trainer)  # the batches since the last window: the epoch's windows sum to its totals
        elif self._windows:  # the last batch's compute is counted after its after_batch: fold it in
            self._windows[-1]["compute_time"] += state.compute_time - self._mark["compute"]
            self._windows[-1]["data_time"] += state.data_time - self._mark["data"]
        epoch = summarize(self._windows)
        self._epoch_verdict = verdict(epoch)
        if self._epoch_verdict is None:
            return
        self.epochs.append(epoch)
        trainer.state.epoch_logs.update(record_values(epoch))  # the history's columns (CSV, every logger)

    def after_epoch(self, trainer: Trainer) -> None:
        if self._epoch_verdict is None or not self.print_summary:
            return
        adaptations = list(getattr(trainer.state.history, "adaptations", ()))
        new, self._adaptations_seen = adaptations[self._adaptations_seen:], len(adaptations)
        recs = self._recommend(trainer, self._epoch_verdict)
        _print(trainer, format_block(f"resources, epoch {trainer.state.epoch}/{trainer.state.max_epochs}",
                                     self.epochs[-1], self._epoch_verdict, recs, new))

    def after_fit(self, trainer: Trainer) -> None:
        self._close()
        self.summary = summarize(self._run_windows)
        self.verdict = verdict(self.summary)
        if self.verdict is None:
            return
        self.recommendations = self._recommend(trainer, self.verdict)
        self.yaml = to_yaml(self.recommendations, header=f"adaptrain ResourceMonitor: {self.verdict.reason}\n"
                                                         "merge with: adaptrain fit --config <run.yaml> "
                                                         "--config resources.yaml")
        folder = run_folder(trainer)
        if folder is not None and trainer.is_global_zero:
            self.path = _write_atomic(folder / RESOURCES_FILE, self.yaml)
        if self.print_summary:
            where = f"; recommendations in {self.path}" if self.path is not None else ""
            _print(trainer, f"resources: {self.verdict.name} is the bottleneck of the run{where}")

    def exception(self, trainer: Trainer) -> None:
        self._close()

    # ------------------------------------------------------------------ measuring
    def _set_mark(self, trainer: Trainer, now: float, data: float, compute: float) -> None:
        state = trainer.state
        self._mark = {"time": now, "data": data, "compute": compute, "samples": state.samples_seen,
                      "batches": state.batch_idx}

    def _sample(self, trainer: Trainer) -> None:
        state, mark, now = trainer.state, self._mark, time.perf_counter()
        window = {"data_time": state.data_time - mark["data"], "compute_time": state.compute_time - mark["compute"],
                  "seconds": now - mark["time"], "samples": state.samples_seen - mark["samples"],
                  "batches": state.batch_idx - mark["batches"]}
        if self._host is not None:
            window.update(self._host.read(workers=bool(trainer.loader_settings.get("num_workers"))))
        if self._gpu is not None:
            window.update(self._gpu.read())
            if state.batch is not None:  # the copy runs inside the compute span: never more than it
                window["transfer_time"] = min(copy_seconds(state.batch, trainer.device) * window["batches"],
                                              window["compute_time"])
            if self.flops_per_sample is None and state.batch is not None:
                self._count_flops(trainer)
            if self.flops_per_sample and self.peak_flops and window["seconds"] > 0:
                window["mfu"] = self.flops_per_sample * window["samples"] / window["seconds"] / self.peak_flops
        self._windows.append(window)
        self._run_windows.append(window)
        trainer.log_metrics(metric_values(summarize([window]), suffix="_step"))
        self._set_mark(trainer, now, state.data_time, state.compute_time)

    def _count_flops(self, trainer: Trainer) -> None:
        """On CUDA, once: the training FLOPs of one sample (``adaptrain.profile``'s counter, on one sample of
        the current batch) and the device's peak for the run's precision (the bench's table; None for a
        GPU it does not know: then no MFU)."""
        self.flops_per_sample = 0.0  # counted once, whatever happens
        try:
            inputs, targets = unpack_batch(trainer.state.batch, "train_loader")
            one = to_device(split_micro_batches(inputs, targets, 1)[0][0], trainer.device)  # one sample
            counted = count_flops(trainer.model, one).train
        except Exception:  # noqa: BLE001 - a model the counter cannot trace gets no MFU, the run goes on
            return
        self.flops_per_sample = float(counted or 0)
        if self.peak_flops is None:
            self.peak_flops = peak_flops(torch.cuda.get_device_name(trainer.device), trainer.precision_name)

    def _recommend(self, trainer: Trainer, found: Bottleneck) -> dict[str, Recommendation]:
        cuda = trainer.device.type == "cuda"
        tuned = any(isinstance(cb, LoaderAutotune) for cb in trainer.callbacks.callbacks)
        return recommend(found, current_settings(trainer), cuda=cuda,
                         bf16_supported=cuda and _bf16_supported(), max_workers=_max_workers(),
                         tuned=trainer.loader_settings if tuned else None)

    def _close(self) -> None:
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None

    def __repr__(self) -> str:
        return f"ResourceMonitor(every_n_steps={self.every_n_steps})"


# ---------------------------------------------------------------------- what the run is
def run_config(trainer: Trainer) -> Mapping[str, Any] | None:
    """The flattened config of a CLI run (what it bound to the loggers), or None outside the CLI."""
    for callback in trainer.callbacks.callbacks:
        params = getattr(getattr(callback, "run", None), "params", None)
        if isinstance(params, Mapping) and "data.class_path" in params:
            return params
    return None


def current_settings(trainer: Trainer) -> dict[str, Any]:
    """The run's values of the keys :func:`~adaptrain.tuning.bottleneck.recommend` may change.

    The ``data.*`` keys are left out for a CLI run whose config sets no loader option: its data
    factory may return its own loaders, and the CLI refuses ``data.num_workers`` for those (the
    snippet must merge as it is).
    """
    current: dict[str, Any] = {"trainer.precision": trainer.precision_name}
    config = run_config(trainer)
    if config is not None and all(config.get(f"data.{name}") is None for name in _LOADER_OPTIONS):
        return current
    settings = trainer.loader_settings
    if settings:
        current.update({"data.num_workers": settings["num_workers"], "data.pin_memory": settings["pin_memory"]})
    batch = trainer.batch_size if trainer.batch_size is not None else loader_batch_size(trainer.state.train_loader)
    if batch is not None:
        current["data.batch_size"] = batch
    return current


def run_folder(trainer: Trainer) -> Path | None:
    """``trainer.run_dir`` if set, else the run folder the loggers record into (None: no folder)."""
    path = getattr(trainer, "run_dir", None)
    if path is not None:
        return Path(path)
    for callback in trainer.callbacks.callbacks:
        folder = getattr(getattr(callback, "run", None), "run_dir", None)
        if folder is not None:
            return Path(getattr(folder, "path", folder))
    return None


def _max_workers() -> int:
    """Twice the cores this process may use (its share among the machine's ranks): the tuner's ceiling."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 * max(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1), 1)


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


def _print(trainer: Trainer, text: str) -> None:
    from rich.text import Text  # a Text is printed as it is: the reasons' brackets are not console markup

    trainer.print(Text(text))


def _write_atomic(path: Path, text: str) -> Path:
    """Write through a temporary file and a rename: a reader never sees half a snippet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path

