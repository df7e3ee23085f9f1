"""``adaptrain slurm``: write (and with ``--submit``, submit) an sbatch script that runs ``fit`` on SLURM nodes.

    adaptrain slurm --config run.yaml --nodes 2 --gpus-per-node 4 --time 12:00:00 [--submit] [overrides...]

The script runs one ``torchrun`` per node (``srun``, one task per node) with a c10d rendezvous on the
job's first node (``--rdzv_id $SLURM_JOB_ID``), each starting ``--gpus-per-node`` workers of
``adaptrain fit`` with the same configs and overrides. The config is loaded and checked first: a bad
one exits 2 with one line and no script is written.

Preemption and the time limit (``--signal=B:USR1@90``, ``--requeue``, ``--open-mode=append``):

- 90 s before the limit SLURM sends SIGUSR1 to the batch shell (``B:``); its trap passes it to every
  process of the job step with ``scancel --signal=USR1`` (with SLURM's usual process tracking,
  cgroups, that reaches the workers themselves). The shell, not the step, is signalled first because
  only the shell can then tell a preemption from a crash: torchrun exits 1 whichever way a worker
  stopped, so the workers' exit code 138 never reaches the script.
- ``torchrun`` is started with SIGUSR1 ignored (``bash -c 'trap "" USR1; exec "$@"'``, a fixed string;
  the user's values are its arguments): by default a SIGUSR1 would kill it, and SLURM then kills the
  workers while they save. torchrun does not forward it either: the workers get it once, directly
  (a second signal means "stop now, without a checkpoint").
- Each worker's ModelCheckpoint saves ``last.ckpt`` and stops with exit code 138 (see
  :mod:`adaptrain.callbacks.signals`, which also runs ``scontrol requeue`` itself under SLURM); the
  script requeues the job too when it was signalled and the step failed, in case that did not happen.
- The run folder is named ``<run_name or job name>-$SLURM_JOB_ID``, which a requeued job keeps: when
  ``<that folder>/checkpoints/last.ckpt`` exists, the script adds ``ckpt_path=<it>`` and ``fit``
  continues that run (same folder, ``config.resume-<n>.yaml``, same MLflow run).

What it costs: a cluster whose process tracking signals only the step's process group
(``proctrack/pgid``) does not reach torchrun's workers (torchrun starts each in its own session);
there the job stops at its limit without a final checkpoint (the last periodic one stays).

Every user value in the script's shell lines is quoted with :func:`shlex.quote`; the values in
``#SBATCH`` lines (which sbatch, not a shell, reads) are checked against a safe character set instead.

Example:
    >>> options = SlurmOptions(nodes=2, gpus_per_node=4, cpus_per_task=8, time="01:00:00", job_name="mnist")
    >>> [line for line in sbatch_lines(options) if "node" in line]
    ['#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=4']
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from adaptrain.cli.config import COMMAND_LINE, load_config, to_yaml
from adaptrain.cli.launch import DEFAULT_PORT, fail, integer, show
from adaptrain.errors import ConfigError

_SAFE_DIRECTIVE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,+-]*$")  # a job name or partition list in an #SBATCH line
_SLURM_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2})$")  # MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
SIGNAL_LEAD_S = 90  # seconds before the limit: enough to finish a step and write last.ckpt
#: Exit code of a worker stopped by SIGUSR1 after saving (128 + 10), see adaptrain.callbacks.signals.
PREEMPTED_EXIT = 138


@dataclass(frozen=True)
class SlurmOptions:
    """The job's shape and limits (checked by :func:`slurm_options`)."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str | None = None
    partition: str | None = None
    job_name: str = "adaptrain"
    port: int = DEFAULT_PORT


def add_slurm_parser(verbs: Any, parents: Sequence[argparse.ArgumentParser], epilog: str) -> None:
    """The ``slurm`` verb of the ``adaptrain`` parser."""
    sub = verbs.add_parser("slurm", parents=list(parents), epilog=epilog,
                           help="write (and --submit) an sbatch script running fit on SLURM nodes")
    sub.add_argument("--nodes", required=True, metavar="M", help="nodes (one torchrun each)")
    sub.add_argument("--gpus-per-node", required=True, metavar="N", help="GPUs per node, one worker process each")
    sub.add_argument("--cpus-per-task", metavar="C", help="CPUs per node's task (default: per GPU, 1 + "
                                                           "data.num_workers)")
    sub.add_argument("--time", metavar="HH:MM:SS", help="the time limit (default: the partition's)")
    sub.add_argument("--partition", metavar="P")
    sub.add_argument("--job-name", metavar="J", help="default: the config's experiment")
    sub.add_argument("--master-port", metavar="PORT", help=f"rendezvous port on the first node (default "
                                                            f"{DEFAULT_PORT})")
    sub.add_argument("--output", metavar="FILE", help="where to write the script (default: next to the last "
                                                       "--config, <its name>.sbatch)")
    sub.add_argument("--submit", action="store_true", help="submit it with sbatch and print the job id")
    sub.set_defaults(run=run_slurm)


