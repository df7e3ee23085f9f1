"""``adaptrain slurm``: the sbatch script's content, and the script itself run by bash on this machine.

There is no SLURM here (``sbatch --test-only`` is not available): the runs put small stand-ins for
``srun`` (runs its command), ``scontrol`` (``show hostnames`` gives 127.0.0.1; ``requeue`` is logged)
and ``scancel`` (signals every process below the batch shell, as SLURM's cgroup tracking signals every
process of the job step) first on PATH, and set ``SLURM_JOB_ID`` / ``SLURM_NNODES`` /
``SLURM_JOB_NODELIST``. Everything else is real: bash, torchrun, the workers, the signals.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptrain import Callback
from adaptrain.cli.main import main
from tests.cli.test_launch import environment, free_port, quick_config
from tests.cli_data import base_config, write_config

JOB = "4242"


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """A config folder whose name needs quoting (a space, a $), and the working folder as cwd."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my $HOME dir"
    folder.mkdir()
    return folder


def write_script(config_dir: Path, capsys, *flags: str, config: dict | None = None) -> tuple[Path, str]:
    config_file = write_config(config_dir / "run.yaml", config or base_config(config_dir.parent / "runs"))
    code = main(["slurm", "--config", str(config_file), *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return config_dir / "run.sbatch", out


def directives(text: str) -> dict[str, str | None]:
    found = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line[len("#SBATCH --"):].partition("=")
            found[name] = value or None
    return found


def srun_line(text: str) -> list[str]:
    (line,) = [line for line in text.splitlines() if line.startswith("srun ")]
    return shlex.split(line)


# ---------------------------------------------------------------------- the script's content
def test_the_script_has_the_directives_the_rendezvous_and_the_quoted_command(config_dir, capsys):
    override = "callbacks=[{class_path: adaptrain.ModelCheckpoint, init_args: {save_top_k: 0}}]"
    script, out = write_script(config_dir, capsys, "--nodes", "2", "--gpus-per-node", "4", "--time", "12:00:00",
                               "--partition", "gpu", "trainer.max_epochs=3", override)
    assert f"sbatch script: {script}" in out
    text = script.read_text()
    assert directives(text) == {"job-name": "tiny", "nodes": "2", "ntasks-per-node": "1", "gpus-per-node": "4",
                                "cpus-per-task": "4", "time": "12:00:00", "partition": "gpu",
                                "signal": "B:USR1@90", "requeue": None, "open-mode": "append"}
    assert 'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text.splitlines()
    words = srun_line(text)
    assert words[:4] == ["srun", "bash", "-c", 'trap "" USR1; exec "$@"']
    command = words[words.index("torchrun"):]
    assert command[:command.index("-m")] == [
        "torchrun", "--nnodes", "$SLURM_NNODES", "--nproc_per_node", "4", "--rdzv_id", "$SLURM_JOB_ID",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "$head:29500"]
    assert command[command.index("-m"):] == [
        "-m", "adaptrain.cli.main", "fit", "--config", str(config_dir / "run.yaml"), "trainer.max_epochs=3",
        override, "run_name=$run_name", "${resume[@]}", "&"]
    assert "scontrol requeue \"$SLURM_JOB_ID\"" in text and os.access(script, os.X_OK)


def test_cpus_per_task_follows_the_loader_workers_and_output_names_the_file(config_dir, tmp_path, capsys):
    config = base_config(tmp_path / "runs", data={"class_path": "tests.cli_data.tiny_dict", "num_workers": 3})
    target = tmp_path / "job.sh"
    write_script(config_dir, capsys, "--nodes", "1", "--gpus-per-node", "2", "--output", str(target),
                 "--job-name", "exp.1", config=config)
    found = directives(target.read_text())
    assert found["cpus-per-task"] == "8" and found["job-name"] == "exp.1" and "time" not in found
    assert not (config_dir / "run.sbatch").exists()


BAD = [
    (["--nodes", "0", "--gpus-per-node", "1"], '--nodes is "0"; expected an integer >= 1'),
    (["--nodes", "1", "--gpus-per-node", "x"], '--gpus-per-node is "x"'),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "1h"], '--time is "1h"; expected HH:MM:SS'),
    (["--nodes", "1", "--gpus-per-node", "1", "--job-name", "my job"], '--job-name is "my job"'),
    (["--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu\n#SBATCH --x"], "--partition is"),
    (["--nodes", "1", "--gpus-per-node", "1", "trainer.max_epocs=2"], "trainer.max_epocs is not a known key"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[f[-1] for f, _ in BAD])
def test_bad_values_exit_2_with_one_line_and_write_no_script(flags, message, config_dir, capsys):
    config_file = write_config(config_dir / "run.yaml", base_config(config_dir.parent / "runs"))
    code = main(["slurm", "--config", str(config_file), *flags])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in config_dir.iterdir()) == ["run.yaml"]


