"""Batch-size rules: the learning rate for a new batch, accumulation that keeps an effective batch,
micro-batch plans and the OOM back-off, and the distributed agreement. Pure; the search that
picks the batch is :mod:`adaptrain.tuning.batch_size` (which re-exports these)."""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["BatchSizeError", "LR_RULES", "scale_lr", "accumulation_for", "split_plan", "halve_micro_batch",
           "agree_batch_size", "check_counts"]

LR_RULES = ("sqrt", "linear", None)


class BatchSizeError(RuntimeError):
    """No batch size fits (even 1 ran out of memory), or the trial budget ran out before one did."""


def scale_lr(lr: float, old_batch: int, new_batch: int, rule: str | None = "sqrt") -> float:
    """The learning rate for ``new_batch`` when ``lr`` was tuned for ``old_batch``.

    ``"sqrt"`` (default, as OTX): ``lr * sqrt(new / old)``; ``"linear"`` (Goyal et al.):
    ``lr * new / old``; ``None``: unchanged. With accumulation, pass effective batches
    (``accumulate * batch_size``), so keeping the effective batch keeps the LR.

    Example:
        >>> scale_lr(0.1, 64, 256), scale_lr(0.1, 64, 256, "linear"), scale_lr(0.1, 64, 256, None)
        (0.2, 0.4, 0.1)
    """
    if rule not in LR_RULES:
        raise ValueError(f'lr_scaling is {rule!r}; expected "sqrt", "linear" or None')
    check_counts(old_batch=old_batch, new_batch=new_batch)
    ratio = new_batch / old_batch
    return lr if rule is None or ratio == 1 else lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


def accumulation_for(effective_batch: int, batch_size: int) -> int:
    """Loader batches to accumulate per optimizer step so a step sees about ``effective_batch`` samples.

    The rule: ``ceil(effective_batch / batch_size)``, so a step never sees fewer samples than the
    user asked for. When it does not divide, a step sees ``accumulate * batch_size`` samples, less
    than one loader batch more than asked (the loop weights the window by samples, so the gradient
    is the mean over all of them), and the LR follows that effective batch (:func:`scale_lr`).
    Used only where the user set an effective batch (``accumulate_grad_batches > 1``); otherwise
    accumulation stays 1 and the LR rule alone covers the new batch. To keep a batch exactly,
    split it instead (:func:`split_plan`).

    Example:
        >>> accumulation_for(256, 64), accumulation_for(256, 100), accumulation_for(64, 256)
        (4, 3, 1)
    """
    check_counts(effective_batch=effective_batch, batch_size=batch_size)
    return -(-effective_batch // batch_size)


def split_plan(batch_size: int, micro_batch_size: int | None) -> list[int]:
    """The micro-batch sizes one batch is cut into: consecutive pieces of ``micro_batch_size``, the
    remainder last (as the loop's ``split_micro_batches`` cuts). None or >= the batch: one piece.

    Example:
        >>> split_plan(10, 4), split_plan(8, None), split_plan(3, 8)
        ([4, 4, 2], [8], [3])
    """
    check_counts(batch_size=batch_size, **({} if micro_batch_size is None else {"micro_batch_size": micro_batch_size}))
    if micro_batch_size is None or micro_batch_size >= batch_size:
        return [batch_size]
    full, rest = divmod(batch_size, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])


def halve_micro_batch(current: int | None, batch_size: int) -> int:
    """The OOM back-off: the next micro-batch size after ``current`` (None: unsplit) ran out of memory.

    ``ceil(current / 2)`` (so 7 -> 4: pieces of 4 and 3, not three pieces). Raises
    :class:`BatchSizeError` at 1: nothing smaller is left to try.

    Example:
        >>> halve_micro_batch(None, 64), halve_micro_batch(7, 64), halve_micro_batch(2, 64)
        (32, 4, 1)
    """
    check_counts(batch_size=batch_size, **({} if current is None else {"current": current}))
    size = batch_size if current is None else min(current, batch_size)
    if size == 1:
        raise BatchSizeError(f"out of memory with micro-batches of 1 sample (batch size {batch_size}): nothing "
                             "smaller to try; use a smaller model, a lower precision, or free device memory")
    return -(-size // 2)


def agree_batch_size(sizes_per_rank: Iterable[int]) -> int:
    """The batch size every rank can run: the minimum of each rank's choice (the distributed seam:
    all-gather each rank's ``chosen``, then call this on every rank, so all agree).

    Example:
        >>> agree_batch_size([256, 240, 256])
        240
    """
    sizes = list(sizes_per_rank)
    if not sizes:
        raise ValueError("sizes_per_rank is empty; expected one batch size per rank")
    check_counts(**{f"sizes_per_rank[{i}]": s for i, s in enumerate(sizes)})
    return min(sizes)


def check_counts(**values: object) -> None:
    """Each value must be an int >= 1 (bools are not sizes); the message names the argument."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} is {value!r}; expected an int >= 1")
