"""MLflowLogger: params, per-step and per-epoch metrics, system metrics and artifacts to MLflow.

``mlflow`` is imported only when a logger is created (it is slow to import and an optional extra:
``pip install 'adaptrain[mlflow]'``). The client API is used throughout (never ``mlflow.start_run``),
so the logger does not touch MLflow's global active run, which the user's own code may use.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptrain.errors import MissingExtraError
from adaptrain.loggers.base import Logger, RunInfo, best_checkpoint

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_KEY = 250
_BATCH = 100  # params per log_batch request (MLflow's limit)
_NOISY = ("mlflow.store.db.utils", "alembic")
_MB = 1024 * 1024


def _require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError as error:
        raise MissingExtraError("mlflow", "mlflow", "MLflowLogger") from error


class MLflowLogger(Logger):
    """Records the run in MLflow: params (the flattened resolved config), ``train_*_step`` metrics
    at every refresh point, the epoch's history record per epoch, system metrics at each epoch's
    end (CPU, memory, disk, network, GPU memory, under MLflow's own ``system/`` names; needs
    ``psutil``, skipped with a warning without it), and at the end the run folder's config, history,
    plot and log, plus the best checkpoint under ``checkpoints/``.

    The run opens at the first optimizer step (a fit that fails before leaves no FAILED run) and
    its id is stored in the run folder (``mlflow.json``): a ``fit`` resumed from a checkpoint into
    the same folder continues that MLflow run (same id, status back to RUNNING; params it already
    has keep their first value, the changed ones are listed in the tag
    ``adaptrain.resume_changed_params``) instead of opening a second one.

    An observer: changes nothing. Rank zero only.

    Args:
        tracking_uri: where runs go. Default: ``$MLFLOW_TRACKING_URI``, else a local store in the
            run root, ``sqlite:///<root_dir>/mlflow.db`` (browse it with
            ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``).
        experiment: MLflow experiment name; default the config's ``experiment``.
        run_name: default the run folder's name.
        artifact_location: for a new experiment; default ``<db folder>/mlartifacts`` for a local
            sqlite store (never the current directory), the server's default otherwise.
        tags: extra run tags.
        log_system_metrics: record system metrics at each epoch's end, in the loop's thread (one
            psutil read, about a millisecond), at ``step = epoch``. Not MLflow's sampling thread:
            its first sample comes only after its interval, so short runs had none, at random.
        log_artifacts: upload the run folder's files and the best checkpoint at the end.
        flush_every_s: per-step metrics are buffered and sent at most this often (and at every
            epoch end), so logging costs one request per interval, not per step.

    Example:
        >>> logger = MLflowLogger(tracking_uri="sqlite:///runs/mlflow.db")  # doctest: +SKIP
        >>> Trainer(model, optimizer, criterion, callbacks=[logger]).fit(train_loader)  # doctest: +SKIP
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 run_name: str | None = None, artifact_location: str | None = None,
                 tags: Mapping[str, str] | None = None, log_system_metrics: bool = True,
                 log_artifacts: bool = True, flush_every_s: float = 5.0) -> None:
        super().__init__()
        _require_mlflow()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_location = artifact_location
        self.tags = dict(tags or {})
        self.log_system_metrics = log_system_metrics
        self.log_artifacts = log_artifacts
        self.flush_every_s = flush_every_s
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._buffer: list[Any] = []
        self._last_flush = 0.0
        self._system: SystemMetrics | None = None

    def resolved_tracking_uri(self, run: RunInfo) -> str:
        """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root_dir>/mlflow.db``."""
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        root = Path(run.root_dir).resolve()
        return f"sqlite:///{root / 'mlflow.db'}"

    # ------------------------------------------------------------------ lifecycle
    def _start(self, trainer: Trainer) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        run = self.run or RunInfo()
        for name in _NOISY:  # table creation and monitor start-up log at INFO on every run
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = self.resolved_tracking_uri(run)
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        self.experiment_id = self._experiment_id(self.experiment or run.experiment, uri)
        tags = {"adaptrain.verb": run.verb, **self.tags}
        if run.run_dir is not None:
            tags["adaptrain.run_dir"] = str(run.run_dir.path.resolve())
        values = {key[:_MAX_KEY]: _param_value(value) for key, value in run.params.items()}
        continued = self._stored_run_id(run, uri) if self.resuming else None
        if continued is not None:
            self.run_id = continued
            self.client.update_run(continued, status="RUNNING")
            had = self.client.get_run(continued).data.params  # MLflow refuses to change a param's value
            changed = {key: value for key, value in values.items() if key in had and had[key] != value}
            values = {key: value for key, value in values.items() if key not in had}
            self.client.set_tag(continued, "adaptrain.resumed_at_step", str(self.resumed_at[1]))  # type: ignore[index]
            if changed:
                self.client.set_tag(continued, "adaptrain.resume_changed_params", json.dumps(changed)[:5000])
        else:
            created = self.client.create_run(self.experiment_id, run_name=self.run_name or run.run_name, tags=tags)
            self.run_id = created.info.run_id
        params = [Param(key, value) for key, value in values.items()]
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _BATCH])
        self._store_run_id(run, uri)
        self._last_flush = time.monotonic()
        self._system = self._start_system_metrics(run) if self.log_system_metrics else None

    def _stored_run_id(self, run: RunInfo, uri: str) -> str | None:
        """The run id ``mlflow.json`` holds, if it is a live run of this store (else a new run opens)."""
        if run.run_dir is None or not run.run_dir.mlflow.is_file():
            return None
        try:
            stored = json.loads(run.run_dir.mlflow.read_text())
            if stored.get("tracking_uri") != uri:
                warnings.warn(f"MLflowLogger: {run.run_dir.mlflow} names a run in {stored.get('tracking_uri')}, "
                              f"not in {uri}; the resumed fit opens a new MLflow run.", RuntimeWarning, stacklevel=2)
                return None
            found = self.client.get_run(stored["run_id"])
        except Exception as error:  # noqa: BLE001 - unreadable or gone from the store: record a new run
            warnings.warn(f"MLflowLogger: cannot continue the run {run.run_dir.mlflow} names "
                          f"({type(error).__name__}: {error}); the resumed fit opens a new MLflow run.",
                          RuntimeWarning, stacklevel=2)
            return None
        if found.info.lifecycle_stage == "deleted":
            return None
        self.experiment_id = found.info.experiment_id
        return found.info.run_id

    def _store_run_id(self, run: RunInfo, uri: str) -> None:
        """Write ``mlflow.json`` into the run folder (when there is one), atomically."""
        if run.run_dir is None or not run.run_dir.path.is_dir():
            return
        target = run.run_dir.mlflow
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"tracking_uri": uri, "experiment_id": self.experiment_id,
                                   "run_id": self.run_id}, indent=1) + "\n")
        os.replace(tmp, target)

    def _experiment_id(self, name: str, uri: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = self.artifact_location
            if location is None and uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # another process created it in between
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _start_system_metrics(self, run: RunInfo) -> SystemMetrics | None:
        try:
            return SystemMetrics(run.run_dir.path if run.run_dir is not None else Path(run.root_dir))
        except Exception as error:  # noqa: BLE001 - system metrics are a bonus, never a failure
            warnings.warn(f"MLflowLogger: system metrics are off ({type(error).__name__}: {error}); "
                          "they need psutil (pip install psutil).", RuntimeWarning, stacklevel=2)
            return None

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(key[:_MAX_KEY], value, now, step) for key, value in metrics.items())
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self._flush()

    def after_epoch(self, trainer: Trainer) -> None:
        super().after_epoch(trainer)
        if self._system is not None and self.run_id is not None:
            self._log_metrics(self._system.sample(), trainer.state.epoch)
        self._flush()

    def _flush(self) -> None:
        if self._buffer and self.run_id is not None:
            for start in range(0, len(self._buffer), 1000):  # MLflow's limit per request
                self.client.log_batch(self.run_id, metrics=self._buffer[start:start + 1000])
        self._buffer = []
        self._last_flush = time.monotonic()

    def _finish(self, status: str) -> None:
        try:
            self._flush()
            if self.log_artifacts:
                self._upload()
        finally:
            self._system = None
            self.client.set_terminated(self.run_id, status)

    def _upload(self) -> None:
        run = self.run
        if run is not None and run.run_dir is not None:
            for path in run.run_dir.artifacts():
                self.client.log_artifact(self.run_id, str(path))
        checkpoint = best_checkpoint(self.trainer) if self.trainer is not None else None
        if checkpoint is not None:
            self.client.log_artifact(self.run_id, str(checkpoint), artifact_path="checkpoints")


