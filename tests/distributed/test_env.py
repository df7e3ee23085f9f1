"""Rank and device from the environment: device="auto" gives each rank its own GPU."""

from __future__ import annotations

import torch

from adaptrain.distributed import env


def test_auto_device_is_cuda_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env.default_device() == torch.device("cuda", 3)  # not bare "cuda": every rank would use cuda:0
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env.default_device() == torch.device("cuda", 0)


def test_single_process_defaults(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (env.rank(), env.local_rank(), env.world_size(), env.is_global_zero()) == (0, 0, 1, True)
    monkeypatch.setenv("RANK", "2")
    assert not env.is_global_zero()
