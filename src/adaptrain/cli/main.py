"""The ``adaptrain`` command: run experiments from YAML configs, with ``key.sub=value`` overrides.

    adaptrain fit      --config run.yaml [trainer.max_epochs=3 optimizer.init_args.lr=0.01 ...]
    adaptrain validate --config run.yaml ckpt_path=runs/exp/run/checkpoints/last.ckpt
    adaptrain test | predict (same as validate), and --print-config to see the resolved config
    adaptrain profile  --config run.yaml            params, FLOPs, latency, memory of the model
    adaptrain bench    --config run.yaml --batch-sizes 16,32,64 --precisions 32,16-mixed,bf16-mixed
    adaptrain forecast runs/exp/run --metric val_acc --at 50
    adaptrain tune     --config run.yaml [--budget 60] [--output tuned.yaml] [--keep-batch-size] [--lr]
                                                           short measured trials -> tuned.yaml for `fit`
    adaptrain lr-find  --config run.yaml [--output lr_find.png]   sweep the LR on the model and data; suggest one
    adaptrain fit      --config run.yaml --devices 2       2 processes on this node (torchrun --standalone)
    adaptrain fit      --config run.yaml --devices 4 --num-nodes 2 --node-rank 0 --master-addr node0
                                                           the same on node1 with --node-rank 1 (c10d rendezvous)
    adaptrain slurm    --config run.yaml --nodes 2 --gpus-per-node 4 --time 12:00:00 [--submit]
                                                           an sbatch script: srun + torchrun, requeue on preemption

Everything is imported, checked and built before the run folder is created: a bad config exits
with code 2 and one line naming the key, the file and what was expected, and writes nothing.
An error while running is one line too (the kind of error, where, and what it said); the full
traceback goes to the run folder's ``train.log`` and, with ``--debug``, to stderr. A run that
fails before its first optimizer step leaves nothing behind (no run folder, no MLflow run).

Exit codes:
    0    done
    1    the run failed: an error while training or evaluating (the model on a batch, the batch
         structure, a NaN loss, a callback, the disk ...)
    2    a bad config, argument or checkpoint, or a missing optional extra; before any work, or
         found once running (a monitored value no loader produces)
    130  interrupted (Ctrl-C); after saving a checkpoint, 143 on SIGTERM, 138 on SLURM's SIGUSR1

``--devices N`` (see :mod:`adaptrain.cli.launch`) reruns the command under ``torchrun`` and exits with
its exit code; under torchrun or srun (``WORLD_SIZE`` > 1) the command runs as it is, and only rank
zero creates the run folder, writes in it and prints.

``fit`` with ``ckpt_path=runs/<exp>/<run>/checkpoints/<file>`` continues that run: the same folder
(the config saved as ``config.resume-<n>.yaml``) and the same MLflow run; ``--new-run`` opens a new one.

Example:
    >>> main(["fit", "--config", "no-such.yaml"])
    2
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import torch

from adaptrain.checkpoint.io import CheckpointError
from adaptrain.cli import launch
from adaptrain.cli.config import COMMAND_LINE, load_config, to_yaml
from adaptrain.cli.experiment import Built, build, first_loader, open_run
from adaptrain.cli.instantiate import instantiate
from adaptrain.cli.lr_find import add_lr_find_parser, run_lr_find
from adaptrain.cli.slurm import add_slurm_parser
from adaptrain.cli.tune import add_tune_parser, run_tune
from adaptrain.core.batching import describe, unpack_batch
from adaptrain.core.history import format_values
from adaptrain.core.losses import split_loss
from adaptrain.distributed import env as distributed
from adaptrain.errors import ConfigError, MissingExtraError
from adaptrain.loggers.base import Logger
from adaptrain.loggers.run_dir import OpenedRun

_RUN_VERBS = ("fit", "validate", "test", "predict")
#: Errors that mean "the input is wrong" (exit 2): they name the key, file or package to fix.
_INPUT_ERRORS = (ConfigError, MissingExtraError, CheckpointError)
_EXIT_HELP = ("exit codes: 0 done; 1 the run failed (the traceback is in the run folder's train.log, "
              "--debug prints it); 2 bad config, arguments or checkpoint, or a missing extra; "
              "130 interrupted; 143 / 138 stopped by SIGTERM / SIGUSR1 after saving a checkpoint")


class RunFailed(Exception):
    """An error out of a verb's run, with where it happened and what the run folder kept."""

    def __init__(self, error: Exception, where: str, log: Path | None, discarded: Path | None) -> None:
        super().__init__(str(error))
        self.error, self.where, self.log, self.discarded = error, where, log, discarded


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # Overrides may come before and after options: argparse leaves the later ones over.
        unknown = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
        args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # what --devices reruns under torchrun
    except SystemExit as exit_:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exit_.code or 0)
    if os.getcwd() not in sys.path:  # class_path may name a module in the current folder, as `python -m` allows
        sys.path.insert(0, os.getcwd())
    grouped = _group_started()
    try:
        return args.run(args)
    except Exception as error:  # noqa: BLE001 - every error becomes one line and an exit code
        return _report(error, getattr(args, "debug", False))
    except KeyboardInterrupt:
        _echo("adaptrain: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # e.g. a checkpoint saved on SIGTERM: 128 + the signal number
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        if not grouped and _group_started():  # this command started it (NCCL warns when not ended)
            distributed.end_process_group()


def _group_started() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _report(error: Exception, debug: bool) -> int:
    """Print ``error`` as one line (and where its traceback is); return its exit code."""
    failed = error if isinstance(error, RunFailed) else None
    cause = failed.error if failed else error
    code = 2 if isinstance(cause, _INPUT_ERRORS) else 1
    if debug:
        traceback.print_exception(cause, file=sys.stderr)
    rank = "" if distributed.is_global_zero() else f" (rank {distributed.rank()})"  # which worker, under torchrun
    print(f"adaptrain: error{rank}: {failed.where + ': ' if failed else ''}{_describe(cause)}", file=sys.stderr)
    if failed and failed.log is not None:
        print(f"adaptrain: the traceback is in {failed.log}{'' if debug else ' (--debug prints it here)'}",
              file=sys.stderr)
    elif failed and failed.discarded is not None:
        print(f"adaptrain: nothing was kept ({failed.discarded} removed)"
              f"{'' if debug else '; --debug prints the traceback'}", file=sys.stderr)
    elif (failed or code == 1) and not debug:
        print("adaptrain: --debug prints the traceback", file=sys.stderr)
    return code


def _describe(error: BaseException) -> str:
    """``Type: message`` (adaptrain's input errors read as a sentence already), with any notes."""
    text = str(error).strip() if isinstance(error, _INPUT_ERRORS) else f"{type(error).__name__}: {str(error).strip()}"
    notes = [note for note in getattr(error, "__notes__", []) if note not in text]
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptrain", description="Train PyTorch models from YAML configs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: adaptrain fit --config examples/digits_mlp.yaml trainer.max_epochs=3 "
               "optimizer.init_args.lr=0.01\n" + _EXIT_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True,
                                  metavar="{fit,validate,test,predict,profile,bench,forecast,lr-find,slurm,tune}")
    config_args = argparse.ArgumentParser(add_help=False)
    config_args.add_argument("-c", "--config", action="append", required=True, metavar="FILE",
                             help="YAML config; repeat to merge several (later files win)")
    config_args.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    config_args.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    config_args.add_argument("--debug", action="store_true", help="on an error, also print its full traceback")
    helps = {"fit": "train, validating every epoch", "validate": "evaluate on the val loader",
             "test": "evaluate on the test loader", "predict": "save model outputs to predictions.pt"}
    for verb in _RUN_VERBS:
        sub = verbs.add_parser(verb, parents=[config_args], help=helps[verb], epilog=_EXIT_HELP)
        sub.set_defaults(run=_run_verb)
        launch.add_launch_arguments(sub)
        if verb == "fit":
            sub.add_argument("--new-run", action="store_true",
                             help="with ckpt_path=<run>/checkpoints/<file>: resume into a new run folder and "
                                  "MLflow run instead of continuing that run")
    prof = verbs.add_parser("profile", parents=[config_args], help="params, FLOPs, latency and memory of the model")
    prof.add_argument("--warmup", type=int, default=10)
    prof.add_argument("--runs", type=int, default=50)
    prof.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    prof.set_defaults(run=_profile)
    bench = verbs.add_parser("bench", parents=[config_args], help="time training steps per precision x batch size")
    bench.add_argument("--precisions", nargs="+", type=_comma_list(str), default=[["32", "16-mixed", "bf16-mixed"]],
                       help="e.g. 32,16-mixed,bf16-mixed (commas or spaces)")
    bench.add_argument("--batch-sizes", nargs="+", type=_comma_list(int), default=[[16, 32, 64]],
                       help="e.g. 16,32,64 (commas or spaces)")
    bench.add_argument("--compile", action="store_true", help="also wrap the model in torch.compile")
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--csv", metavar="FILE")
    bench.add_argument("--markdown", metavar="FILE")
    bench.set_defaults(run=_bench)
    fc = verbs.add_parser("forecast", help="forecast a metric of a run at a later epoch")
    fc.add_argument("history", help="a run folder or its history.csv")
    fc.add_argument("--metric", required=True, help="a column of history.csv, e.g. val_acc")
    fc.add_argument("--at", type=float, required=True, help="the epoch to forecast (history.csv counts epochs)")
    fc.add_argument("--mode", choices=["min", "max"], help="default: min for losses, else max")
    fc.add_argument("--plot", metavar="PNG", help="also plot the fits and the interval")
    fc.add_argument("--debug", action="store_true", help="on an error, also print its full traceback")
    fc.set_defaults(run=_forecast)
    add_lr_find_parser(verbs, [config_args], _EXIT_HELP).set_defaults(run=_lr_find)
    add_slurm_parser(verbs, [config_args], _EXIT_HELP)
    add_tune_parser(verbs, [config_args], _EXIT_HELP).set_defaults(run=_tune)
    return parser


