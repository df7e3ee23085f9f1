"""TrainState: the one owner of loop progress, and what a checkpoint (or an in-memory snapshot) holds.

Callbacks read the state; adaptive features change it. Everything the loop knows about where it
is lives here (counters in batches *and* samples, the running epoch's loss/metric sums, the
accumulation window), so a checkpoint is built from the state alone: :meth:`TrainState.state_dict`
returns exactly :data:`CHECKPOINT_KEYS`, and :meth:`TrainState.snapshot` / :meth:`TrainState.restore`
do the same in memory for search trials (batch size, tuning, LR finder).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from adaptrain.checkpoint.io import CHECKPOINT_KEYS, FORMAT, VERSION
from adaptrain.core.history import History
from adaptrain.core.metrics import RunningSums
from adaptrain.core.precision import Precision
from adaptrain.data.loaders import loader_rng_state, set_loader_rng_state

if TYPE_CHECKING:
    from adaptrain.core.callback import CallbackList

__all__ = ["CHECKPOINT_KEYS", "TrainState", "Window", "rng_state", "seed_everything", "set_rng_state"]

#: Loop position, saved under "counters" (ints, plus step_lr). Old checkpoints lack the sample counts.
COUNTERS = ("epoch", "global_step", "batch_idx", "epoch_samples", "samples_seen", "skipped_steps", "skipped_batches")


@dataclass
class Window:
    """The optimizer step being accumulated: its loader batches, their samples, and the values to
    track once the step succeeds (so a failed or retried step leaves the epoch's sums untouched)."""

    batches: list[tuple] = field(default_factory=list)  # (inputs, targets, batch index, samples)
    samples: int = 0  # samples whose gradients are in .grad, waiting for the step
    tracked: list[tuple] = field(default_factory=list)  # (loss, parts, outputs, targets, batch size, batch index)
    weighted: bool = False  # losses scaled by their share of `reference` samples (accumulation or micro-batches)
    reference: int = 1  # samples of the window's first batch
    synced: bool = False  # several ranks: the window's gradients were all-reduced by its last backward

    def clear(self) -> None:
        self.batches.clear()
        self.tracked.clear()
        self.samples, self.weighted, self.reference, self.synced = 0, False, 1, False


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: Precision
    train_sums: RunningSums
    callbacks: CallbackList | None = None  # their state_dicts are checkpointed under state_key
    strategy: Any = None  # DDP / FSDP on several processes: how the model's and optimizer's state is gathered
    scheduler: Any = None
    scheduler_interval: str = "epoch"
    max_epochs: int = 1
    accumulate_grad_batches: int = 1
    micro_batch_size: int | None = None  # split each batch into micro-batches of this size (None: unsplit)
    batch_size: int | None = None  # the train loader's batch size in use (None: the loader does not say)
    # -- position: what has been trained (a checkpoint's "counters")
    epoch: int = 0  # epochs completed; the running epoch is epoch + 1 in records
    global_step: int = 0  # optimizer steps taken (skipped AMP steps included)
    batch_idx: int = 0  # train batches fetched in the running epoch
    epoch_samples: int = 0  # train samples fetched in the running epoch (a mid-epoch resume skips these)
    samples_seen: int = 0  # train samples fetched over the whole run
    skipped_steps: int = 0  # optimizer steps skipped by the grad scaler (inf/NaN gradients)
    skipped_batches: int = 0  # batches with a non-finite loss, under nan_policy="skip"
    step_lr: float | None = None  # the lr of the last optimizer step (per-step schedulers move past it)
    steps_per_epoch: int | None = None
    window: Window = field(default_factory=Window)
    # -- the running epoch
    history: History = field(default_factory=History)
    epoch_logs: dict[str, Any] = field(default_factory=dict)  # the running epoch's values so far
    running: dict[str, float] = field(default_factory=dict)  # last values read at a refresh point
    validated: bool = False  # this epoch ran a validation (adaptive validation skips some)
    data_time: float = 0.0  # seconds this epoch spent waiting for the train loader
    compute_time: float = 0.0  # seconds this epoch spent in forward/backward/step
    num_batches: int | None = None  # len(train_loader) this epoch, when it has one
    in_train_phase: bool = False  # the train loop is running (a loader swap then waits for the next epoch)
    train_loader: Any = None
    val_loader: Any = None
    next_train_loader: Any = None  # swapped in at the next epoch start (Trainer.replace_train_loader)
    epoch_start_rng: dict[str, Any] | None = None  # replays the sampler's order on mid-epoch resume
    resume_point: dict[str, Any] | None = None  # a mid-epoch checkpoint's RNG and sums, applied after skipping
    # -- control
    should_stop: bool = False
    stop_reason: str | None = None
    # Set by a callback (the signal handler) to stop fit: the loop raises it after every callback has
    # seen the current after_step / after_epoch, so no logger or progress bar misses that event.
    interrupt: BaseException | None = None
    batch: Any = None
    batch_samples: int = 0  # samples in state.batch
    outputs: Any = None
    loss: torch.Tensor | None = None
    exception: BaseException | None = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def mid_epoch(self) -> bool:
        return self.batch_idx > 0

    def counters(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in COUNTERS}, "step_lr": self.step_lr,
                "micro_batch_size": self.micro_batch_size, "batch_size": self.batch_size}

    def load_counters(self, counters: dict[str, Any]) -> None:
        for key in COUNTERS:
            setattr(self, key, int(counters.get(key, 0)))
        self.step_lr = counters.get("step_lr")
        self.micro_batch_size = counters.get("micro_batch_size", self.micro_batch_size)
        self.batch_size = counters.get("batch_size", self.batch_size)

    # ------------------------------------------------------------------ checkpoint contents
    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": type(self.model).__name__,
                "optimizer": type(self.optimizer).__name__,
                "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
                "precision": self.precision.name, "accumulate_grad_batches": self.accumulate_grad_batches,
                "steps_per_epoch": self.steps_per_epoch}

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs (:data:`CHECKPOINT_KEYS`), as references: save or copy it at once.

        Take it at a window boundary (after an optimizer step or an epoch), where no gradient is half-accumulated.
        """
        return {
            "meta": self.meta(),
            "model": self.strategy.model_state_dict(self.model) if self.strategy else self.model.state_dict(),
            "optimizer": (self.strategy.optimizer_state_dict(self.model, self.optimizer) if self.strategy
                          else self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.precision.state_dict(),
            "counters": self.counters(),
            "history": self.history.state_dict(),
            "rng": {"now": {**rng_state(), "loader": loader_rng_state(self.train_loader)},
                    "epoch_start": self.epoch_start_rng if self.mid_epoch else None},
            "callbacks": self.callbacks.state_dicts() if self.callbacks is not None else {},
            "progress": self.train_sums.state_dict() if self.mid_epoch else None,
        }

    def load_state_dict(self, ckpt: dict[str, Any], replay_epoch: bool = True) -> None:
        """Put the state where ``ckpt`` left it; check that it fits first (``checkpoint.compat``).

        With ``replay_epoch`` (resuming a mid-epoch checkpoint) the loop replays the epoch's shuffle
        order, skips the samples already trained and then restores the RNG and the epoch's sums; without
        it (:meth:`restore`) everything is applied at once.
        """
        if self.strategy is not None:
            self.strategy.load_model(self.model, ckpt["model"])
            self.strategy.load_optimizer(self.model, self.optimizer, ckpt["optimizer"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.precision.load_state_dict(ckpt["precision"])
        self.load_counters(ckpt["counters"])
        self.history.load_state_dict(ckpt["history"])
        if self.callbacks is not None:
            self.callbacks.load_state_dicts(ckpt["callbacks"])
        self.window.clear()
        rng, progress = ckpt["rng"], ckpt["progress"]
        if self.mid_epoch and replay_epoch:
            self.epoch_start_rng = rng["epoch_start"]
            self.resume_point = {"rng": rng["now"], "progress": progress}
            return
        set_rng_state(rng["now"])
        set_loader_rng_state(self.train_loader, rng["now"].get("loader"))
        self.epoch_start_rng = rng["epoch_start"]
        self.train_sums.reset()
        if progress is not None:
            self.train_sums.load_state_dict(progress, self.device)

    def snapshot(self, device: str | torch.device | None = None) -> dict[str, Any]:
        """A deep copy of :meth:`state_dict` in memory: weights, optimizer, scheduler, scaler, RNG,
        BatchNorm statistics, counters, history and the epoch's sums, for :meth:`restore` after a trial.

        ``device="cpu"`` keeps the copy in host memory, so a memory-measuring trial on the GPU does
        not pay for a second copy of the weights and optimizer state.

        Example:
            >>> import torch
            >>> from adaptrain import Trainer
            >>> model = torch.nn.Linear(2, 1)
            >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(),
            ...                   progress=False)
            >>> saved = trainer.state.snapshot()
            >>> with torch.no_grad(): _ = model.weight.add_(1.0)
            >>> trainer.state.restore(saved); torch.equal(model.weight, saved["model"]["weight"])
            True
        """
        if device is None:
            return copy.deepcopy(self.state_dict())
        return copy.deepcopy(_tensors_to(self.state_dict(), torch.device(device)))

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back a :meth:`snapshot` exactly (the snapshot stays usable for another restore)."""
        self.load_state_dict(copy.deepcopy(snapshot), replay_epoch=False)


def _tensors_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it copied to ``device`` (dicts, lists and tuples rebuilt)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _tensors_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_tensors_to(v, device) for v in value)
    return value


# ---------------------------------------------------------------------- random generators
def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from (python, numpy, torch, CUDA).

    Only tensors, numbers and tuples, so ``torch.load(weights_only=True)`` can read it back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.copy()), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy(), np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call it before building the model to seed its initialisation too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
