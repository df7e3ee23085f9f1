"""Rank, world size and the device of this process (DDP / FSDP through torchrun plug in here)."""