# ---------------------------------------------------------------------- verbs
def _load(args: argparse.Namespace) -> dict[str, Any] | None:
    config = load_config(args.config, args.overrides)
    if args.print_config:
        _echo(to_yaml(config), end="")
        return None
    return config


def _echo(*values: Any, **options: Any) -> None:
    """``print`` on rank zero only (every process of a torchrun job runs the same command)."""
    if distributed.is_global_zero():
        print(*values, **options)


def _run_verb(args: argparse.Namespace) -> int:
    plan = launch.launch_plan(args)  # bad launch flags: exit 2, one line, before anything else
    config = _load(args)  # checked here too when relaunching: a bad config starts no process
    if config is None:
        return 0
    if launch.should_launch(plan):
        return launch.relaunch(args.argv, plan)
    built = build(config, args.verb)
    run = open_run(built, args.verb, new_run=getattr(args, "new_run", False))
    trainer, loaders = built.trainer, built.loaders
    say = trainer.print
    if run is not None:
        resumed = "; continuing the run in it (--new-run for a new folder)" if run.resumed else ""
        say(f"run folder: {run.path}  (seed {config['trainer']['seed']}{resumed})")
    if args.verb != "fit" and config["ckpt_path"] is None:
        say(f"note: no ckpt_path given: {args.verb} uses the model's initial weights "
            "(pass ckpt_path=runs/<experiment>/<run>/checkpoints/<file>).")
    try:
        if args.verb == "fit":
            trainer.fit(loaders.train, loaders.val, ckpt_path=built.checkpoint or config["ckpt_path"])
        else:
            _evaluate(built, args.verb, run)
    except Exception as error:
        discarded = run is not None and run.discard()  # failed before training: leave nothing behind
        log = run.run.log if run is not None and not discarded and run.run.log.is_file() else None
        removed = (run.written[0] if run.resumed else run.path) if run is not None and discarded else None
        raise RunFailed(error, _where_failed(trainer, args.verb, discarded), log, removed) from error
    except BaseException:  # Ctrl-C, or a signal's SystemExit: its exit code stands
        if run is not None:
            run.discard()
        raise
    for logger in built.loggers:
        where = _where(logger)
        if where:
            say(where)
    return 0


