"""An experiment from a resolved config: build every object, then open the run folder.

:func:`build` imports, checks and constructs everything the config names and writes nothing, so
a bad config fails before any file exists; :func:`open_run` then creates the run folder (or, for a
``fit`` resumed from a run folder's checkpoint, reopens that folder), saves the resolved config in
it and tells the trainer (``trainer.run_dir``) and the loggers where it is. The
:class:`~adaptrain.loggers.run_dir.OpenedRun` it returns undoes that when the run fails before
its first optimizer step.

Example:
    >>> from adaptrain.cli.config import load_config
    >>> config = load_config(["examples/digits_mlp.yaml"], ["loggers=null"])  # doctest: +SKIP
    >>> built = build(config, "fit")  # doctest: +SKIP
    >>> run = open_run(built, "fit")  # doctest: +SKIP
    >>> built.trainer.fit(built.loaders.train, built.loaders.val)  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import functools
import inspect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from adaptrain.checkpoint.compat import model_mismatch
from adaptrain.checkpoint.io import load_checkpoint, load_weights
from adaptrain.cli.config import Config, flatten, to_yaml
from adaptrain.cli.config_checks import check_spec
from adaptrain.cli.instantiate import Loaders, build_loaders, call, instantiate, resolve
from adaptrain.core.callback import Callback
from adaptrain.core.preflight import check_monitors, writes_records
from adaptrain.core.state import seed_everything
from adaptrain.core.trainer import Trainer
from adaptrain.distributed import env as distributed
from adaptrain.errors import CheckpointError, ConfigError
from adaptrain.loggers import BUILTIN_LOGGERS
from adaptrain.loggers.base import Logger, RunInfo
from adaptrain.loggers.run_dir import OpenedRun, RunDir, open_run_dir


@dataclass
class Built:
    """A config turned into objects, before anything is written."""

    config: dict[str, Any]
    trainer: Trainer
    loaders: Loaders
    loggers: list[Callback]  # the CSV logger first, then the configured ones
    checkpoint: dict[str, Any] | None = None  # fit's ckpt_path, read once (checked before any folder exists)


def build(config: dict[str, Any], verb: str = "fit") -> Built:
    """Import, check and construct everything the config names; nothing is written to disk.

    Seeds python/numpy/torch first (a seed is drawn and recorded when the config has none), so
    the model's initial weights and the data order are reproducible from the saved config.
    A :class:`ConfigError` names the key, and the file or "command line" that set it.
    """
    try:
        return _build(config, verb)
    except ConfigError as error:
        raise (config.error(error) if isinstance(config, Config) else error) from error.__cause__


def _build(config: dict[str, Any], verb: str) -> Built:
    trainer_args = dict(config["trainer"])
    if trainer_args["seed"] is None:
        trainer_args["seed"] = config["trainer"]["seed"] = random.SystemRandom().randrange(2**31)
    seed_everything(trainer_args["seed"])
    model = instantiate(config["model"], "model")
    _expect(model, torch.nn.Module, "model", "a torch.nn.Module")
    loaders = build_loaders(config["data"], trainer_args["seed"])
    _check_loaders(loaders, verb, config["data"]["class_path"])
    optimizer = instantiate(config["optimizer"], "optimizer", model.parameters())
    _expect(optimizer, torch.optim.Optimizer, "optimizer", "a torch.optim.Optimizer")
    scheduler = _scheduler(config["scheduler"], optimizer)
    criterion = instantiate(config["criterion"], "criterion")
    metrics = {name: instantiate(spec, f"metrics.{name}") if "class_path" in spec else
               {sub: instantiate(s, f"metrics.{name}.{sub}") for sub, s in spec.items()}
               for name, spec in config["metrics"].items()}
    callbacks = [instantiate(spec, f"callbacks.{i}") for i, spec in enumerate(config["callbacks"])]
    for i, callback in enumerate(callbacks):
        _expect(callback, Callback, f"callbacks.{i}", "an adaptrain.Callback")
    logger_specs = _logger_specs(config["loggers"]) if verb not in ("profile", "bench", "tune", "lr-find") else []
    loggers = [instantiate(spec, key, args_key=args_key) for key, spec, args_key in logger_specs]
    for (key, _, _), logger in zip(logger_specs, loggers):
        _expect(logger, Callback, key, "an adaptrain.Callback (loggers are callbacks)")
    try:
        trainer = Trainer(model, optimizer, criterion, metrics=metrics, scheduler=scheduler,
                          callbacks=[*loggers, *callbacks], **trainer_args)
    except (ValueError, TypeError) as error:
        field = getattr(error, "field", None)  # the rule table's errors name their setting
        raise ConfigError(f"trainer.{field}" if field else "trainer", f"was rejected: {error}") from error
    if verb == "fit":
        _check_monitors(callbacks, trainer, loaders)
    checkpoint = _check_checkpoint(config["ckpt_path"], model, verb) if config["ckpt_path"] is not None else None
    return Built(config, trainer, loaders, loggers, checkpoint)


def _check_monitors(callbacks: list[Callback], trainer: Trainer, loaders: Loaders) -> None:
    """Each callback's ``val_`` monitor against the keys one val batch produces, before the run folder
    exists: ``monitor: val_accuracy`` fails here with its key, not after the folder was made.

    Costs one val batch (fit's own sanity pass repeats it). A val batch the model cannot take is left
    to fit, which reports it; so are the train_ monitors and the plateau scheduler's.
    """
    watched = [(f"callbacks.{i}.init_args.monitor", cb.monitor) for i, cb in enumerate(callbacks)
               if isinstance(getattr(cb, "monitor", None), str) and cb.monitor.startswith("val_")]
    if not watched or any(writes_records(cb) for cb in trainer.callbacks):
        return  # a callback of the user's may add the value to the record itself
    if loaders.val is None:
        key, name = watched[0]
        raise ConfigError(key, f'is "{name}", but data.class_path gives no val loader; monitor a train_ value, '
                          "or give the data a validation split.")
    if isinstance(loaders.val, Iterator):
        return  # a one-pass iterator: reading a batch here would take it from training
    try:
        results = trainer.test(itertools.islice(loaders.val, 1))
    except Exception:  # noqa: BLE001 - fit's sanity pass reports a val batch the model cannot take
        return
    check_monitors(watched, [f"val_{key[len('test_'):]}" for key in results])


def _expect(obj: Any, cls: type, key: str, what: str) -> None:
    if not isinstance(obj, cls):
        raise ConfigError(f"{key}.class_path", f"built a {type(obj).__name__}; expected {what}.")


def first_loader(*loaders: Any) -> Any:
    """The first loader that is not None (a DataLoader's truth value is its length: no ``or``)."""
    return next((loader for loader in loaders if loader is not None), None)


def _check_loaders(loaders: Loaders, verb: str, path: str) -> None:
    needed = {"fit": "train", "validate": "val", "test": "test", "profile": "train", "bench": "train",
              "tune": "train", "lr-find": "train"}.get(verb)
    if verb == "predict" and first_loader(loaders.predict, loaders.test, loaders.val) is None:
        needed = "predict"
    if needed and getattr(loaders, needed) is None:
        raise ConfigError("data.class_path",
                          f'is "{path}", which gives no {needed} loader; `adaptrain {verb}` needs one.')


def _scheduler(spec: Mapping[str, Any] | None, optimizer: Any) -> Any:
    """A factory ``f(optimizer, total_steps=...)`` for the Trainer (it fills in OneCycleLR's steps)."""
    if spec is None:
        return None
    target, kwargs = resolve(spec, "scheduler", injected=1)
    factory = functools.partial(target, **kwargs)
    # Build one on a throwaway optimizer now, so a bad argument fails before the run folder exists.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optimizer.defaults.get("lr", 0.1), momentum=0.9)
    extra = {"total_steps": 100} if "total_steps" not in kwargs and _accepts(target, "total_steps") else {}
    call(factory, "scheduler", spec["class_path"], probe, **extra)
    if spec.get("interval") is None and spec.get("monitor") is None:
        return factory
    return {"scheduler": factory, "interval": spec.get("interval"), "monitor": spec.get("monitor")}


def _accepts(target: Any, name: str) -> bool:
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _logger_specs(section: Any) -> list[tuple[str, dict[str, Any], str | None]]:
    """``loggers`` (a list of names/specs, or {name: options}) -> [(key, spec, args_key)], CSV first.

    ``args_key`` is where a named logger's options live ({mlflow: {tracking_uri: ...}} has them at
    ``loggers.mlflow``, not ``loggers.mlflow.init_args``), so errors name the key the user wrote.
    """

    def builtin(name: Any, options: Any, key: str) -> tuple[str, dict[str, Any], str | None] | None:
        if isinstance(options, Mapping) and "class_path" in options:
            check_spec(options, key, _fail)
            return key, dict(options), None
        if name not in BUILTIN_LOGGERS:
            close = difflib.get_close_matches(str(name), list(BUILTIN_LOGGERS), n=1)
            hint = f'did you mean "{close[0]}"? ' if close else ""
            _fail(key, f"names no logger; {hint}expected one of {', '.join(BUILTIN_LOGGERS)}, or a class_path.")
        if options is False:
            return None  # `loggers.mlflow=false` on the command line turns a logger off
        if options is not None and options is not True and not isinstance(options, Mapping):
            _fail(key, f"is {options!r}; expected a mapping of {name} logger options, true, false or null.")
        init_args = dict(options) if isinstance(options, Mapping) else {}
        return key, {"class_path": BUILTIN_LOGGERS[name], "init_args": init_args}, key

    specs: list[tuple[str, dict[str, Any], str | None] | None] = []
    if isinstance(section, Mapping):
        specs = [builtin(name, options, f"loggers.{name}") for name, options in section.items()]
    elif isinstance(section, list):
        for i, item in enumerate(section):
            if isinstance(item, Mapping) and "class_path" not in item and len(item) == 1:
                (name, options), = item.items()
                specs.append(builtin(name, options, f"loggers.{i}.{name}"))
            else:
                name, options = (item, None) if isinstance(item, str) else (None, item)
                specs.append(builtin(name, options, f"loggers.{i}"))
    kept = [spec for spec in specs if spec is not None]
    if not any(spec["class_path"] == BUILTIN_LOGGERS["csv"] for _, spec, _ in kept):
        kept.insert(0, ("loggers.csv", {"class_path": BUILTIN_LOGGERS["csv"]}, None))
    return kept


def _fail(key: str, message: str) -> None:
    raise ConfigError(key, message)


def _check_checkpoint(ckpt_path: str, model: Any, verb: str) -> dict[str, Any] | None:
    """Check ``ckpt_path`` fits the model; for fit, return its contents (so it is read once)."""
    if ckpt_path == "last":
        raise ConfigError("ckpt_path", 'is "last", which the CLI cannot resolve (it does not know which run); '
                          "expected a checkpoint file, e.g. runs/<experiment>/<run>/checkpoints/last.ckpt "
                          "(fit then continues that run).")
    if not Path(ckpt_path).is_file():
        raise ConfigError("ckpt_path", f'is "{ckpt_path}", which is not a file.')
    if verb == "fit":  # checked here, before the run folder exists; fit(ckpt_path=...) checks the rest
        try:
            contents = load_checkpoint(ckpt_path)
        except CheckpointError as error:
            raise ConfigError("ckpt_path", f"could not be loaded: {error}") from error
        problem = model_mismatch(model, contents["model"])
        if problem:
            raise ConfigError("ckpt_path", f'is "{ckpt_path}", which {problem}')
        return contents
    if verb in ("validate", "test", "predict"):
        try:
            if ckpt_path.endswith(".safetensors"):
                load_weights(model, ckpt_path)
            else:
                model.load_state_dict(load_checkpoint(ckpt_path)["model"])
        except (CheckpointError, RuntimeError) as error:
            raise ConfigError("ckpt_path", f"could not be loaded: {error}") from error
    return None


def resumable_run(ckpt_path: str | None) -> RunDir | None:
    """The run folder a checkpoint lives in (``<run>/checkpoints/<file>`` next to ``<run>/config.yaml``).

    Example:
        >>> resumable_run("elsewhere/model.ckpt") is None
        True
    """
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints" or not (path.parent.parent / "config.yaml").is_file():
        return None
    return RunDir.at(path.parent.parent)


def open_run(built: Built, verb: str, new_run: bool = False) -> OpenedRun | None:
    """Create the run folder, save the resolved config there, and tell the trainer and loggers.

    ``fit`` from a checkpoint of a run folder continues that run (``new_run=False``): the folder
    is reused, the config is saved as ``config.resume-<n>.yaml`` beside the first one, and the
    MLflow logger finds its run id there. ``new_run=True`` always opens a new folder.

    Under torchrun only rank zero does this (and gets the OpenedRun); every rank calls it, starts
    the process group, and the others receive rank zero's folder (a broadcast) as ``trainer.run_dir``,
    so ModelCheckpoint and ``trainer.run_dir`` agree everywhere. When rank zero fails here, it reports
    its error and the others exit with the same code, silently.
    """
    if not distributed.ensure_process_group(built.trainer.device):
        return _open_run(built, verb, new_run) if distributed.is_global_zero() else None
    if not distributed.is_global_zero():
        path, code = distributed.broadcast_object(None)
        if path is None:
            raise SystemExit(code)
        built.trainer.run_dir = Path(path)
        return None
    try:
        opened = _open_run(built, verb, new_run)
    except BaseException as error:
        distributed.broadcast_object((None, 2 if isinstance(error, (ConfigError, CheckpointError)) else 1))
        raise
    distributed.broadcast_object((str(opened.path), 0))
    return opened


def _open_run(built: Built, verb: str, new_run: bool) -> OpenedRun:
    config = built.config
    previous = resumable_run(config["ckpt_path"]) if verb == "fit" and not new_run else None
    if previous is not None:
        opened = OpenedRun(previous, resumed=True)
        run, saved = previous, previous.next_resume_config()
    else:
        opened = open_run_dir(config["root_dir"], config["experiment"], config["run_name"], verb)
        run = opened.run
        saved = run.config
    opened.remember()  # what the folder held before this command wrote to it
    config["run_name"] = run.name  # re-running the saved config then gets "<name>-2"
    saved.write_text(to_yaml(config))
    opened.written.append(saved)
    built.trainer.run_dir = run.path  # ModelCheckpoint saves under <run_dir>/checkpoints
    info = RunInfo(config["experiment"], run.name, run, Path(config["root_dir"]), flatten(config), verb)
    for logger in built.loggers:
        if isinstance(logger, Logger):
            logger.bind(info)
    return opened