class SystemMetrics:
    """CPU, memory, disk, network and GPU-memory figures read with psutil (and torch.cuda) when asked.

    Named as MLflow's own monitor names them (``system/cpu_utilization_percentage``, ...), so its
    UI shows them under "System metrics". CPU utilization and network traffic are since the
    previous sample (the first: since this object was made). Each figure a platform cannot give
    is left out; psutil itself missing raises ImportError here, in ``__init__``.

    Example:
        >>> sample = SystemMetrics(Path(".")).sample()
        >>> 0 <= sample["system/cpu_utilization_percentage"] <= 100
        True
    """

    def __init__(self, disk_path: Path) -> None:
        import psutil

        self.psutil, self.disk_path = psutil, disk_path
        self._cpu = psutil.cpu_times()
        self._net = _read(psutil.net_io_counters)

    def sample(self) -> dict[str, float]:
        """The figures now, as ``{"system/<name>": value}`` (megabytes, percentages)."""
        ps, values = self.psutil, {}
        cpu = ps.cpu_times()
        total = _busy_and_idle(cpu) - _busy_and_idle(self._cpu)
        idle = sum(getattr(cpu, f, 0.0) - getattr(self._cpu, f, 0.0) for f in ("idle", "iowait"))
        busy = 100.0 * (1 - idle / total) if total > 0 else 0.0
        values["system/cpu_utilization_percentage"] = min(100.0, max(0.0, busy))
        self._cpu = cpu
        memory = _read(ps.virtual_memory)
        if memory is not None:
            values["system/system_memory_usage_megabytes"] = (memory.total - memory.available) / _MB
            values["system/system_memory_usage_percentage"] = float(memory.percent)
        process = _read(lambda: ps.Process().memory_info())
        if process is not None:
            values["system/process_memory_rss_megabytes"] = process.rss / _MB
        folder = self.disk_path if self.disk_path.exists() else Path(self.disk_path.anchor or ".")
        disk = _read(lambda: ps.disk_usage(str(folder)))
        if disk is not None:
            values.update({"system/disk_usage_percentage": float(disk.percent),
                           "system/disk_usage_megabytes": disk.used / _MB,
                           "system/disk_available_megabytes": disk.free / _MB})
        net = _read(ps.net_io_counters)
        if net is not None and self._net is not None:
            values["system/network_receive_megabytes"] = (net.bytes_recv - self._net.bytes_recv) / _MB
            values["system/network_transmit_megabytes"] = (net.bytes_sent - self._net.bytes_sent) / _MB
        self._net = net
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initializes CUDA itself
            for index in range(torch.cuda.device_count()):
                values[f"system/gpu_{index}_memory_usage_megabytes"] = torch.cuda.memory_reserved(index) / _MB
        return values


def _busy_and_idle(times: Any) -> float:
    """All CPU time; Linux counts guest time inside user and nice already, so it is not added twice."""
    return sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def _read(read: Any) -> Any:
    try:
        return read()
    except Exception:  # noqa: BLE001 - a figure this platform or container does not give
        return None


def _param_value(value: Any) -> str:
    """Strings as they are, everything else as JSON (null, true, 0.001, [64, 32])."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_VALUE else text[:_MAX_PARAM_VALUE - 3] + "..."