def _where_failed(trainer: Any, verb: str, discarded: bool) -> str:
    """``fit failed at epoch 2, batch 17 (optimizer step 33)``, or before its first step."""
    if discarded:
        return f"{verb} failed before its first optimizer step" if verb == "fit" else f"{verb} failed"
    if verb != "fit":
        return f"{verb} failed"
    state = trainer.state
    return (f"fit failed at epoch {state.epoch + 1}, batch {state.batch_idx} "
            f"(optimizer step {state.global_step})")


def _evaluate(built: Built, verb: str, run: OpenedRun | None) -> None:
    """validate / test / predict; the loggers open once the results exist (a failure leaves no run)."""
    trainer, loaders = built.trainer, built.loaders
    if verb == "predict":
        outputs = trainer.predict(first_loader(loaders.predict, loaders.test, loaders.val))
    else:
        results = getattr(trainer, verb)(getattr(loaders, "val" if verb == "validate" else "test"))
    loggers = sorted((lg for lg in built.loggers if isinstance(lg, Logger)), key=lambda lg: lg.order)
    for logger in loggers:
        logger.start(trainer)
    status, error = "FAILED", None
    try:
        if verb == "predict":
            if run is not None:
                torch.save(outputs, run.path / "predictions.pt")
            saved = run.path / "predictions.pt" if run else "(not saved)"
            trainer.print(f"predictions: {describe(outputs)} -> {saved}")
        else:
            for logger in loggers:
                logger.log_results(verb, results)
            trainer.print(f"{verb}: {format_values(results)}")
        status = "FINISHED"
    except BaseException as raised:
        error = raised
        raise
    finally:
        for logger in loggers:
            logger.finish(status, error)


