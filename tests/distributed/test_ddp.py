"""DDP and FSDP through real torchrun processes (gloo, CPU): 2 ranks train as 1 process does.

Each case runs ``tests/scripts/ddp_worker.py`` under ``torchrun --standalone --nproc_per_node 2``
and the same script in this process (batch 6, a one-replica DistributedSampler: the order the ranks
share out), then compares final weights and history values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import ddp_worker

WORKER = Path(ddp_worker.__file__)
ROOT = WORKER.parents[2]
HANG_GUARD_S = 240  # torchrun must end by itself well before this: a hang fails the test instead of CI


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out), "--batch", "3", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S, cwd=ROOT)


def single(out: Path, *args: str) -> None:
    ddp_worker.main([str(out), "--batch", "6", *args])


def compare(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = torch.load(a / "weights.pt"), torch.load(b / "weights.pt")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=atol), (key, (wa[key] - wb[key]).abs().max())
    ha, hb = (json.loads((p / "history.json").read_text()) for p in (a, b))
    assert len(ha) == len(hb)
    for ra, rb in zip(ha, hb):
        for key, value in ra.items():
            if key not in ("epoch_time", "samples_per_s", "data_time", "compute_time"):
                assert rb[key] == pytest.approx(value, abs=atol), key


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout: {result.stdout[-1500:]}\nstderr: {result.stderr[-3000:]}"
    assert result.stdout.count("done") == 2  # both ranks finished


def test_ddp_with_accumulation_and_shuffle_equals_one_process_and_resumes_on_2_ranks_and_on_1(tmp_path):
    ckpt = tmp_path / "first" / "ckpt"
    ok(torchrun(tmp_path / "first", "--strategy", "ddp", "--accumulate", "2", "--shuffle", "--epochs", "1",
                "--checkpoint-dir", str(ckpt)))
    names = sorted(p.name for p in ckpt.iterdir())
    assert len(names) == 2 and names[0].startswith("epoch=1-step=4") and names[1] == "last.ckpt"  # written once
    log = (tmp_path / "first" / "run" / "train.log").read_text()
    assert log.count("epoch 1/1") == 1  # one logger, on rank zero
    ok(torchrun(tmp_path / "resumed2", "--strategy", "ddp", "--accumulate", "2", "--shuffle", "--epochs", "2",
                "--resume", str(ckpt / "last.ckpt")))
    single(tmp_path / "whole", "--accumulate", "2", "--shuffle", "--epochs", "2")
    compare(tmp_path / "resumed2", tmp_path / "whole")  # val_acc etc. over unpadded shares (15 = 8 + 7)
    single(tmp_path / "resumed1", "--accumulate", "2", "--shuffle", "--epochs", "2", "--resume", str(ckpt / "last.ckpt"))
    compare(tmp_path / "resumed1", tmp_path / "whole")
    ranks = json.loads((tmp_path / "resumed2" / "ranks.json").read_text())
    assert ranks["world"] == 2 and ranks["train_batches"] == 8 and ranks["global_step"] == 8


def test_fsdp_equals_one_process(tmp_path):
    args = ("--strategy", "fsdp", "--accumulate", "3", "--shuffle", "--n-val", "16")
    result = torchrun(tmp_path / "fsdp", *args, "--auto-num-workers")  # the loader setting agreed, not timed
    ok(result)
    assert "several ranks: the hardware starting point" in result.stdout
    single(tmp_path / "one", *args)
    compare(tmp_path / "fsdp", tmp_path / "one")


def test_uneven_shares_of_a_step_are_weighted_by_samples(tmp_path):
    ok(torchrun(tmp_path / "ddp", "--strategy", "ddp", "--uneven", "--accumulate", "2"))
    single(tmp_path / "one", "--uneven", "--accumulate", "2")
    compare(tmp_path / "ddp", tmp_path / "one")


def test_a_rank_that_raises_ends_the_job_with_an_error(tmp_path):
    result = torchrun(tmp_path / "fail", "--strategy", "ddp", "--fail-rank", "1", "--fail-step", "3")
    assert result.returncode != 0
    assert "rank 1 fails at step 3 (injected)" in result.stderr
    assert not (tmp_path / "fail" / "weights.pt").exists()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = torchrun(tmp_path / "sig", "--strategy", "ddp", "--checkpoint-dir", str(ckpt),
                      "--signal-rank", "1", "--signal-step", "3")  # SIGTERM to rank 1 alone, after step 3
    assert result.returncode != 0  # torchrun reports the workers' 143
    assert "rank 0 interrupted at step 3" in result.stdout and "rank 1 interrupted at step 3" in result.stdout
    assert [p.name for p in ckpt.iterdir()] == ["last.ckpt"]
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["counters"]["global_step"] == 3
