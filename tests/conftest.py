
import pytest
import torch

# The test models are tiny: one intra-op thread is fastest for them and leaves the other core to
# the subprocesses some tests start.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (the CPU path has its own tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