def test_submit_without_sbatch_exits_2_and_writes_nothing(config_dir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(config_dir))  # a folder without sbatch
    config_file = write_config(config_dir / "run.yaml", base_config(config_dir.parent / "runs"))
    code = main(["slurm", "--config", str(config_file), "--nodes", "1", "--gpus-per-node", "1", "--submit"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--submit needs sbatch" in err, err
    assert not (config_dir / "run.sbatch").exists()


def test_submit_runs_sbatch_on_the_script_and_prints_the_job_id(config_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_FAKE_LOG", str(tmp_path / "slurm.log"))
    script, out = write_script(config_dir, capsys, "--nodes", "1", "--gpus-per-node", "1", "--submit")
    assert "submitted: job 777 " in out
    assert (tmp_path / "slurm.log").read_text().splitlines() == [f"sbatch --parsable {script}"]


# ---------------------------------------------------------------------- the script, run by bash
FAKES = {
    "srun": '#!/bin/sh\nexec "$@"\n',
    "sbatch": '#!/bin/sh\necho "sbatch $*" >> "$SLURM_FAKE_LOG"\necho "777;cluster"\n',
    "scontrol": ('#!/bin/sh\nif [ "$1 $2" = "show hostnames" ]; then echo 127.0.0.1; exit 0; fi\n'
                 'echo "scontrol $*" >> "$SLURM_FAKE_LOG"\n'),
    # SLURM signals every process of the job step (cgroup tracking); here: every process under the shell.
    "scancel": f"""#!{sys.executable}
import os, signal, sys
number = dict(arg.split("=", 1) for arg in sys.argv[1:] if arg.startswith("--signal="))["--signal"]
parents = {{}}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        parents[int(pid)] = int(open(f"/proc/{{pid}}/stat").read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError):
        pass
below, todo = [], [os.getppid()]
while todo:
    above = todo.pop()
    children = [pid for pid, parent in parents.items() if parent == above and pid != os.getpid()]
    below += children
    todo += children
for pid in below:
    os.kill(pid, getattr(signal, "SIG" + number))
with open(os.environ["SLURM_FAKE_LOG"], "a") as log:
    log.write(f"scancel {{' '.join(sys.argv[1:])}}: {{len(below)}} processes\\n")
""",
}


def fake_slurm(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def job_environment(tmp_path: Path) -> dict[str, str]:
    venv_bin = Path(sys.executable).parent  # torchrun
    return {**environment(), "PATH": f"{fake_slurm(tmp_path)}{os.pathsep}{venv_bin}{os.pathsep}{os.environ['PATH']}",
            "SLURM_JOB_ID": JOB, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost",
            "SLURM_FAKE_LOG": str(tmp_path / "slurm.log")}


@pytest.mark.slow
def test_the_script_runs_fit_with_two_processes(config_dir, tmp_path, capsys):
    script, _ = write_script(config_dir, capsys, "--nodes", "1", "--gpus-per-node", "2",
                             "--master-port", str(free_port()), "trainer.max_epochs=1",
                             config=quick_config(tmp_path / "runs"))
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=job_environment(tmp_path),
                          cwd="/", timeout=240)  # the script goes to the folder it was written from itself
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "runs/tiny" / f"tiny-{JOB}"
    assert [p.name for p in (tmp_path / "runs/tiny").iterdir()] == [folder.name]
    log = (folder / "train.log").read_text().splitlines()
    assert sum(line.startswith("epoch 1/1 ") for line in log) == 1, log
    assert [p.name for p in folder.glob("config*.yaml")] == ["config.yaml"]
    assert done.stdout.count("run folder: ") == 1


class WaitForRelease(Callback):
    """After the first optimizer step: write ``ready``, then wait (60 s at most) until ``release`` exists."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def after_step(self, trainer):
        if trainer.state.global_step == 1 and not (self.folder / "release").exists():
            (self.folder / "ready").write_text(str(os.getpid()))
            for _ in range(1200):
                if (self.folder / "release").exists():
                    return
                time.sleep(0.05)


def wait_for(path: Path, process: subprocess.Popen, pattern: str = "") -> None:
    """Until ``path`` exists (and holds ``pattern``) or ``process`` ended: a sync on files, not a time budget."""
    for _ in range(2400):
        if path.is_file() and re.search(pattern, path.read_text()) or process.poll() is not None:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_requeued_job_resumes(config_dir, tmp_path, capsys):
    config = quick_config(tmp_path / "runs", callbacks=[
        {"class_path": "adaptrain.ModelCheckpoint"},
        {"class_path": "tests.cli.test_slurm.WaitForRelease", "init_args": {"folder": str(tmp_path)}}])
    script, _ = write_script(config_dir, capsys, "--nodes", "1", "--gpus-per-node", "1",
                             "--master-port", str(free_port()), config=config)
    env = job_environment(tmp_path)
    job = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(tmp_path / "ready", job)
    assert job.poll() is None, job.communicate()
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 does 90 s before the limit
    wait_for(tmp_path / "slurm.log", job, "scancel")
    (tmp_path / "release").write_text("")
    out, err = job.communicate(timeout=120)
    assert job.returncode == 1, err  # torchrun's code for a stopped worker
    assert "SIGUSR1 received at step" in out, out  # the worker got it once, saved and stopped
    assert f"requeueing job {JOB} (the step exited 1 after SIGUSR1)" in out  # torchrun survived the signal
    calls = (tmp_path / "slurm.log").read_text().splitlines()
    signalled = re.fullmatch(rf"scancel --signal=USR1 {JOB}: (\d+) processes", calls[0])
    assert signalled and int(signalled[1]) >= 2 and f"scontrol requeue {JOB}" in calls, calls  # torchrun, worker
    folder = tmp_path / "runs/tiny" / f"tiny-{JOB}"
    assert (folder / "checkpoints/last.ckpt").is_file()

    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=240)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {folder}/checkpoints/last.ckpt" in again.stdout
    assert [p.name for p in (tmp_path / "runs/tiny").iterdir()] == [folder.name]
    assert (folder / "config.resume-1.yaml").is_file()
    assert "epoch 2/2 " in (folder / "train.log").read_text()
