"""TensorBoardLogger: scalars per refresh step and per epoch, and the run's hyperparameters.

``tensorboard`` is an optional extra (``pip install 'adaptrain[tensorboard]'``), imported only
when a logger is created.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptrain.errors import MissingExtraError
from adaptrain.loggers.base import Logger, RunInfo, numeric

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401 - torch.utils.tensorboard needs it
    except ImportError as error:
        raise MissingExtraError("tensorboard", "tensorboard", "TensorBoardLogger") from error


class TensorBoardLogger(Logger):
    """Writes event files: ``train_*_step`` / ``lr_step`` scalars at every refresh point (x axis:
    optimizer step), the epoch's history record per epoch (x axis: epoch), and at the end the
    hyperparameters (the flattened config) with the last epoch's metrics for the HParams tab.

    The hparams summaries go into the same event file as the scalars (``add_hparams`` would open
    a second run folder per call), so one run shows as one row in TensorBoard.

    An observer: changes nothing. Rank zero only.

    Args:
        log_dir: default ``<run folder>/tensorboard``; view with ``tensorboard --logdir runs``.
        flush_secs: how often the writer flushes on its own (it also flushes every epoch).
        log_hparams: write the hyperparameters at the end of the run.

    Example:
        >>> logger = TensorBoardLogger(log_dir="runs/tb/demo")  # doctest: +SKIP
        >>> Trainer(model, optimizer, criterion, callbacks=[logger]).fit(train_loader)  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | Path | None = None, flush_secs: int = 10, log_hparams: bool = True) -> None:
        super().__init__()
        _require_tensorboard()
        self.log_dir = Path(log_dir) if log_dir is not None else None  # where it writes, once started
        self._given_log_dir = self.log_dir
        self.flush_secs = flush_secs
        self.log_hparams = log_hparams
        self.writer: Any = None

    @property
    def needs_run_dir(self) -> bool:
        return self._given_log_dir is None  # its event files go into the run folder's tensorboard/

    def _start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        run = self.run or RunInfo()
        log_dir = self._given_log_dir or (run.run_dir.tensorboard if run.run_dir is not None
                                   else Path(run.root_dir) / run.experiment / (run.run_name or "run") / "tensorboard")
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self.flush_secs)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def after_epoch(self, trainer: Trainer) -> None:
        super().after_epoch(trainer)
        if self.writer is not None:
            self.writer.flush()

    def _finish(self, status: str) -> None:
        try:
            if self.log_hparams and self.run is not None:
                self._write_hparams()
        finally:
            self.writer.close()

    def _write_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        hparam_dict = {key: _hparam_value(value) for key, value in self.run.params.items()}  # type: ignore[union-attr]
        history = self.trainer.state.history if self.trainer is not None else None
        last = numeric(history.records[-1]) if history is not None and history.records else {}
        # Metrics named like existing scalar tags: the HParams tab then shows their last values.
        metric_dict = {k: v for k, v in last.items() if k.startswith(("train_", "val_"))}
        for summary in hparams(hparam_dict, metric_dict):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


def _hparam_value(value: Any) -> Any:
    """TensorBoard takes numbers, strings and bools; anything else is shown as its text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)
