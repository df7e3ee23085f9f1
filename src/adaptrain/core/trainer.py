"""Trainer: its arguments, and fit / validate / test / predict. The loop itself is in :mod:`adaptrain.core.loop`."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable, Mapping

import torch

from adaptrain.core import parallel
from adaptrain.core.autotune import AutoTune, TuneReport, tune
from adaptrain.core.batch_options import AdaptiveBatchSize
from adaptrain.core.batch_sizing import BatchSizing
from adaptrain.core.callback import Callback, CallbackList
from adaptrain.core.events import Event
from adaptrain.core.history import History
from adaptrain.core.loader_autotune import LoaderAutotune
from adaptrain.core.loop import TrainingLoop
from adaptrain.core.losses import as_criterion
from adaptrain.core.lr_finder import LRFinderResult, lr_find
from adaptrain.core.memory_format import ChannelsLast
from adaptrain.core.metrics import MetricSet, RunningSums
from adaptrain.core.precision import Precision, resolve_precision
from adaptrain.core.preflight import (
    check_loader,
    check_objects,
    check_optimizer_covers,
    preflight,
    resolve_device,
)
from adaptrain.core.progress import ProgressBar
from adaptrain.core.resume import apply_checkpoint, read_checkpoint
from adaptrain.core.scheduling import LRSchedule
from adaptrain.core.settings import check_trainer_settings
from adaptrain.core.state import TrainState, seed_everything
from adaptrain.data.loaders import LoaderSpec, loader_length, loader_settings
from adaptrain.distributed import env as distributed
from adaptrain.errors import ConfigError


class Trainer(TrainingLoop):
    """Trains any ``nn.Module``: one loop, extended by callbacks.

    Args:
        model: the module to train; moved to ``device``.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters.
        criterion: ``fn(outputs, targets) -> loss`` (a tensor, or a dict with ``"loss"`` and parts),
            or a dict/list of per-output losses (see :class:`~adaptrain.MultiLoss` for weights).
        metrics: name -> torchmetrics ``Metric`` or callable ``fn(outputs, targets)``; or output key ->
            {name: metric} for one output of a multi-output model.
        scheduler: an LR scheduler; a factory ``f(optimizer, total_steps=...)`` (e.g.
            ``functools.partial(OneCycleLR, max_lr=0.1)``: total steps are filled in from the loader
            length, epochs and accumulation); or a dict ``{"scheduler": ..., "interval": "step"|"epoch",
            "monitor": "val_loss"}``. OneCycleLR/CyclicLR step per optimizer step, others per epoch;
            ReduceLROnPlateau is fed its monitored value.
        precision: ``"32"``, ``"16-mixed"`` (autocast + GradScaler) or ``"bf16-mixed"``, or a
            :class:`~adaptrain.core.precision.Precision` plugin instance.
        accumulate_grad_batches: optimizer step every N batches, with gradients equal to one batch
            N times larger (each batch weighted by its size, so a short last window is exact too).
        max_epochs: epochs to train.
        callbacks: extra :class:`~adaptrain.Callback` objects.
        device: ``"auto"`` (``cuda:LOCAL_RANK``, then MPS, then CPU), or any ``torch.device`` string.
        gradient_clip_val: clip the gradient norm to this value (after unscaling).
        seed: seeds python, numpy and torch at ``fit``: two CPU runs are then bit-identical.
        nan_policy: ``"raise"`` stops at the next sync point with the epoch and batch where the
            loss first became NaN/Inf (steps taken in between already changed the weights; resume
            from a checkpoint); ``"skip"`` skips such batches and counts them (one sync per batch).
        compile: wrap the model's forward in ``torch.compile``.
        progress: show the progress bar (plain lines when stdout is not a terminal).
        log_every_n_steps: batches between reads of running loss and metrics (host-device syncs).
        fast_dev_run: a dry run: ``True`` or N trains one epoch of N (1) train batches and validates
            N val batches, every callback included, to check a setup end to end in seconds.
        adaptive_batch_size: ``"safe"`` (shrink the train batch until it fits in memory), ``"full"``
            (grow it while samples/s improves; LR rescaled), or an :class:`~adaptrain.AdaptiveBatchSize`
            with the other options. Searched once at the start of ``fit`` by real, undone training steps.
        micro_batch_size: split each batch into micro-batches of this many samples (gradients equal
            the whole batch's); ``"auto"``: the largest that fits. With either adaptive setting, an
            out-of-memory error mid-run halves the micro-batch and redoes the same step.
        strategy: on several processes (under ``torchrun``): ``"ddp"``, ``"fsdp"`` (FSDP2,
            ``fully_shard``), or ``"auto"`` (DDP when the world size is > 1, nothing otherwise).
        auto_num_workers: tune the train loader's ``num_workers`` / ``prefetch_factor`` by
            measurement at the start of ``fit`` and apply them to this run (``trainer.loader_settings``).
        auto: set nothing else: at the start of ``fit``, measure short real trials over precision,
            channels-last, batch size (LR rescaled), micro-batch, loader workers/prefetch/pinning and
            ``torch.compile`` within 5% of the expected run, apply the fastest and record why
            (:meth:`tune` does the same search without applying it). A run too short for that search
            still gets its loader workers tuned as ``auto_num_workers`` does (trials that train).
        channels_last: keep weights and 4-D inputs in channels-last (NHWC) format, which 2-D
            convolutions often run faster on.

    Example:
        >>> import torch, torch.nn as nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
        >>> model = nn.Linear(4, 1)
        >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(),
        ...                   max_epochs=2, progress=False, seed=0)
        >>> history = trainer.fit(DataLoader(data, batch_size=16))
        >>> [r["epoch"] for r in history.records]
        [1, 2]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any,
        metrics: Mapping[str, Any] | None = None,
        scheduler: Any = None,
        precision: str | Precision = "32",
        accumulate_grad_batches: int = 1,
        max_epochs: int = 1,
        callbacks: Iterable[Callback] | None = None,
        device: str | torch.device = "auto",
        gradient_clip_val: float | None = None,
        seed: int | None = None,
        nan_policy: str = "raise",
        compile: bool = False,
        progress: bool = True,
        log_every_n_steps: int = 20,
        fast_dev_run: bool | int = False,
        adaptive_batch_size: str | AdaptiveBatchSize | None = None,
        micro_batch_size: int | str | None = None,
        auto_num_workers: bool = False,
        strategy: str = "auto",
        auto: bool = False,
        channels_last: bool = False,
    ) -> None:
        check_objects(model, optimizer, metrics)
        check_trainer_settings(accumulate_grad_batches=accumulate_grad_batches, max_epochs=max_epochs,
                               log_every_n_steps=log_every_n_steps, gradient_clip_val=gradient_clip_val,
                               nan_policy=nan_policy, seed=seed, fast_dev_run=fast_dev_run,
                               micro_batch_size=micro_batch_size, auto_num_workers=auto_num_workers,
                               adaptive_batch_size=adaptive_batch_size, strategy=strategy, auto=auto,
                               channels_last=channels_last,
                               **({} if isinstance(precision, Precision) else {"precision": precision}))
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self._channels_last = ChannelsLast(self.model) if channels_last else None
        self.criterion = as_criterion(criterion)
        check_optimizer_covers(self.model, optimizer, self.criterion)
        self.metric_specs = dict(metrics or {})
        self.precision = resolve_precision(precision, self.device)  # resolved once: fit, bench and tune share it
        self.precision_name = self.precision.name
        self.gradient_clip_val = gradient_clip_val
        self.seed = seed
        self.nan_policy = nan_policy
        self.log_every_n_steps = log_every_n_steps
        self.limit_batches: int | None = int(fast_dev_run) or None  # batches per epoch and per validation
        self.compile = compile
        self._forward_model = self._eval_model = self._compile(model)  # DDP trains through its wrapper only
        self.strategy_name = strategy
        self.strategy: Any = None  # the running DDP / FSDP strategy, started at fit under torchrun
        self.batch_sizing = BatchSizing(adaptive_batch_size, micro_batch_size)
        self.autotune = AutoTune(auto)
        self._schedule = LRSchedule(scheduler)
        callbacks = list(callbacks or [])
        if progress and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
        if (auto_num_workers or auto) and not any(isinstance(cb, LoaderAutotune) for cb in callbacks):
            # With auto alone it acts only where auto's search did not measure the loader (a run too short
            # for a search still gets its workers tuned: those trials train), and never raises.
            callbacks.append(LoaderAutotune(required=bool(auto_num_workers)))
        self.callbacks = CallbackList(callbacks)
        self.state = TrainState(model=self.model, optimizer=optimizer, device=self.device, precision=self.precision,
                                train_sums=RunningSums(self.metric_specs, self.device), callbacks=self.callbacks,
                                max_epochs=max_epochs, accumulate_grad_batches=accumulate_grad_batches)
        self._hooks = self.callbacks.hooks  # the loop skips events nobody implements
        self.val_metrics = MetricSet(self.metric_specs, self.device)
        self.is_global_zero = distributed.is_global_zero()
        self.run_dir: str | os.PathLike | None = None  # the run folder; the CLI sets it, checkpoints and loggers use it

    @property
    def micro_batch_size(self) -> int | None:
        """Samples per micro-batch (None: batches are not split); checkpointed with the state."""
        return self.state.micro_batch_size

    @micro_batch_size.setter
    def micro_batch_size(self, size: int | None) -> None:
        self.state.micro_batch_size = size

    @property
    def channels_last(self) -> bool:
        """Whether the model trains in channels-last format (``channels_last=True``, or chosen by ``auto``)."""
        return self._channels_last is not None

    def _compile(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(model) if self.compile else model

    @property
    def batch_size(self) -> int | None:
        """The train batch size in use (after ``fit``'s batch-size search, the one it chose); None
        for a loader without one (its own batch sampler, a plain iterable)."""
        return self.state.batch_size

    @property
    def loader_settings(self) -> dict[str, Any]:
        """The train loader's ``num_workers``, ``prefetch_factor``, ``pin_memory``, ``persistent_workers``
        as they are now (after ``auto_num_workers`` tuning, the chosen ones; during its tuning epoch, the
        given ones); {} before a loader is given."""
        return loader_settings(self.state.train_loader)

    @property
    def train_metrics(self) -> MetricSet:
        """The running epoch's train metrics (they live in ``state.train_sums``)."""
        return self.state.train_sums.metrics

    # ------------------------------------------------------------------ public API
    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None,
            ckpt_path: str | os.PathLike | Mapping[str, Any] | None = None) -> History:
        """Train for ``max_epochs`` (or until a callback stops it) and return the :class:`History`.

        ``ckpt_path`` (a path, ``"last"``, or what :func:`~adaptrain.load_checkpoint` returned)
        resumes a run exactly where its checkpoint left it.
        """
        state = self.state
        check_loader(train_loader, "fit(train_loader=...)")
        check_loader(val_loader, "fit(val_loader=...)")
        if state.epoch >= state.max_epochs and ckpt_path is None:
            warnings.warn(f"fit(): this trainer already ran its {state.max_epochs} epochs; nothing to do. Raise "
                          "trainer.state.max_epochs to train more, or build a new Trainer.")
            return state.history
        state.train_loader, state.val_loader, state.next_train_loader = train_loader, val_loader, None
        state.should_stop, state.stop_reason = False, None
        if self.seed is not None:
            seed_everything(self.seed)
        # Everything that can be wrong is checked here, before the first step.
        self._steps_per_epoch(train_loader)
        checkpoint = read_checkpoint(self, ckpt_path) if ckpt_path is not None else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # pays off when input shapes stay fixed
        resumed = checkpoint[1] if checkpoint else None
        self.batch_sizing.searched = self.autotune.prepare(self, resumed)  # auto=True: may change anything
        self.batch_sizing.prepare(self, resumed)  # may rebuild the loader
        parallel.setup(self)  # several processes: wrap the model, shard the loaders (after the local search)
        state.steps_per_epoch = self._steps_per_epoch(state.train_loader)
        self._schedule.setup(state)
        if checkpoint is not None:
            apply_checkpoint(self, *checkpoint)
            if state.epoch >= state.max_epochs:
                warnings.warn(f"fit(ckpt_path=...): the checkpoint is at epoch {state.epoch} and max_epochs is "
                              f"{state.max_epochs}: nothing left to train. Raise max_epochs to train more.")
        preflight(self, fresh=ckpt_path is None and state.epoch == 0)
        planned_epochs = state.max_epochs
        if self.limit_batches:
            state.max_epochs = state.epoch + 1  # a dry run: one short epoch from wherever the run is
        try:
            self._with_events("fit", self._fit_epochs)
            self._raise_interrupt()  # a signal seen in after_fit
        except BaseException as error:
            state.exception = error
            self.callbacks.fire(Event.EXCEPTION.value, self)
            raise
        finally:
            state.max_epochs = planned_epochs
        return state.history

    def tune(self, train_loader: Iterable, budget: float | None = None, keep_batch_size: bool = False,
             lr: bool = False) -> TuneReport:
        """Measure short real trials over this run's configuration and report the fastest; the trainer
        comes out exactly as it went in (``Trainer(auto=True)`` applies the choice instead).

        ``budget``: seconds of trials (default: 5% of the expected run, estimated from the first trial;
        a run too short for that to buy two trials is not tuned, and the report says why).
        ``keep_batch_size``: change nothing that alters the optimisation (the batch size, hence the LR).
        ``lr``: also run :meth:`lr_find` at the chosen configuration (``report.chosen["lr"]``).

        Example:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> model = torch.nn.Linear(8, 2)
            >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss(),
            ...                   progress=False, device="cpu")
            >>> data = TensorDataset(torch.randn(512, 8), torch.randint(0, 2, (512,)))
            >>> report = trainer.tune(DataLoader(data, batch_size=32), budget=3, keep_batch_size=True)
            >>> report.chosen["batch_size"], report.original["precision"]
            (32, '32')
        """
        check_loader(train_loader, "tune(train_loader=...)")
        return tune(self, train_loader, budget=budget, keep_batch_size=keep_batch_size, lr=lr)

    def lr_find(self, train_loader: Iterable, **options: Any) -> LRFinderResult:
        """An LR range test: real optimizer steps at learning rates growing exponentially from ``min_lr``
        (1e-7) to ``max_lr`` (10) over ``num_steps`` (100), stopped once the loss diverges; the trainer
        comes out exactly as it went in. ``result.suggestion`` is read off the smoothed loss by ``rule``
        (``"valley"``, ``"steepest"`` or ``"minimum"``), ``result.plot(path)`` draws the curve, and
        ``apply=True`` sets the LR (a OneCycleLR's ``max_lr``) to it. The options and the rules:
        :func:`adaptrain.core.lr_finder.lr_find`, :func:`adaptrain.tuning.lr_rules.suggest`.

        Example:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> model = torch.nn.Linear(4, 1)
            >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
            ...                   progress=False)
            >>> x = torch.randn(256, 4)
            >>> weights = model.weight.clone()
            >>> result = trainer.lr_find(DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32))
            >>> 1e-3 < result.suggestion < 1.0, torch.equal(model.weight, weights)  # GD diverges above lr 1 here
            (True, True)
        """
        check_loader(train_loader, "lr_find(train_loader=...)")
        return lr_find(self, train_loader, **options)

    def validate(self, loader: Iterable) -> dict[str, float]:
        """Evaluate on ``loader``; returns ``{"val_loss": ..., "val_<metric>": ...}``."""
        check_loader(loader, "validate(loader=...)")
        results: dict[str, float] = {}  # not state.epoch_logs: a call from a callback mid-fit must not clobber it
        loader = parallel.shard_eval(self, loader)
        self._with_events("validate", lambda: results.update(self._run_eval(loader, "val", "val_loader")))
        return results

    def test(self, loader: Iterable) -> dict[str, float]:
        """Like :meth:`validate`, with keys prefixed ``test_``; fires no validation events."""
        check_loader(loader, "test(loader=...)")
        return self._run_eval(parallel.shard_eval(self, loader), "test", "test_loader")

    def predict(self, loader: Iterable) -> Any:
        """Model outputs over ``loader`` (batches of inputs, or (inputs, targets)), concatenated on CPU."""
        check_loader(loader, "predict(loader=...)")
        with self._no_grad():
            return self._predict(loader)

    def replace_train_loader(self, loader: Iterable | None = None, **changes: Any) -> Iterable:
        """Swap the train loader: ``loader`` itself, or the current one rebuilt with ``changes``
        (``batch_size``, ``num_workers``, ``prefetch_factor``, ``pin_memory``, ``persistent_workers``).

        A rebuilt loader keeps the dataset, the sampler with its generator, ``collate_fn`` and
        ``worker_init_fn``, so a seeded run yields the same batches as one that never swapped (with the
        same batch size). Called during an epoch, the swap happens at the next epoch start; the steps
        per epoch and the progress bar's total follow the new loader.

        Example:
            >>> import torch
            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> model = torch.nn.Linear(2, 1)
            >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
            ...                   progress=False)
            >>> data = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
            >>> trainer.state.train_loader = DataLoader(data, batch_size=4)
            >>> trainer.replace_train_loader(batch_size=8).batch_size
            8
        """
        state = self.state
        current = state.next_train_loader if state.next_train_loader is not None else state.train_loader
        if loader is None:
            loader = LoaderSpec.from_loader(current).build(**changes)
        elif changes:
            raise TypeError("replace_train_loader(): pass a loader or changes to the current one, not both.")
        steps = self._steps_per_epoch(loader)
        if state.scheduler is not None and state.scheduler_interval == "step" and steps != state.steps_per_epoch:
            raise ConfigError("replace_train_loader(...)", f"changes the optimizer steps per epoch from "
                              f"{state.steps_per_epoch} to {steps}, but the per-step {type(state.scheduler).__name__} "
                              "was planned for the old count and would overrun or end early; keep the steps per "
                              "epoch (batch size and accumulation), or use an epoch-interval scheduler.")
        if state.in_train_phase:
            state.next_train_loader = loader  # mid-epoch: the running epoch keeps its loader
        else:
            self._install_train_loader(loader)
        return loader

    def _install_train_loader(self, loader: Iterable) -> None:
        state = self.state
        state.train_loader, state.next_train_loader = loader, None
        state.steps_per_epoch = self._steps_per_epoch(loader)

    def _steps_per_epoch(self, loader: Iterable) -> int | None:
        length = loader_length(loader)
        if length == 0:
            raise ValueError("fit(train_loader=...): the loader is empty; expected at least one batch.")
        if length is not None and self.limit_batches:
            length = min(length, self.limit_batches)
        return math.ceil(length / self.state.accumulate_grad_batches) if length is not None else None

    def on_out_of_memory(self, error: BaseException) -> None:
        """An OOM in a step: with ``micro_batch_size`` or ``adaptive_batch_size`` set, halve the
        micro-batch (the loop redoes the same step); otherwise raise it."""
        self.batch_sizing.on_out_of_memory(self, error)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Send ``metrics`` to every logger (any callback that implements ``log_metrics``), at the
        optimizer step ``step`` (default: the current one). Rank zero only."""
        if self.is_global_zero:
            self.callbacks.log_metrics(metrics, self.state.global_step if step is None else step)

    def check_finite(self) -> None:
        """Raise :class:`~adaptrain.NonFiniteLossError` if a loss tracked so far this epoch was NaN/Inf.

        A host-device sync: call it where one is paid anyway (before writing a checkpoint). It folds
        nothing, so the epoch's ``train_loss`` is the same bits as in a run that never checked.
        """
        if self.nan_policy != "raise":
            return
        bad_batch = self.state.train_sums.losses["loss"].first_nonfinite()
        if bad_batch is not None:
            raise self._nonfinite_loss(max(bad_batch, 1))

    def print(self, *args: Any) -> None:
        """Print on rank zero only, through the progress bar's console when there is one."""
        if not self.is_global_zero:
            return
        bars = self.callbacks.find(ProgressBar)
        (bars[0].print if bars else print)(*args)
