import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when tests spawn subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (the CPU path has its own tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