def _where(logger: Any) -> str | None:
    if getattr(logger, "run_id", None):
        return f"mlflow: run {logger.run_id} in {logger.client.tracking_uri}"
    if getattr(logger, "writer", None) is not None:
        return f"tensorboard: tensorboard --logdir {logger.log_dir}"
    return None


def _tune(args: argparse.Namespace) -> int:
    config = _load(args)
    return 0 if config is None else run_tune(args, config, _echo)


def _profile(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 0
    from adaptrain.profiling.profile import profile  # imported here: only this verb pays for it
    built = build(config, "profile")
    inputs, _ = unpack_batch(next(iter(built.loaders.train)), "train_loader")
    result = profile(built.trainer.model, example_inputs=inputs, device=built.trainer.device,
                     warmup=args.warmup, runs=args.runs)
    if not distributed.is_global_zero():
        return 0  # every rank measured; rank zero prints and writes
    result.print()
    if args.json:
        Path(args.json).write_text(result.to_json())
    return 0


def _comma_list(kind: type) -> Any:
    """An argparse type: "16,32" -> [16, 32] (so both "16,32" and "16 32" work)."""
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} values separated by commas; "
                                             f"received {text!r}") from None
    return parse


def _bench(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 0
    from torch.utils.data import DataLoader

    from adaptrain.profiling.bench import run_bench
    built = build(config, "bench")
    train = built.loaders.train
    if not isinstance(train, DataLoader):
        raise ConfigError("data.class_path", "gives a train loader that is not a torch DataLoader; "
                          "`adaptrain bench` re-batches its data set at each batch size.")

    def make_batch(batch_size: int) -> tuple[Any, Any]:
        loader = DataLoader(train.dataset, batch_size=batch_size, collate_fn=train.collate_fn)
        return unpack_batch(next(iter(loader)), "train_loader")

    criterion = built.trainer.criterion
    precisions = [p for group in args.precisions for p in group]
    batch_sizes = [b for group in args.batch_sizes for b in group]
    table = run_bench(lambda: instantiate(config["model"], "model"), make_batch, precisions=precisions,
                      batch_sizes=batch_sizes, device=built.trainer.device,
                      compile=args.compile or config["trainer"]["compile"],
                      steps=args.steps, warmup=args.warmup,
                      criterion=lambda out, tgt: split_loss(criterion(out, tgt))[0],
                      optimizer_factory=lambda params: instantiate(config["optimizer"], "optimizer", params))
    run = open_run(built, "bench")  # only once the table exists: a failed bench leaves nothing behind
    if not distributed.is_global_zero():
        return 0  # rank zero prints and writes the table
    markdown = args.markdown or (run.path / "bench.md" if run else None)
    csv_path = args.csv or (run.path / "bench.csv" if run else None)
    print(table.to_markdown(markdown), end="")
    if csv_path:
        table.to_csv(csv_path)
        print(f"written: {markdown}, {csv_path}")
    return 0


def _forecast(args: argparse.Namespace) -> int:
    from adaptrain.tuning.forecasting import ForecastError, forecast_history_file

    path = Path(args.history)
    path = path / "history.csv" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError("history", f'is "{args.history}"; expected a run folder or its history.csv.', COMMAND_LINE)
    try:
        fc = forecast_history_file(path, args.metric, args.at, mode=args.mode, plot=args.plot)
    except ForecastError as error:
        _echo(f"adaptrain: {error}", file=sys.stderr)
        return 1
    _echo(f"{fc.metric} at epoch {fc.at:g}: {fc.value:.4g}  ({fc.level:.0%} interval {fc.low:.4g} .. {fc.high:.4g}; "
          f"fitted on epochs {fc.segment_start:g}-{fc.epochs[-1]:g})")
    for name, fit in sorted(fc.families.items(), key=lambda kv: -kv[1].weight):
        if fit.weight > 0:
            _echo(f"  {name:<17} weight {fit.weight:.2f}  predicts {fit.prediction:.4g}")
    for reason in fc.reasons:
        _echo(f"  unreliable: {reason}")
    for note in fc.notes:
        _echo(f"  note: {note}")
    return 0


def _lr_find(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return 0
    return run_lr_find(args, config, _echo)


if __name__ == "__main__":  # python -m adaptrain.cli.main, as the console script does
    sys.exit(main())
