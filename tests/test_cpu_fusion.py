"""The oneDNN convolution + LeakyReLU / residual-add pairs compute what the unfused ops compute."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize_zeros
from lib import cpu_fusion
from lib.unet import build_unet, model_config

pytestmark = pytest.mark.skipif(
    not cpu_fusion._POINTWISE,
    reason="no oneDNN bf16 convolutions here (x86 with AVX512, AVX-NE-CONVERT or AMX)",
)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("frozen", ["nothing", "x", "conv1", "conv2 bias"])
def test_fused_pairs_match_the_unfused_ops_in_fp32(layout, frozen):
    # In fp32 both sides are the same oneDNN convolution, so forward and every gradient agree to
    # rounding: this checks the hand-written backward formulas (LeakyReLU's derivative read off the
    # output, the bias gradient, the residual branch's gradient passing through unchanged), also
    # when some inputs need no gradient (a frozen layer, an input that is data).
    torch.manual_seed(0)
    conv1 = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=layout)
    conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=frozen != "conv2 bias").to(memory_format=layout)
    conv1.requires_grad_(frozen != "conv1")
    x = torch.randn(3, 8, 10, 12).contiguous(memory_format=layout)
    other = torch.randn(3, 8, 10, 12).contiguous(memory_format=layout)
    upstream = torch.randn(3, 8, 10, 12)
    params = [p for p in (conv1.weight, conv1.bias, conv2.weight, conv2.bias) if p is not None]
    results = []
    for fused in (True, False):
        xs = x.clone().requires_grad_(frozen != "x")
        os_ = other.clone().requires_grad_()
        for p in params:
            p.grad = None
        if fused:
            y = cpu_fusion.conv_add(cpu_fusion.conv_leaky_relu(xs, conv1, 0.2), conv2, os_)
        else:
            y = conv2(F.leaky_relu(conv1(xs), 0.2)) + os_
        (y * upstream).sum().backward()
        results.append([y, xs.grad, os_.grad] + [p.grad for p in params])
    assert (F.leaky_relu(conv1(x), 0.2) < 0).any()  # both branches of the LeakyReLU are exercised
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        if b is None:  # no gradient asked for: none given
            assert a is None, i
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"tensor {i}")


class BrokenOp:
    """Stands in for a changed private op: one that raises, or one that computes something else."""

    def __init__(self, raises):
        self.raises = raises

    def __call__(self, x, *args):
        if self.raises:
            raise RuntimeError("unknown argument 'attr'")
        return torch.zeros(x.shape[0], args[0].shape[0], *x.shape[2:], dtype=x.dtype)

    def binary(self, x, other, *args):
        return self(x, *args[:1]) if self.raises else torch.zeros_like(other)


@pytest.mark.parametrize("raises", [True, False], ids=["raises", "wrong results"])
def test_a_broken_fused_op_is_caught_once_and_the_plain_ops_serve(monkeypatch, raises):
    monkeypatch.setattr(cpu_fusion, "_OP", BrokenOp(raises))
    cpu_fusion.self_check.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="failed its self-check.*using the plain ops"):
            assert not cpu_fusion.applies(torch.zeros(1, dtype=torch.bfloat16))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process: no second warning
            assert not cpu_fusion.applies(torch.zeros(1, dtype=torch.bfloat16))
        torch.manual_seed(0)  # and the network still runs, on the plain ops
        model = build_unet(model_config("flowers64", image_size=32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(model(torch.randn(2, 3, 32, 32), torch.rand(2)).float()).all()
    finally:
        monkeypatch.undo()
        cpu_fusion.self_check.cache_clear()
    assert cpu_fusion.self_check()  # the real op passes


def test_only_bf16_cpu_tensors_take_the_fused_path(monkeypatch):
    assert cpu_fusion.applies(torch.zeros(1, dtype=torch.bfloat16))
    assert not cpu_fusion.applies(torch.zeros(1))  # fp32: measured slower fused, stays unfused
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the user switched oneDNN off
    assert not cpu_fusion.applies(torch.zeros(1, dtype=torch.bfloat16))


def test_other_kinds_of_convolution_are_refused():
    x = torch.randn(1, 4, 6, 6)
    for conv in (
        nn.Conv2d(4, 4, 3),
        nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
    ):
        with pytest.raises(ValueError, match="same-padded"):
            cpu_fusion.conv_leaky_relu(x, conv, 0.01)


@pytest.mark.parametrize("preset", ["flowers64", "flowers64-v2"])
def test_fused_network_has_bf16_accuracy(monkeypatch, preset):
    """The whole network in bf16 with and without the fused pairs, against fp32: the fused path's
    output and every parameter gradient are as close to fp32 as the unfused bf16 path's (bf16
    rounding differs between the two, by design: the fused op rounds once instead of twice);
    also with the network options (SiLU unfused, adaptive norm, attention)."""
    torch.manual_seed(0)
    model = build_unet(model_config(preset, image_size=32)).to(memory_format=torch.channels_last)
    randomize_zeros(model)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    noise_var = torch.rand(4)

    def run(bf16, fused):
        monkeypatch.setattr(cpu_fusion, "_POINTWISE", fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(x, noise_var)
        y.float().square().mean().backward()
        return [y.detach().float()] + [p.grad.clone() for p in model.parameters()]

    exact, plain, fused = run(False, False), run(True, False), run(True, True)

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert any(not torch.equal(f, p) for f, p in zip(fused, plain, strict=True))  # the fused path really ran
    for i, (e, p, f) in enumerate(zip(exact, plain, fused, strict=True)):
        # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); accumulated over the
        # network, errors land at 0.15-12% (the largest on small gradients) for both paths, the
        # fused path's at 0.7-1.3x the unfused one's (observed on this CPU).
        assert err(f, e) <= 1.5 * err(p, e) + 1e-3, (
            f"tensor {i}: fused {err(f, e):.4f}, unfused {err(p, e):.4f}"
        )
