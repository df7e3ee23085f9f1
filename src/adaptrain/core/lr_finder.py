"""The LR finder: an exponential LR sweep of real optimizer steps, undone afterwards.

:func:`lr_find` (``trainer.lr_find(train_loader, ...)``) takes ``num_steps`` optimizer steps through
:meth:`Trainer.run_step <adaptrain.Trainer.run_step>` (the loop's own path: precision, micro-batches,
clipping), each at the next learning rate of an exponential sweep from ``min_lr`` to ``max_lr``, on
batches of the train loader (cycled when it is shorter), and records each step's loss. It stops
early once the loss diverges. The rules (the sweep, the smoothing, the stop, the suggestion) are
pure and live in :mod:`adaptrain.tuning.lr_rules`.

Nothing of the sweep survives it: the trainer's state is snapshotted first (on the CPU, so the copy
takes no device memory) and restored after, even when a step raises: weights, BatchNorm statistics,
optimizer moments, scheduler, grad scaler, counters, history, the python / numpy / torch / CUDA
generators and the train loader's own generators. The scheduler does not step during the sweep (the
sweep sets the LR of every param group itself, keeping their ratios to the first group). So a fit
after ``lr_find`` is the same, bit for bit, as one without it. With ``apply=True`` the suggestion is
then applied on purpose, and recorded like every other adaptation.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR
from torch.utils.data import DataLoader

from adaptrain.core.batch_sizing import record_adaptation
from adaptrain.data.loaders import LoaderSpec, loader_rng_state, set_loader_rng_state, shutdown_workers
from adaptrain.tuning.lr_rules import SweepTracker, check_sweep, suggest, sweep_lr

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["LRFinderResult", "apply_suggestion", "lr_find"]


@dataclass
class LRFinderResult:
    """What a sweep measured and suggests.

    ``lrs``: the first param group's LR at each step taken; ``losses``: each step's loss as measured
    (NaN where it was not finite); ``smoothed``: their centred average, the curve the rule reads
    (:func:`~adaptrain.tuning.lr_rules.read_curve`); ``suggestion``: the learning rate (None when the
    curve gives none: see ``reason``);
    ``index``: the step the rule read it at; ``stop_reason``: why the sweep ended; ``steps``: steps
    taken; ``seconds``: the sweep's wall time, restore included.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None
    rule: str
    reason: str
    stop_reason: str
    steps: int
    seconds: float
    index: int | None = None
    applied: list[tuple[str, float, float]] = field(default_factory=list)  # (what, before, after) with apply=True

    def as_dict(self) -> dict[str, Any]:
        """The result as plain numbers and strings (NaN/Inf as None), ready for ``json.dumps``."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        return {key: clean(value) for key, value in asdict(self).items()}

    def plot(self, path: str | Path) -> Path:
        """Write the curve as a PNG at ``path`` (folders created): the raw and smoothed loss against
        the LR (log scale), the point the rule read and the suggested LR marked. Returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: the global backend is left alone

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, ".", ms=2.5, color="0.65", label="loss per step")
        ax.plot(self.lrs, self.smoothed, color="C0", lw=1.6, label="smoothed")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # raw losses past divergence would squash the curve: the smoothed range frames it
            low, high = min(finite), max(finite)
            margin = 0.08 * (high - low or abs(high) or 1.0)
            ax.set_ylim(low - margin, high + margin)
        if self.suggestion is not None and self.index is not None:
            ax.plot([self.lrs[self.index]], [self.smoothed[self.index]], "o", color="C3", ms=7, label="read here")
            ax.axvline(self.suggestion, color="C3", ls="--", lw=1, label=f"suggestion {self.suggestion:.3g}")
        ax.set_xscale("log")
        verdict = f"suggestion {self.suggestion:.3g}" if self.suggestion is not None else "no suggestion"
        ax.set(xlabel="learning rate", ylabel="loss", title=f"LR finder ({self.rule}): {verdict}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return path


def lr_find(trainer: Trainer, train_loader: Iterable, min_lr: float = 1e-7, max_lr: float = 10.0,
            num_steps: int = 100, rule: str = "valley", smoothing: float = 0.98, stop_factor: float | None = 4.0,
            apply: bool = False) -> LRFinderResult:
    """Sweep the LR exponentially over ``num_steps`` real optimizer steps, restore the trainer, and
    suggest a learning rate by ``rule`` (see :func:`adaptrain.tuning.lr_rules.suggest`).

    Args:
        trainer: the :class:`~adaptrain.Trainer` (its model, optimizer, criterion, precision).
        train_loader: batches to train on; a DataLoader is read through a copy of itself (same
            sampler and generator, no persistent workers) whose generators are then put back.
        min_lr, max_lr: the sweep's first and last learning rate.
        num_steps: optimizer steps at most (fewer when the loss diverges first).
        rule: ``"valley"``, ``"steepest"`` or ``"minimum"``.
        smoothing: the beta of the moving average the stop rule watches (0.98, as fastai and Lightning).
        stop_factor: stop once that average exceeds this many times its best (None: only at NaN/Inf).
        apply: afterwards, set the optimizer's LR to the suggestion (keeping the param groups'
            ratios), and a OneCycleLR's ``max_lr`` (a ``functools.partial(OneCycleLR, ...)`` factory or
            a built one); recorded in ``history.adaptations`` (kind ``"lr"``).
    """
    check_sweep(min_lr, max_lr, num_steps, smoothing, stop_factor, rule)
    if not isinstance(apply, bool):
        raise ValueError(f"lr_find(apply={apply!r}): expected True or False.")
    if trainer.state.in_train_phase:
        raise RuntimeError("lr_find(): called during fit's train phase; run it before fit (or between fits): the "
                           "sweep would drop the gradients the running step has accumulated.")
    started = time.perf_counter()
    lrs, losses, stop_reason = _sweep(trainer, train_loader, min_lr, max_lr, num_steps, smoothing, stop_factor)
    found = suggest(lrs, losses, rule)
    result = LRFinderResult(lrs, losses, list(found.curve), found.lr, rule, found.reason, stop_reason, len(lrs),
                            time.perf_counter() - started, found.index)
    if apply:
        if found.lr is None:
            warnings.warn(f"lr_find(apply=True): no suggestion ({found.reason}); the learning rate is unchanged.",
                          stacklevel=2)
        else:
            result.applied = apply_suggestion(trainer, found.lr, f"lr_find {rule}, {len(lrs)} steps",
                                              rule=rule, steps=len(lrs), seconds=round(result.seconds, 3))
    return result


def _sweep(trainer: Trainer, train_loader: Iterable, min_lr: float, max_lr: float, num_steps: int,
           smoothing: float, stop_factor: float | None) -> tuple[list[float], list[float], str]:
    """The steps themselves, between a snapshot and its restore."""
    state = trainer.state
    groups = state.optimizer.param_groups
    first = groups[0]["lr"]
    ratios = [group["lr"] / first if first else 1.0 for group in groups]
    saved = state.snapshot(device="cpu")
    loader_state = loader_rng_state(train_loader)  # the snapshot covers state.train_loader only
    kept = (state.batch, state.batch_samples, state.outputs, state.loss, trainer.model.training)
    scheduler, state.scheduler = state.scheduler, None  # the sweep sets the LR; the schedule must not move
    tracker = SweepTracker(smoothing, stop_factor)
    lrs: list[float] = []
    losses: list[float] = []
    batches = _Cycle(train_loader)
    stop_reason = f"all {num_steps} steps taken"
    try:
        for step in range(num_steps):
            batch = next(batches, None)
            if batch is None:
                stop_reason = f"the train loader ran out after {step} batches and cannot be read again"
                break
            lr = sweep_lr(step, min_lr, max_lr, num_steps)
            for group, ratio in zip(groups, ratios):
                group["lr"] = lr * ratio
            state.train_sums.reset()  # so the sums hold this step's loss alone (restored below)
            trainer.run_step(batch)
            loss = state.train_sums.losses["loss"].compute()  # micro-batches: their sample-weighted mean
            loss = math.nan if loss is None else loss  # nan_policy="skip" dropped a non-finite loss
            lrs.append(lr)
            losses.append(loss)
            tracker.add(loss)
            if tracker.stop_reason is not None:
                stop_reason = f"stopped at step {step + 1} of {num_steps} (lr {lr:.3g}): {tracker.stop_reason}"
                break
    finally:
        shutdown_workers(getattr(batches, "current", None))
        state.scheduler = scheduler
        state.restore(saved)
        set_loader_rng_state(train_loader, loader_state)
        state.batch, state.batch_samples, state.outputs, state.loss = kept[:4]
        trainer.model.train(kept[4])
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()  # the sweep's activations and the second optimizer state
    return lrs, losses, stop_reason


class _Cycle(Iterator[Any]):
    """The loader's batches, over and over (a new pass when one ends); stops when a pass yields none."""

    def __init__(self, loader: Iterable) -> None:
        # A copy without persistent workers: workers kept alive by the sweep would outlive it.
        self.loader = LoaderSpec.from_loader(loader).build(persistent_workers=False) \
            if isinstance(loader, DataLoader) else loader
        self.current: Iterator[Any] | None = None

    def __next__(self) -> Any:
        for _ in range(2):  # the running pass, then one fresh pass
            if self.current is None:
                self.current = iter(self.loader)
            batch = next(self.current, _END)
            if batch is not _END:
                return batch
            self.current = None
        raise StopIteration


_END = object()


# ---------------------------------------------------------------------- applying a suggestion
def apply_suggestion(trainer: Trainer, lr: float, source: str, **numbers: Any) -> list[tuple[str, float, float]]:
    """Train with ``lr``: every param group's LR scaled so the first group's is ``lr``; with a OneCycleLR
    (a ``functools.partial`` factory, or built), its ``max_lr`` becomes ``lr`` instead (OneCycleLR sets
    the LR itself). Recorded with :func:`~adaptrain.core.batch_sizing.record_adaptation` (kind ``"lr"``).
    Returns the changes as (what, before, after).

    Example:
        >>> import functools, torch
        >>> from adaptrain import Trainer
        >>> model = torch.nn.Linear(2, 1)
        >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), progress=False,
        ...                   scheduler=functools.partial(OneCycleLR, max_lr=0.1))
        >>> apply_suggestion(trainer, 0.03, "by hand")
        adaptrain: by hand: OneCycleLR max_lr 0.1 -> 0.03
        [('OneCycleLR max_lr', 0.1, 0.03)]
        >>> trainer._schedule.spec["scheduler"].keywords["max_lr"]
        0.03
    """
    state, spec = trainer.state, trainer._schedule.spec
    scheduler = state.scheduler if state.scheduler is not None else spec["scheduler"]
    groups = state.optimizer.param_groups
    factory = _one_cycle_factory(scheduler)
    if factory is not None:
        old = factory.keywords["max_lr"]
        what, before = "OneCycleLR max_lr", float(old[0] if isinstance(old, (list, tuple)) else old)
        new = [v * lr / before for v in old] if isinstance(old, (list, tuple)) else lr
        spec["scheduler"] = functools.partial(factory.func, *factory.args, **{**factory.keywords, "max_lr": new})
        scale_from = float(groups[0]["lr"])  # the optimizer's LR too (OneCycleLR replaces it once built)
    elif isinstance(scheduler, OneCycleLR):
        what, before = "OneCycleLR max_lr", float(groups[0]["max_lr"])
        scale_from = before
    else:
        what, before = "lr", float(groups[0]["lr"])
        scale_from = before
    _scale_lrs(state.optimizer, scheduler, lr / scale_from if scale_from > 0 else None, lr)
    reason = f"{source}: {what} {before:.4g} -> {lr:.4g}"
    record_adaptation(trainer, "lr", before, lr, reason, what=what, **numbers)
    return [(what, before, lr)]


def _one_cycle_factory(scheduler: Any) -> functools.partial | None:
    """``scheduler`` when it is ``functools.partial(OneCycleLR, ..., max_lr=...)`` (a subclass too)."""
    if isinstance(scheduler, functools.partial) and isinstance(scheduler.func, type) and \
            issubclass(scheduler.func, OneCycleLR) and "max_lr" in scheduler.keywords:
        return scheduler
    return None


def _scale_lrs(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float | None, lr: float) -> None:
    """Scale every LR the optimizer's groups and a built scheduler hold by ``factor`` (``None``: the
    first group's was 0, so every group gets ``lr``). The schedule's length is unchanged, so nothing
    else moves (``rescale_schedule`` also stretches a schedule, which a new LR does not need)."""
    for group in optimizer.param_groups:
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] = group[key] * factor if factor is not None else lr
    for name in ("base_lrs", "max_lrs"):  # a built scheduler's copies (max_lrs: CyclicLR's peaks)
        values = getattr(scheduler, name, None) if isinstance(scheduler, LRScheduler) else None
        if isinstance(values, list):
            setattr(scheduler, name, [v * factor if factor is not None else lr for v in values])
