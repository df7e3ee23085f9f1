"""``trainer.tune(...)`` and ``Trainer(auto=True)``: search the run's configuration by measurement, then apply it.

The search is pure (:func:`adaptrain.tuning.autotune.search`); the trials are real
(:class:`~adaptrain.core.tune_trials.TrialRunner`). :func:`tune` measures and puts the trainer back
exactly (it only advises: the CLI writes ``tuned.yaml`` from its :class:`TuneReport`);
:class:`AutoTune` runs the same search at the start of ``fit`` and applies the choice
(:func:`apply_point`), recording every change like every other adaptation.

What is searched (:func:`tune_space`): every precision the device runs (measured, never assumed:
on some CPUs bf16 is faster than fp32, on others several times slower), channels-last where the model
has 2-D convolutions and 4-D inputs, the batch size (the "full" search, LR rescaled by the square
root rule; ``keep_batch_size`` forbids it), a micro-batch when the batch does not fit, the loader's
workers and prefetch (only when the run waits for data), ``pin_memory`` on CUDA, and ``torch.compile``
(its compilation time counted against the expected run).

Budget: by default 5% of the expected run, warm-up included: the run's samples over the first trial's
samples/s, and each faster trial shrinks it to 5% of the shorter run it promises, so the tuning stays
within its share of the run as tuned. A run too short for that budget to buy two trials (sized by the
warm-up's one round) is not tuned at all: it pays the warm-up only, and the report says why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from adaptrain.core.batch_sizing import apply_batch_size, first_batch, record_adaptation
from adaptrain.core.batching import unpack_batch
from adaptrain.core.loader_trials import hardware_start, rebuildable, stable_loader
from adaptrain.core.memory_format import channels_last_applies
from adaptrain.core.precision import PRECISIONS, precision_support
from adaptrain.core.scheduling import check_rescalable
from adaptrain.core.tune_trials import (
    TrialRunner,
    configured,
    current_point,
    set_channels_last,
    set_compile,
    set_precision,
)
from adaptrain.data.loaders import is_default_batching
from adaptrain.distributed import env as distributed
from adaptrain.errors import ConfigError
from adaptrain.tuning.autotune import (
    OPTIMISATION_KEYS,
    Measurement,
    NotTunable,
    SearchResult,
    Space,
    search,
    too_short_to_tune,
)
from adaptrain.tuning.batch_size import accumulation_for, scale_lr

if TYPE_CHECKING:
    from adaptrain.core.trainer import Trainer

__all__ = ["TuneReport", "tune", "tune_space", "apply_point", "AutoTune", "DEFAULT_SHARE"]

DEFAULT_SHARE = 0.05  # of the expected run: the bound on what tuning may cost
MiB = 2**20


@dataclass
class TuneReport:
    """What :func:`tune` measured and chose.

    ``original`` / ``chosen``: the run's settings (precision, channels_last, batch_size,
    micro_batch_size, num_workers, prefetch_factor, pin_memory, compile, accumulate_grad_batches, lr).
    ``trials``: one dict per trial (stage, settings, samples/s, peak memory, seconds, error).
    ``reasons``: setting -> the measured reason of its change. ``speedup``: the choice's samples/s
    over the original's (side by side when ``confirmed``). ``seconds``: the tuning's wall time;
    ``expected_run_s``: the run's train steps at the original's measured speed.
    """

    original: dict[str, Any]
    chosen: dict[str, Any]
    trials: list[dict[str, Any]]
    reasons: dict[str, str]
    notes: list[str]
    speedup: float | None
    confirmed: bool
    seconds: float
    budget_s: float
    expected_run_s: float | None
    lr_finder: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> float | None:
        """Tuning time over the expected run time."""
        return self.seconds / self.expected_run_s if self.expected_run_s else None

    def changes(self) -> list[tuple[str, Any, Any, str, bool]]:
        """(setting, before, after, reason, alters the optimisation) for each setting that changed."""
        rows = []
        for key, after in self.chosen.items():
            before = self.original.get(key)
            if before != after:
                reason = self.reasons.get(key) or self.reasons.get("batch_size" if key in (
                    "lr", "accumulate_grad_batches") else key, "")
                rows.append((key, before, after, reason, key in (*OPTIMISATION_KEYS, "accumulate_grad_batches")))
        return rows

    def table(self) -> str:
        """The report: every trial (settings, samples/s, peak memory, cost), then the changes and the speedup."""
        lines = [f"{'stage':<16} {'settings':<62} {'samples/s':>10} {'peak MiB':>9} {'s':>6}"]
        for trial in self.trials:
            settings = _short(trial["point"], self.original)
            rate = f"{trial['samples_per_s']:.1f}" if trial["samples_per_s"] else "failed"
            peak = f"{trial['peak_memory_mib']:.0f}" if trial["peak_memory_mib"] is not None else "-"
            why = f"  ({trial['error']})" if not trial["samples_per_s"] and trial["error"] else ""  # whole, not cut
            lines.append(f"{trial['stage']:<16} {settings:<62} {rate:>10} {peak:>9} {trial['seconds']:>6.1f}{why}")
        lines.append("")
        changes = self.changes()
        for title, alters in (("changes that alter the optimisation", True), ("changes that only change speed", False)):
            group = [c for c in changes if c[4] == alters]
            lines.append(f"{title}: " + ("none" if not group else ""))
            lines += [f"  {key}: {before} -> {after}  ({reason})" for key, before, after, reason, _ in group]
            if group and alters:  # faster is not the whole story for these: the model learns differently
                lines.append("  (these change what the model learns, not only its speed: compare the final metric, "
                             "or keep the batch size with keep_batch_size / --keep-batch-size)")
        lines += [f"note: {note}" for note in self.notes]
        speed = f"{self.speedup:.2f}x the original's samples/s" if self.speedup else "speedup not measured"
        how = "measured side by side" if self.confirmed else "from the search's own trials"
        run_s = self.expected_run_s or 0.0
        share = f" = {self.share:.1%} of the expected {run_s:.{1 if run_s < 100 else 0}f} s run" if self.share else ""
        lines.append(f"chosen: {speed} ({how}); tuning took {self.seconds:.1f} s (budget {self.budget_s:.1f} s)"
                     f"{share}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for JSON and the run's records)."""
        return {**asdict(self), "share": self.share, "changes": [list(c) for c in self.changes()]}


