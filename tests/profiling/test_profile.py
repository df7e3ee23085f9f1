"""adaptrain.profiling.profile and the adaptrain.profiling.measure primitives it uses: FLOPs equal closed forms,
latency stats are ordered, errors name shapes, multi-input/output models work, and the profiled
model is left exactly as it was."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from adaptrain.profiling.measure import LiveTensorMeter, percentile
from adaptrain.profiling.profile import LatencyStats, ModelProfile, profile

FAST = dict(device="cpu", warmup=1, runs=5)


def conv_flops(cin: int, cout: int, k: int, out_hw: int, groups: int = 1) -> int:
    """2 * MACs of a square Conv2d, per sample."""
    return 2 * cout * out_hw * out_hw * (cin // groups) * k * k


# ----------------------------------------------------------------------------- pure helpers
def test_percentile_numbers():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 90) == 5.0
    s = LatencyStats.from_samples([1.0, 2.0, 3.0, 10.0])
    assert (s.mean, s.p50, s.min, s.max, s.runs) == (4.0, 2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_live_tensor_meter_counts_only_new_live_tensors():
    w = torch.ones(1024)  # 4 KiB, resident: not counted
    with LiveTensorMeter(resident=w) as meter:
        a = w * 2  # 4 KiB
        b = a.view(32, 32)  # a view: same storage, counted once
        c = torch.ones(512) + 1  # temporary 2 KiB + result 2 KiB, alive together with a
    assert meter.peak_bytes == 4096 + 2048 + 2048
    del a, b, c


# ----------------------------------------------------------------------------- FLOPs
def test_linear_flops_closed_form():
    p = profile(nn.Linear(32, 16), input_shapes=(32,), batch_size=4, **FAST)
    assert (p.flops, p.macs) == (2 * 32 * 16, 32 * 16)
    assert p.train_flops == 2 * p.flops  # grad_W only: the input needs no grad
    assert (p.batch_flops, p.batch_train_flops) == (4 * p.flops, 4 * p.train_flops)
    assert p.params == p.trainable_params == 32 * 16 + 16
    assert p.size_mb == pytest.approx((32 * 16 + 16) * 4 / 2**20)


def test_conv2d_with_groups_and_stride():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
    p = profile(conv, input_shapes=(8, 15, 15), **FAST)  # out 8x8
    assert p.flops == conv_flops(8, 16, 3, 8, groups=4) == 2 * 16 * 64 * 2 * 9


class MatMul(nn.Module):
    def forward(self, a, b):
        return a @ b


def test_matmul_and_bmm():
    p = profile(MatMul(), input_shapes=[(5, 7), (7, 3)], batch_size=2, **FAST)
    assert p.flops == 2 * 5 * 7 * 3
    assert p.batch_flops == 2 * p.flops


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_scaled_dot_product_attention():
    h, lq, s, e, ev = 4, 16, 32, 8, 6
    p = profile(Attention(), input_shapes={"q": (h, lq, e), "k": (h, s, e), "v": (h, s, ev)}, **FAST)
    assert p.flops == 2 * h * lq * s * e + 2 * h * lq * s * ev  # QK^T, then scores @ V


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer2(self.layer1(self.stem(x))), 1), 1))


def test_resnet_style_net_equals_hand_sum():
    p = profile(TinyResNet(), input_shapes=(3, 16, 16), batch_size=2, **FAST)
    layer2 = conv_flops(8, 16, 3, 8) + conv_flops(16, 16, 3, 8) + conv_flops(8, 16, 1, 8)
    expected = conv_flops(3, 8, 3, 16) + 2 * conv_flops(8, 8, 3, 16) + layer2 + 2 * 16 * 10
    assert p.flops == expected
    by_name = {m.name: m for m in p.modules}
    assert by_name["layer2"].flops == layer2
    assert by_name["layer2.short.0"].macs == conv_flops(8, 16, 1, 8) // 2
    leaves = [m for m in p.modules if not any(o.name.startswith(m.name + ".") for o in p.modules if m.name)]
    assert sum(m.flops for m in leaves if m.name) == p.flops  # the breakdown adds up


def test_mlp_train_flops_closed_form():
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    p = profile(mlp, input_shapes=(20,), **FAST)
    fwd = 2 * 20 * 64 + 2 * 64 * 5
    assert p.flops == fwd
    assert p.train_flops == 3 * fwd - 2 * 20 * 64  # no grad w.r.t. the input of the first layer


def test_example_inputs_are_rebatched_per_sample():
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    p = profile(mlp, example_inputs=torch.randn(8, 20), **FAST)
    assert p.batch_size == 8 and p.input_shapes == (8, 20)
    assert p.flops == 2 * 20 * 64 + 2 * 64 * 5 and p.batch_flops == 8 * p.flops


# ----------------------------------------------------------------------------- latency, memory, output
def test_latency_percentiles_are_ordered_and_memory_positive():
    p = profile(TinyResNet(), input_shapes=(3, 16, 16), batch_size=2, device="cpu", warmup=2, runs=10)
    for s in (p.latency_ms, p.train_latency_ms):
        assert s is not None and s.runs == 10
        assert 0 < s.min <= s.p50 <= s.p90 <= s.max and s.mean > 0
    assert 0 < p.peak_mem_forward_mb < p.peak_mem_train_mb
    assert p.activation_mb is not None and p.activation_mb > 0
    assert p.memory_measure.startswith("cpu:")


def test_to_dict_json_and_rich_rendering():
    p = profile(TinyResNet(), input_shapes=(3, 16, 16), **FAST)
    assert isinstance(p, ModelProfile)
    d = json.loads(p.to_json())
    assert d["flops"] == p.flops and d["latency_ms"]["p90"] == p.latency_ms.p90
    assert d["modules"][1]["name"] == "stem"
    out = io.StringIO()
    Console(file=out, width=140).print(p)
    text = out.getvalue()
    assert "train FLOPs" in text and "layer2" in text and "Conv2d" in text


# ----------------------------------------------------------------------------- errors
def test_bad_shape_names_given_and_expected_shapes():
    with pytest.raises(ValueError, match=r"\(1, 7\).*\(\*, 10\).*in_features=10"):
        profile(nn.Sequential(nn.Linear(10, 4), nn.ReLU()), input_shapes=(7,), **FAST)
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 16\).*\(N, 3, H, W\).*in_channels=3"):
        profile(TinyResNet(), example_inputs=torch.randn(2, 4, 16, 16), **FAST)


def test_error_names_the_failing_inner_module():
    net = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"raised in '2' \(Linear\), which received \(1, 5\)"):
        profile(net, input_shapes=(10,), **FAST)


def test_wrong_input_names_are_a_value_error_too():
    with pytest.raises(ValueError, match=r"'z'.*Original error: TypeError"):
        profile(TwoInTwoOut(), input_shapes={"x": (4,), "z": (6,)}, **FAST)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        profile(nn.Linear(2, 2), **FAST)
    with pytest.raises(ValueError, match="positive ints"):
        profile(nn.Linear(2, 2), input_shapes=(0,), **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            profile(nn.Linear(2, 2), input_shapes=(2,), device="cuda")


# ----------------------------------------------------------------------------- multi-input / output
class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(6, 8)

    def forward(self, x, y):
        h = self.a(x) + self.b(y)
        return h, {"logits": h * 2, "label": h.argmax(-1)}  # an integer output is left out of backward


@pytest.mark.parametrize("kind", ["shape-list", "shape-dict", "tuple", "list", "dict"])
def test_multi_input_multi_output(kind):
    x, y = torch.randn(3, 4), torch.randn(3, 6)
    given = {"shape-list": dict(input_shapes=[(4,), (6,)]), "shape-dict": dict(input_shapes={"x": (4,), "y": (6,)}),
             "tuple": dict(example_inputs=(x, y)), "list": dict(example_inputs=[x, y]),
             "dict": dict(example_inputs={"x": x, "y": y})}[kind]
    p = profile(TwoInTwoOut(), **given, **FAST)
    assert p.flops == 2 * 4 * 8 + 2 * 6 * 8
    assert p.train_flops == 2 * p.flops and p.train_latency_ms is not None


def test_model_state_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model.train()
    model[2].eval()  # mixed modes must survive
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # existing grads and BN statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    profile(model, input_shapes=(3, 8, 8), batch_size=4, **FAST)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    for p, (g, saved) in zip(model.parameters(), grads):
        assert p.grad is g and torch.equal(g, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    assert next(model.parameters()).device.type == "cpu"


def test_batchnorm1d_batch_one_train_step_is_a_note_not_a_crash():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    p = profile(net, input_shapes=(4,), **FAST)
    assert p.flops == 2 * 4 * 8 and p.train_latency_ms is None
    assert p.notes and "batch_size=1" in p.notes[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_on_cuda_leaves_model_on_cpu():
    model = TinyResNet()
    p = profile(model, input_shapes=(3, 16, 16), batch_size=8, device="cuda", warmup=2, runs=5)
    assert p.device.startswith("cuda") and p.memory_measure.startswith("cuda:")
    assert p.peak_mem_train_mb > p.peak_mem_forward_mb > 0 and p.latency_ms.p50 > 0
    assert next(model.parameters()).device.type == "cpu"