def run_slurm(args: argparse.Namespace) -> int:
    """The ``slurm`` verb: check everything, write the script, submit it with ``--submit``."""
    config = load_config(args.config, args.overrides)  # a bad config: exit 2, nothing written
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    options = slurm_options(args, config)
    if args.submit and shutil.which("sbatch") is None:
        raise ConfigError("--submit", "needs sbatch, which is not on PATH; run this on a SLURM login node, or "
                          "drop --submit to only write the script.", COMMAND_LINE)
    target = Path(args.output) if args.output else Path(args.config[-1]).with_suffix(".sbatch")
    if target.is_dir():
        raise ConfigError("--output", f'is {show(target)}, a folder; expected the script file to write.', COMMAND_LINE)
    if not target.parent.is_dir():
        raise ConfigError("--output", f'is {show(target)}, whose folder does not exist.', COMMAND_LINE)
    text = sbatch_script(config, options, [Path(c).resolve() for c in args.config], args.overrides)
    _write_atomic(target, text)
    print(f"sbatch script: {target}")
    if not _has_checkpoint(config):
        print("note: no ModelCheckpoint in callbacks: a preempted or requeued job starts over "
              "(add {class_path: adaptrain.ModelCheckpoint} to save last.ckpt on SIGUSR1).")
    if not args.submit:
        print(f"submit it with: sbatch {shlex.quote(str(target))}")
        return 0
    return submit(target)


def slurm_options(args: argparse.Namespace, config: Mapping[str, Any]) -> SlurmOptions:
    """The slurm flags checked; a bad one raises a :class:`ConfigError` naming it."""
    nodes = _count(args.nodes, "--nodes", "nodes")
    gpus = _count(args.gpus_per_node, "--gpus-per-node", "GPUs, one worker process each")
    workers = config["data"].get("num_workers") or 0
    cpus = _count(args.cpus_per_task, "--cpus-per-task", "CPUs") if args.cpus_per_task else gpus * (1 + workers)
    if args.time is not None and not _SLURM_TIME.match(args.time):
        fail("--time", f'is {show(args.time)}; expected HH:MM:SS (or MM, MM:SS, D-HH:MM:SS), e.g. 12:00:00.')
    for flag, value in (("--partition", args.partition), ("--job-name", args.job_name)):
        if value is not None and not _SAFE_DIRECTIVE.match(value):
            fail(flag, f'is {show(value)}; expected letters, digits and ._,+- (it goes into an #SBATCH line).')
    port = _count(args.master_port, "--master-port", "a TCP port") if args.master_port else DEFAULT_PORT
    if port > 65535:
        fail("--master-port", f"is {port}; expected a TCP port, 1 .. 65535.")
    return SlurmOptions(nodes, gpus, cpus, args.time, args.partition, args.job_name or str(config["experiment"]),
                        port)


def _count(text: str, flag: str, what: str) -> int:
    return integer(text, flag, 1, what, default=1)


def sbatch_lines(options: SlurmOptions) -> list[str]:
    """The ``#SBATCH`` directives of the job."""
    lines = [f"--job-name={options.job_name}", f"--nodes={options.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={options.gpus_per_node}", f"--cpus-per-task={options.cpus_per_task}"]
    lines += [f"--time={options.time}"] if options.time else []
    lines += [f"--partition={options.partition}"] if options.partition else []
    lines += [f"--signal=B:USR1@{SIGNAL_LEAD_S}", "--requeue", "--open-mode=append"]
    return [f"#SBATCH {line}" for line in lines]


def fit_arguments(configs: Sequence[Path], overrides: Sequence[str]) -> list[str]:
    """``fit --config <abs path> ... <overrides>`` as the workers get it (before the run name and resume).

    Example:
        >>> fit_arguments([Path("/a b/run.yaml")], ["trainer.max_epochs=3"])
        ['fit', '--config', '/a b/run.yaml', 'trainer.max_epochs=3']
    """
    arguments = ["fit"]
    for path in configs:
        arguments += ["--config", str(path)]
    return [*arguments, *overrides]