def _short(point: Mapping[str, Any], original: Mapping[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in point.items() if k in ("precision", "batch_size") or v != original.get(k)]
    return " ".join(shown)


# ---------------------------------------------------------------------- the space
class NotTunableError(ConfigError):
    """The train loader (or the run) cannot be tuned: ``tune`` raises it, ``auto=True`` says so and skips."""


def why_not_tunable(loader: Any) -> str | None:
    """Why trials cannot rebuild ``loader`` with other settings, or None."""
    why = rebuildable(loader)
    if why is None and not is_default_batching(loader):
        why = f"a DataLoader with its own {type(loader.batch_sampler).__name__}, which cannot be rebuilt " \
              "with another batch size"
    return why


def check_tunable(trainer: Trainer, loader: Any) -> None:
    """Before any work: a loader the trials can rebuild, and one process."""
    why = why_not_tunable(loader)
    if why is not None:
        raise NotTunableError("tune(train_loader=...)", f"is {why}; pass DataLoader(dataset, batch_size=...) over "
                              "a map-style data set.")
    if distributed.world_size() > 1:
        raise NotTunableError("tune", "runs on one process (trials on several ranks would time each other's "
                              "collectives); tune on one process, then launch the tuned configuration.")


def tune_space(trainer: Trainer, loader: DataLoader, keep_batch_size: bool = False,
               batch_mode: str = "full", compile: bool = True, tune_loader: bool = True) -> Space:
    """The search space for this trainer, device and loader (see the module doc)."""
    device = trainer.device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    precisions = tuple(p for p in PRECISIONS if precision_support(p, device.type, capability) is None)
    current = trainer.precision.name
    # The incumbent first, then bf16 (no scaler), then fp16: on a CPU fp16 is 10-23x slower, so it goes last,
    # where the budget is most likely spent already.
    precisions = (current, *sorted((p for p in precisions if p != current), key=("32", "bf16-mixed",
                                                                                  "16-mixed").index))
    inputs, _ = unpack_batch(first_batch(loader, 2), "train_loader")
    start = hardware_start(trainer, loader)
    samples = len(loader.dataset)
    return Space(precisions=precisions, channels_last=channels_last_applies(trainer.model, inputs),
                 batch_mode=None if keep_batch_size else batch_mode,
                 max_batch_size=max(samples // 4, 1),  # a trial reads several batches of the data set
                 loader=(start.settings, start.max_workers) if tune_loader else None,
                 pin_memory=device.type == "cuda" and tune_loader,
                 compile=compile, run_samples=samples * trainer.state.max_epochs)


# ---------------------------------------------------------------------- tune
def tune(trainer: Trainer, train_loader: Any, budget: float | None = None, keep_batch_size: bool = False,
         lr: bool = False, share: float = DEFAULT_SHARE, compile: bool = True, batch_mode: str = "full",
         tune_loader: bool = True) -> TuneReport:
    """Measure and choose the fastest configuration of this run; the trainer comes out exactly as it went in.

    ``budget``: seconds of trials (default ``share`` of the expected run). ``keep_batch_size``: do not
    change the batch (nor, hence, the LR). ``lr``: run the LR finder at the chosen configuration and
    report its suggestion as ``chosen["lr"]``. ``tune_loader=False``: keep the loader's workers and
    prefetch (the CLI, when the config's data section cannot set them).
    """
    check_tunable(trainer, train_loader)
    if budget is not None and not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"tune(budget={budget!r}): expected seconds > 0, or None (5% of the expected run).")
    started = time.perf_counter()
    state = trainer.state
    saved = state.snapshot(device="cpu")  # first: reading a batch below draws a worker seed from the global RNG
    try:
        original = current_point(trainer, train_loader)
        space = tune_space(trainer, train_loader, keep_batch_size, batch_mode, compile, tune_loader)
        runner = TrialRunner(trainer, train_loader, saved)
        # The process's first steps pay one-off costs (thread pools, allocator, kernel selection) that no
        # later trial pays: measured alone, the user's start looked up to 2x slower than it is and lost
        # close calls it should win. One untimed pass first (its time counts in report.seconds).
        warm = runner.warm_up(dict(original))
        warm_s = warm.seconds  # the whole warm-up trial, loader and restore included
        result = None
        if budget is None and warm.ok:  # the default budget: does this run buy a search at all?
            expected = space.run_samples / warm.samples_per_s
            runner.min_seconds = _trial_seconds(runner.min_seconds, share * expected)  # the start's trial too
            # a trial: the warm-up's fixed part (loader, warm-up batches, restore) once, then `rounds`
            # timed rounds like the warm-up's one, or min_seconds when that is longer
            timed = (warm.data_time or 0.0) + (warm.compute_time or 0.0)
            trial_s = max(warm_s - timed, 0.0) + max(timed * runner.rounds, runner.min_seconds)
            why = too_short_to_tune(max(share * expected - warm_s, 0.0), trial_s)  # the warm-up may exceed it
            if why is not None:
                note = f"not tuned: the expected {expected:.1f} s run is too short, {why}"
                result = SearchResult(dict(original), dict(original), (), {}, (note,), 0.0, share * expected, None)

        def share_of_run(measured: Measurement) -> float:
            """The share of the run at ``measured``'s speed (its one-off cost included), less the warm-up."""
            budget = max(share * (measured.setup_seconds + space.run_samples / measured.samples_per_s) - warm_s, 0.0)
            runner.min_seconds = _trial_seconds(runner.min_seconds, budget)
            return budget

        if result is None:
            try:
                result = search(original, runner, space, budget if budget is not None else share_of_run)
            except NotTunable as error:
                raise NotTunableError("tune(train_loader=...)", f"cannot be tuned: {error}.") from error
            ran = next((r.measurement for r in result.trials if r.measurement.ok), None)
            expected = space.run_samples / ran.samples_per_s if ran is not None else None
        finder = _find_lr(trainer, train_loader, result.chosen) if lr else None
    finally:
        state.restore(saved)
    report = _report(trainer, result, original, time.perf_counter() - started, expected, finder)
    report.extra["warm_up_s"] = round(warm_s, 4)
    return report


def _trial_seconds(longest: float, budget_s: float) -> float:
    """A trial's least timed seconds for a budget: ~20 trials' worth, so a short run's small budget
    buys shorter (noisier) trials, not fewer stages; never over ``longest``, never under 50 ms.

    Example:
        >>> _trial_seconds(0.5, budget_s=4.0), _trial_seconds(0.5, budget_s=0.4), _trial_seconds(0.5, budget_s=60)
        (0.2, 0.05, 0.5)
    """
    return min(longest, max(budget_s / 20, 0.05))


def _find_lr(trainer: Trainer, loader: DataLoader, chosen: dict[str, Any]) -> Any:
    sized = stable_loader(loader, batch_size=chosen["batch_size"], num_workers=0, persistent_workers=False)
    with configured(trainer, chosen):
        return trainer.lr_find(sized)


def _report(trainer: Trainer, result: SearchResult, original: dict[str, Any], seconds: float,
            expected: float | None, finder: Any) -> TuneReport:
    state = trainer.state
    chosen = dict(result.chosen)
    accumulate = state.accumulate_grad_batches
    old, new = original["batch_size"], chosen["batch_size"]
    new_accumulate = accumulation_for(accumulate * old, new) if accumulate > 1 else 1
    lr = state.lr
    rule = lr_scaling(trainer)
    factor = scale_lr(1.0, accumulate * old, new_accumulate * new, rule) if new != old else 1.0
    original = {**original, "accumulate_grad_batches": accumulate, "lr": lr}
    chosen.update(accumulate_grad_batches=new_accumulate, lr=lr * factor)
    reasons = dict(result.reasons)
    if factor != 1.0:
        reasons["lr"] = f"{rule} rule for batch {old * accumulate} -> {new * new_accumulate}: lr x{factor:.3g}"
    finder_dict = None
    if finder is not None:
        finder_dict = finder.as_dict() if hasattr(finder, "as_dict") else {"suggestion": finder.suggestion}
        if finder.suggestion is not None:
            chosen["lr"] = float(finder.suggestion)
            reasons["lr"] = f"LR finder ({finder.rule}) at the chosen configuration: {finder.suggestion:.3g}"
    trials = [{"stage": r.stage, "point": r.point, "samples_per_s": r.measurement.samples_per_s,
               "peak_memory_mib": r.measurement.peak_bytes / MiB if r.measurement.peak_bytes is not None else None,
               "seconds": round(r.measurement.seconds, 3), "setup_seconds": round(r.measurement.setup_seconds, 3),
               "data_share": r.measurement.data_share, "error": r.measurement.error} for r in result.trials]
    return TuneReport(original, chosen, trials, reasons, list(result.notes), result.speedup, result.confirmed,
                      seconds, result.budget_s, expected, finder_dict)


# ---------------------------------------------------------------------- applying
def lr_scaling(trainer: Trainer) -> str | None:
    """The LR rule for a new batch size: ``adaptive_batch_size``'s ``lr_scaling`` when given, else sqrt."""
    options = trainer.batch_sizing.options
    return options.lr_scaling if options is not None else "sqrt"


def apply_point(trainer: Trainer, original: Mapping[str, Any], chosen: Mapping[str, Any],
                reasons: Mapping[str, str] | None = None, record: bool = True, rescale: bool = True) -> None:
    """Train with ``chosen`` from now on: precision, layout, compile, micro-batch, then the loader
    (batch size with LR and schedule rescaled, workers). Each change is recorded unless ``record=False``."""
    state, reasons = trainer.state, reasons or {}
    setters = {"precision": set_precision, "channels_last": set_channels_last, "compile": set_compile}
    for key, setter in setters.items():
        if chosen[key] != original[key]:
            setter(trainer, chosen[key])
    state.micro_batch_size = chosen["micro_batch_size"]
    if chosen["batch_size"] != original["batch_size"]:
        if rescale:
            apply_batch_size(trainer, original["batch_size"], chosen["batch_size"], lr_scaling(trainer))
        else:
            trainer._install_train_loader(stable_loader(state.train_loader, batch_size=chosen["batch_size"]))
            state.batch_size = chosen["batch_size"]
    loader_keys = ("num_workers", "prefetch_factor", "pin_memory")
    if any(chosen[k] != original[k] for k in loader_keys):
        changes = {k: chosen[k] for k in loader_keys}
        trainer._install_train_loader(stable_loader(state.train_loader, **changes,
                                                    persistent_workers=chosen["num_workers"] > 0))
    if not record:
        return
    for key in ("precision", "channels_last", "compile", "micro_batch_size", "batch_size", *loader_keys):
        if chosen[key] != original[key]:
            record_adaptation(trainer, key, original[key], chosen[key],
                              f"auto: {reasons.get(key) or f'{key} {original[key]} -> {chosen[key]}'}")


class AutoTune:
    """``Trainer(auto=True)``: :func:`tune` at the start of ``fit`` and :func:`apply_point`; a resume re-applies."""

    def __init__(self, enabled: bool = False, share: float = DEFAULT_SHARE) -> None:
        self.enabled, self.share = enabled, share
        self.report: TuneReport | None = None
        self.applied = False  # this run's settings come from auto (then auto_num_workers has nothing to do)

    def prepare(self, trainer: Trainer, resumed: Mapping[str, Any] | None) -> bool:
        """Search and apply (a fresh run) or re-apply what the run chose (resume, ``fit`` again).
        Returns whether the batch size was settled here (the batch-size search then has nothing to do)."""
        if not self.enabled:
            return False
        state = trainer.state
        original = current_point(trainer, state.train_loader)
        if resumed is not None or state.global_step > 0:
            self.applied = self._reapply(trainer, original, resumed)
            return self.applied
        why = "fast_dev_run" if trainer.limit_batches else why_not_tunable(state.train_loader)
        if why is None and distributed.world_size() > 1:
            why = "several processes (run `adaptrain tune` on one, then launch the tuned config)"
        keep_batch = self._schedule_needs_the_batch(trainer)
        mode = trainer.batch_sizing.options.mode if trainer.batch_sizing.options is not None else "full"
        report = None
        try:
            report = None if why else tune(trainer, state.train_loader, share=self.share, batch_mode=mode,
                                           keep_batch_size=keep_batch)
        except NotTunableError as error:
            why = str(error)
        if report is None:
            trainer.print(f"adaptrain: auto tuning skipped: {why}")
            return False
        self.report = report
        if not report.trials:  # too short a run for tuning to pay: the decision is recorded, nothing changes
            record_adaptation(trainer, "auto", report.original, report.chosen, f"auto: {'; '.join(report.notes)}",
                              seconds=round(report.seconds, 3), share=report.share, speedup=None, trials=[],
                              notes=report.notes)
            return False
        self.applied = True
        apply_point(trainer, original, report.chosen, report.reasons)
        share = f"{report.share:.1%} of the expected {report.expected_run_s:.0f} s run" if report.share else \
            "share of the run unknown"
        speed = f"{report.speedup:.2f}x samples/s" if report.speedup else "speedup not measured"
        record_adaptation(trainer, "auto", report.original, report.chosen,
                          f"auto: {len(report.trials)} trials in {report.seconds:.1f} s ({share}); {speed}",
                          seconds=round(report.seconds, 3), share=report.share, speedup=report.speedup,
                          trials=report.trials, notes=report.notes)
        return True

    @staticmethod
    def _schedule_needs_the_batch(trainer: Trainer) -> bool:
        """A per-step scheduler instance built for this batch cannot follow another: auto keeps the batch."""
        spec = trainer._schedule.spec
        try:
            check_rescalable(spec["scheduler"], spec["interval"])
        except ConfigError as error:
            trainer.print(f"adaptrain: auto keeps the batch size: {str(error).split(';')[0]}")
            return True
        return False

    def _reapply(self, trainer: Trainer, original: dict[str, Any], resumed: Mapping[str, Any] | None) -> bool:
        """The run's recorded choice, without trials. On resume everything is applied to the fresh trainer
        (the checkpoint then restores the exact LR); on ``fit()`` again the trainer's own settings are the
        chosen ones already, so only the loader given anew gets the chosen batch and workers."""
        adaptations = resumed["history"].get("adaptations", ()) if resumed is not None else \
            trainer.state.history.adaptations
        entry = next((a for a in reversed(adaptations) if a.get("kind") == "auto"), None)
        if entry is None or not entry.get("trials"):  # auto was skipped, or did not tune (too short a run)
            return False
        recorded = {k: v for k, v in entry["after"].items() if k in original}
        apply_point(trainer, original, {**original, **recorded}, record=False, rescale=resumed is not None)
        return True
