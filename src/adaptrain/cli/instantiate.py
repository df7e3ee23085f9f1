"""Build objects named by import path: ``{class_path: ..., init_args: {...}}`` -> an instance.

Every check runs before the object is called: the path must import, and ``init_args`` must fit
``inspect.signature`` of the target (no unknown names, no missing required ones), so a typo is
reported as ``model.init_args.hiden is not an argument of adaptrain.models.MLP; did you mean
"hidden"?`` instead of a traceback from deep inside the constructor. Dicts inside ``init_args``
that have a ``class_path`` are built the same way (e.g. the losses of a ``MultiLoss``).

``call: false`` passes the named object itself instead of calling it: a plain function as a loss
or a metric (``{class_path: torch.nn.functional.cross_entropy, call: false}``); with ``init_args``
it becomes ``functools.partial(object, **init_args)`` (the names are checked against its signature).

Example:
    >>> instantiate({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 1}}, "model")
    Linear(in_features=2, out_features=1, bias=True)
    >>> instantiate({"class_path": "torch.nn.Linear", "init_args": {"in_feature": 2}}, "model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    adaptrain.errors.ConfigError: model.init_args.in_feature is not an argument of torch.nn.Linear; did you mean ...
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from adaptrain.errors import ConfigError

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def import_object(path: str, key: str) -> Any:
    """``"package.module.Name"`` (or ``package.module.Outer.Inner``) -> the object it names."""
    parts = path.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ConfigError(key, f'is "{path}"; expected a dotted import path like package.module.Class.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ConfigError(key, f'is "{path}"; importing {module_name} failed: {error}.') from error
        except Exception as error:  # noqa: BLE001 - the user's module raised while importing
            raise ConfigError(key, f'is "{path}"; importing {module_name} raised {type(error).__name__}: '
                              f"{error}") from error
        for depth, attr in enumerate(parts[split:]):
            if not hasattr(obj, attr):
                owner = ".".join(parts[:split + depth])
                close = difflib.get_close_matches(attr, [n for n in dir(obj) if not n.startswith("_")], n=1)
                hint = f'; did you mean "{owner}.{close[0]}"?' if close else "."
                raise ConfigError(key, f'is "{path}", but {owner} has no attribute "{attr}"{hint}')
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(key, f'is "{path}"; there is no module named "{parts[0]}" (is the package installed, '
                      "or its folder the current directory?).")


def check_init_args(target: Any, kwargs: Mapping[str, Any], key: str, path: str,
                    injected: int = 0, args_key: str | None = None) -> None:
    """Raise unless ``target(<injected positional args>, **kwargs)`` matches its signature.

    ``injected`` counts leading positional parameters adaptrain fills in itself (an optimizer's
    parameters, a scheduler's optimizer). Errors name ``<args_key>.<argument>`` (default
    ``<key>.init_args``). Targets without a readable signature are not checked.
    """
    args_key = args_key or f"{key}.init_args"
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = list(signature.parameters.values())[injected:]
    _reject_unknown_arguments(params, kwargs, args_key, path)
    missing = [p.name for p in params if p.kind in _NAMED and p.default is p.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(args_key, f"misses {', '.join(missing)}: required by {path}{signature}.")
    _check_types(target, kwargs, args_key, path)


_PLAIN = (bool, int, float, str)


def _check_types(target: Any, kwargs: Mapping[str, Any], args_key: str, path: str) -> None:
    """Arguments annotated with a plain type (bool, int, float, str, or Optional of them) must match.

    Anything richer (tensors, unions with classes, unresolvable string annotations) is left to
    the constructor: this catches ``plot: maybe`` for a bool, not every possible mistake.
    """
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - annotations that do not evaluate: nothing to check against
        return
    for name, value in kwargs.items():
        hint = hints.get(name)
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        allowed = tuple(t for t in options if t is not type(None))
        if not allowed or not all(t in _PLAIN for t in allowed):
            continue
        if value is None and len(allowed) < len(options):
            continue  # Optional[...] = None
        ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        ok = ok or (float in allowed and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            wanted = " or ".join(t.__name__ for t in allowed) + (" or null" if len(allowed) < len(options) else "")
            shown = f'"{value}"' if isinstance(value, str) else "null" if value is None else repr(value)
            raise ConfigError(f"{args_key}.{name}", f"is {shown}; {path} expects {wanted}.")


def call(target: Callable, key: str, path: str, *args: Any, **kwargs: Any) -> Any:
    """``target(*args, **kwargs)``; an exception becomes a ConfigError naming the key."""
    try:
        return target(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - whatever the user's constructor raised
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(key, f"could not be built: {path}(...) raised {type(error).__name__}: {message}") from error


def instantiate(spec: Mapping[str, Any], key: str, *injected: Any, args_key: str | None = None) -> Any:
    """Import ``spec["class_path"]``, check ``init_args`` and call it with ``injected`` first.

    With ``call: false`` in ``spec``, the object itself (or a ``functools.partial`` of it with the
    ``init_args``) is returned uncalled.

    Example:
        >>> instantiate({"class_path": "torch.nn.functional.nll_loss", "call": False}, "criterion").__name__
        'nll_loss'
        >>> instantiate({"class_path": "torch.nn.functional.cross_entropy", "call": False,
        ...              "init_args": {"label_smoothing": 0.1}}, "criterion").keywords
        {'label_smoothing': 0.1}
    """
    if not _calls(spec, key):
        return reference(spec, key, args_key=args_key)
    target, kwargs = resolve(spec, key, injected=len(injected), args_key=args_key)
    return call(target, key, spec["class_path"], *injected, **kwargs)


def _calls(spec: Mapping[str, Any], key: str) -> bool:
    value = spec.get("call", True)
    if not isinstance(value, bool):
        shown = f'"{value}"' if isinstance(value, str) else "null" if value is None else repr(value)
        raise ConfigError(f"{key}.call", f"is {shown}; expected true (build the object by calling class_path) "
                          "or false (pass the object itself, e.g. a function as a loss or metric).")
    return value


def reference(spec: Mapping[str, Any], key: str, args_key: str | None = None) -> Any:
    """The object ``spec["class_path"]`` names, uncalled; with ``init_args``, a partial of it.

    Every ``init_args`` name must be an argument of the object (required ones may stay out: the
    caller passes them, e.g. a loss's outputs and targets).
    """
    path = spec["class_path"]
    target = import_object(path, f"{key}.class_path")
    args_key = args_key or f"{key}.init_args"
    init_args = spec.get("init_args") or {}
    if not init_args:
        return target
    if not callable(target):
        raise ConfigError(args_key, f'is set, but "{path}" is a {type(target).__name__}, which takes no arguments; '
                          "remove init_args.")
    kwargs = {name: build_nested(value, f"{args_key}.{name}") for name, value in init_args.items()}
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        parameters = None  # no readable signature (a builtin): not checked
    if parameters is not None:
        _reject_unknown_arguments(list(parameters.values()), kwargs, args_key, path)
    _check_types(target, kwargs, args_key, path)
    return functools.partial(target, **kwargs)


def resolve(spec: Mapping[str, Any], key: str, injected: int = 0,
            args_key: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The target and its checked (nested objects built) keyword arguments, without calling it."""
    target = import_object(spec["class_path"], f"{key}.class_path")
    if not callable(target):
        raise ConfigError(f"{key}.class_path", f'is "{spec["class_path"]}", a {type(target).__name__}; '
                          "expected a class or a function to call.")
    args_key = args_key or f"{key}.init_args"
    init_args = spec.get("init_args") or {}
    kwargs = {name: build_nested(value, f"{args_key}.{name}") for name, value in init_args.items()}
    check_init_args(target, kwargs, key, spec["class_path"], injected, args_key)
    return target, kwargs


def build_nested(value: Any, key: str) -> Any:
    """Build specs found inside an argument value (mappings with a class_path), recursively."""
    if isinstance(value, Mapping):
        if "class_path" in value:
            unknown = set(value) - {"class_path", "init_args", "call"}
            if unknown:
                raise ConfigError(f"{key}.{sorted(unknown)[0]}", "is not a known key; expected class_path, init_args, "
                                  "call.")
            return instantiate(value, key)
        return {k: build_nested(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [build_nested(v, f"{key}.{i}") for i, v in enumerate(value)]
    return value


# ---------------------------------------------------------------------- data
@dataclass
class Loaders:
    """The loaders a data factory produced (any may be None)."""

    train: Any = None
    val: Any = None
    test: Any = None
    predict: Any = None
    options: frozenset = frozenset()  # the data.* loader options that reach the loaders (adaptrain tune writes them)


_LOADER_OPTIONS = ("batch_size", "eval_batch_size", "num_workers", "pin_memory", "prefetch_factor",
                   "persistent_workers")


def build_loaders(spec: Mapping[str, Any], seed: int | None = None, key: str = "data") -> Loaders:
    """Call the data factory and turn what it returns into :class:`Loaders`.

    The factory (``class_path``) may return: an object with ``loaders(batch_size=..., ...)``
    (:class:`adaptrain.datasets.Splits`); an object with ``train_dataloader()`` (a Lightning-style
    DataModule); a tuple ``(train, val[, test])``; a dict with keys train/val/test/predict; or a
    single train loader. Any ``torch.utils.data.Dataset`` among them is wrapped in a DataLoader
    using ``batch_size`` (default 64), ``num_workers``, ``pin_memory``, ``prefetch_factor`` and
    ``persistent_workers`` (the last two only with workers); the train one shuffles
    with a generator seeded by ``seed``.
    """
    result = instantiate(spec, key)
    options = {name: spec.get(name) for name in _LOADER_OPTIONS if spec.get(name) is not None}
    used, applicable = False, frozenset()
    if callable(getattr(result, "loaders", None)):
        accepted = inspect.signature(result.loaders).parameters
        applicable = frozenset(name for name in _LOADER_OPTIONS if name in accepted)
        kwargs = {"batch_size": 64, **{k: v for k, v in options.items() if k in accepted}}
        if seed is not None and "seed" in accepted:
            kwargs["seed"] = seed
        result, used = call(result.loaders, key, f"{spec['class_path']}(...).loaders", **kwargs), True
    elif callable(getattr(result, "train_dataloader", None)):
        if callable(getattr(result, "setup", None)):
            result.setup("fit")
        result = {name: getattr(result, f"{name}_dataloader")() for name in ("train", "val", "test", "predict")
                  if callable(getattr(result, f"{name}_dataloader", None))}
    if isinstance(result, Mapping):
        unknown = set(result) - set(Loaders.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{key}.class_path", f"returned a dict with keys {sorted(map(str, unknown))}; "
                              "expected keys among train, val, test, predict.")
        parts = dict(result)
    elif isinstance(result, (tuple, list)) and 1 <= len(result) <= 3 and \
            all(part is None or _is_loader(part) for part in result):
        parts = dict(zip(("train", "val", "test"), result))
    elif isinstance(result, (Dataset, DataLoader)) or hasattr(result, "__iter__"):
        parts = {"train": result}
    else:
        raise ConfigError(f"{key}.class_path", f"returned {type(result).__name__}; expected Splits, "
                          "(train, val[, test]) loaders or data sets, or a dict of them.")
    for name, part in parts.items():
        if isinstance(part, Dataset):
            parts[name] = _wrap_dataset(part, name, options, seed, key)
            used, applicable = True, frozenset(_LOADER_OPTIONS)
    if options and not used:
        name = next(iter(options))
        raise ConfigError(f"{key}.{name}", f"is set, but {spec['class_path']} returns loaders that already have "
                          f"their own; pass it in {key}.init_args instead (or remove it).")
    return Loaders(**parts, options=applicable)


def _wrap_dataset(part: Dataset, name: str, options: Mapping[str, Any], seed: int | None, key: str) -> DataLoader:
    """A data set in a DataLoader with the data section's options (train: shuffled by a seeded generator)."""
    train = name == "train" and not isinstance(part, IterableDataset)
    if not isinstance(part, IterableDataset) and hasattr(part, "__len__") and len(part) == 0:
        raise ConfigError(f"{key}.class_path", f"returned an empty {name} data set "
                          f"({type(part).__name__} of 0 samples); expected at least one sample.")
    size = options.get("batch_size", 64) if name == "train" else options.get(
        "eval_batch_size", options.get("batch_size", 64))
    workers = options.get("num_workers", 0)
    return DataLoader(part, batch_size=size, shuffle=train, generator=_generator(seed) if train else None,
                      num_workers=workers, pin_memory=options.get("pin_memory", False),
                      prefetch_factor=options.get("prefetch_factor") if workers else None,
                      persistent_workers=bool(options.get("persistent_workers")) and workers > 0)


def _is_loader(obj: Any) -> bool:
    """A data set or an iterable of batches (not itself a batch: a tensor, tuple, list or dict)."""
    return isinstance(obj, Dataset) or (hasattr(obj, "__iter__") and
                                        not isinstance(obj, (torch.Tensor, tuple, list, Mapping, str)))


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _reject_unknown_arguments(params: list[inspect.Parameter], kwargs: Mapping[str, Any], args_key: str,
                              path: str) -> None:
    """A ConfigError for the first keyword argument ``path`` does not take (unless it takes ``**kwargs``)."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = [p.name for p in params if p.kind in _NAMED]
    for name in kwargs:
        if name not in named:
            close = difflib.get_close_matches(name, named, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else "."
            raise ConfigError(f"{args_key}.{name}", f"is not an argument of {path}{hint} "
                              f"Expected: {', '.join(named) or '(no arguments)'}.")
