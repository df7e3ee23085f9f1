"""1 process vs 2 DDP ranks on the CPU (gloo), through real torchrun: throughput and per-step cost.

A compute-bound MLP (784-1024-1024-10, SGD), random data, one torch thread per process, 3 epochs;
the first epoch is warm-up, the figures are the median of the other two. Three runs:

* ``1 process, batch 128``: the baseline.
* ``2 ranks, 64 each``: the same global batch (128) split over 2 ranks: the same optimisation, the
  speed-up that data parallelism buys on this machine (2 cores: at most 2x).
* ``2 ranks, 128 each``: the same per-rank work as the baseline: the step time over the baseline's is
  what DDP adds per step (gradient all-reduce, the sample-count all-reduce, no_sync bookkeeping),
  with each rank on its own core.

    python benchmarks/distributed.py          # ~2 min on 2 cores
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()
SAMPLES = 16384


def worker(out: str, batch: int) -> None:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from adaptrain import Trainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(SAMPLES, 784), torch.randint(0, 10, (SAMPLES,))
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), max_epochs=3,
                      device="cpu", progress=False, seed=0)
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True))
    if int(os.environ.get("RANK", 0)) == 0:
        records = trainer.state.history.records[1:]
        steps = len(trainer.state.train_loader)
        world = int(os.environ.get("WORLD_SIZE", 1))
        Path(out).write_text(json.dumps({
            "step_ms": statistics.median(r["epoch_time"] for r in records) / steps * 1000,
            "samples_per_s": statistics.median(r["samples_per_s"] for r in records) * world}))


def run(ranks: int, batch: int) -> dict:
    out = tempfile.mktemp(suffix=".json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, str(HERE), "--worker", out, str(batch)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   str(HERE), "--worker", out, str(batch)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    return json.loads(Path(out).read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
        return
    base = run(1, 128)
    split = run(2, 64)
    same = run(2, 128)
    print(f"{'run':<24} {'step ms':>8} {'samples/s':>10} {'vs 1 process':>13}")
    print(f"{'1 process, batch 128':<24} {base['step_ms']:>8.1f} {base['samples_per_s']:>10.0f} {'1.00':>13}")
    print(f"{'2 ranks, 64 each':<24} {split['step_ms']:>8.1f} {split['samples_per_s']:>10.0f} "
          f"{split['samples_per_s'] / base['samples_per_s']:>12.2f}x")
    print(f"{'2 ranks, 128 each':<24} {same['step_ms']:>8.1f} {same['samples_per_s']:>10.0f} "
          f"{same['samples_per_s'] / base['samples_per_s']:>12.2f}x  (step time {same['step_ms'] / base['step_ms']:.2f}"
          "x the baseline's: what DDP adds per step)")


if __name__ == "__main__":
    main()