def sbatch_script(config: Mapping[str, Any], options: SlurmOptions, configs: Sequence[Path],
                  overrides: Sequence[str]) -> str:
    """The whole sbatch script for ``config`` (already loaded and checked) and ``options``."""
    q = shlex.quote
    base = str(config["run_name"] or options.job_name)
    checkpoints = _checkpoint_dir(config)
    last = (q(str(checkpoints)) if checkpoints else f'{q(str(_experiment_dir(config)))}/"$run_name"/checkpoints')
    first_time = "resume=(--new-run)" if config["ckpt_path"] is not None else "resume=()"
    torchrun = ["torchrun", "--nnodes", '"$SLURM_NNODES"', "--nproc_per_node", str(options.gpus_per_node),
                "--rdzv_id", '"$SLURM_JOB_ID"', "--rdzv_backend", "c10d", "--rdzv_endpoint", f'"$head":{options.port}',
                "-m", "adaptrain.cli.main", *(q(a) for a in fit_arguments(configs, overrides)),
                'run_name="$run_name"', '"${resume[@]}"']
    return "\n".join([
        "#!/bin/bash",
        f"# Written by `adaptrain slurm` for {', '.join(q(str(c)) for c in configs)}.",
        "# Submit it with: sbatch <this file>   (adaptrain slurm --submit does).",
        *sbatch_lines(options),
        "",
        "# The environment is the submitting shell's (sbatch passes it on): torchrun and adaptrain on PATH.",
        "command -v torchrun >/dev/null || { echo 'adaptrain: torchrun is not on PATH; activate the environment "
        "with adaptrain before sbatch' >&2; exit 2; }",
        f"cd {q(os.getcwd())} || exit 2  # relative paths of the config (root_dir, data) as when it was written",
        "",
        f"# SIGUSR1 {SIGNAL_LEAD_S} s before the limit comes to this shell (B:); the workers get it from scancel,",
        "# save last.ckpt and stop (exit 138, torchrun then exits 1); a signalled, failed step is requeued.",
        "preempted=0 woken=0",
        "trap 'preempted=1 woken=1; echo \"adaptrain: SIGUSR1: the workers save a checkpoint and stop\"; "
        "scancel --signal=USR1 \"$SLURM_JOB_ID\"' USR1",
        "",
        "# The rendezvous: the job's first node; a requeued job (same id) continues its run from last.ckpt.",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f'run_name={q(base + "-")}"$SLURM_JOB_ID"',
        f"last={last}/last.ckpt",
        first_time,
        'if [ -f "$last" ]; then resume=("ckpt_path=$last"); echo "adaptrain: resuming from $last"; fi',
        "",
        "# torchrun ignores SIGUSR1 (it would die of it, and SLURM would kill the saving workers);",
        "# the bash -c string is fixed, the command is its arguments.",
        "srun bash -c 'trap \"\" USR1; exec \"$@\"' usr1-ignored " + " ".join(torchrun) + " &",
        "step=$!",
        "while :; do  # a trapped signal wakes `wait` early (status > 128): wait again for the real exit code",
        '    woken=0; wait "$step"; code=$?',
        '    if [ "$woken" = 1 ] && [ "$code" -gt 128 ]; then continue; fi',
        "    break",
        "done",
        'if [ "$preempted" = 1 ] && [ "$code" -ne 0 ]; then',
        '    echo "adaptrain: requeueing job $SLURM_JOB_ID (the step exited $code after SIGUSR1)"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$code"',
        "",
    ])


def _experiment_dir(config: Mapping[str, Any]) -> Path:
    return Path(config["root_dir"]).resolve() / str(config["experiment"])


def _checkpoint_specs(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [spec for spec in config["callbacks"]
            if isinstance(spec, Mapping) and str(spec.get("class_path", "")).endswith("ModelCheckpoint")]


def _has_checkpoint(config: Mapping[str, Any]) -> bool:
    return bool(_checkpoint_specs(config))


def _checkpoint_dir(config: Mapping[str, Any]) -> Path | None:
    """A ModelCheckpoint's own ``dirpath`` (absolute), when the config gives one; else None (the run folder's)."""
    for spec in _checkpoint_specs(config):
        dirpath = (spec.get("init_args") or {}).get("dirpath")
        if dirpath:
            return Path(dirpath).resolve()
    return None


def _write_atomic(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` through a temporary file: never a half-written script."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def submit(script: Path) -> int:
    """``sbatch --parsable <script>``; print the job id. 1 when sbatch refused the script."""
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        print(f"adaptrain: error: sbatch refused {script}: {reason}", file=sys.stderr)
        return 1
    job = done.stdout.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
    print(f"submitted: job {job} (squeue -j {job}; its log: slurm-{job}.out)")
    return 0
