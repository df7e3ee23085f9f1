import pytest
import torch

from adaptrain.core.precision import MixedPrecision, Precision, build_precision, precision_support


@pytest.mark.parametrize("capability, ok", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_needs_ampere_or_newer(capability, ok):
    reason = precision_support("bf16-mixed", "cuda", capability)
    assert (reason is None) == ok
    if not ok:
        assert "no native bfloat16" in reason and '"16-mixed" or "32"' in reason


def test_fp16_runs_on_pre_ampere_and_unknown_names_are_listed():
    assert precision_support("16-mixed", "cuda", (7, 0)) is None
    assert '"fp8"; expected one of "32", "16-mixed", "bf16-mixed"' in precision_support("fp8", "cpu")
    assert "not supported" in precision_support("16-mixed", "xla")


def test_build_precision_plugins():
    cpu = torch.device("cpu")
    assert type(build_precision("32", cpu)) is Precision
    fp16 = build_precision("16-mixed", cpu)
    assert isinstance(fp16, MixedPrecision) and fp16.scaler is not None and fp16.dtype == torch.float16
    bf16 = build_precision("bf16-mixed", cpu)
    assert bf16.scaler is None and bf16.state_dict() == {}
    with bf16.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    assert "scale" in fp16.state_dict()["scaler"]
