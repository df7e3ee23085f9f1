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


def test_ending_the_group_frees_a_ddp_wrapper_left_in_a_reference_cycle(tmp_path):
    """A finished trainer is a cycle that keeps its DDP wrapper (and, through the reducer, the group)
    alive; freed in interpreter teardown, gloo's threads made ranks abort. Ending the group frees it."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        holder: dict = {}
        holder["self"] = holder  # a cycle, as trainer -> state -> callbacks -> trainer is
        holder["ddp"] = DistributedDataParallel(nn.Linear(2, 2))
        wrapper = weakref.ref(holder["ddp"])
        del holder
        gc.disable()  # no automatic collection in between: only end_process_group's may free the cycle
        assert wrapper() is not None
        env.end_process_group()
        assert wrapper() is None and not dist.is_initialized()
    finally:
        gc.enable()
        env.end_process_group()
