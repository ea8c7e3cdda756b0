"""The oneDNN convolution + LeakyReLU / residual-add pairs compute what the unfused ops compute."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import cpu_fusion
from lib.unet import build_unet, model_config

pytestmark = pytest.mark.skipif(not cpu_fusion._POINTWISE, reason="oneDNN's fused convolutions need an x86 CPU")


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_fused_pairs_match_the_unfused_ops_in_fp32(layout):
    # In fp32 both sides are the same oneDNN convolution, so forward and every gradient agree to
    # rounding: this checks the hand-written backward formulas (LeakyReLU's derivative read off the
    # output, the bias gradient, the residual branch's gradient passing through unchanged).
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).to(memory_format=layout)
    x = torch.randn(3, 8, 10, 12).contiguous(memory_format=layout)
    other = torch.randn(3, 8, 10, 12).contiguous(memory_format=layout)
    upstream = torch.randn(3, 8, 10, 12)
    results = []
    for fused in (True, False):
        xs, os_ = x.clone().requires_grad_(), other.clone().requires_grad_()
        conv.zero_grad()
        if fused:
            y = cpu_fusion.conv_add(cpu_fusion.conv_leaky_relu(xs, conv, 0.2), conv, os_)
        else:
            y = conv(F.leaky_relu(conv(xs), 0.2)) + os_
        (y * upstream).sum().backward()
        results.append([y, xs.grad, os_.grad, conv.weight.grad, conv.bias.grad])
    assert (results[1][0] < 0).any()  # both branches of the LeakyReLU are exercised
    for name, a, b in zip(["y", "x.grad", "other.grad", "weight.grad", "bias.grad"], *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_only_bf16_cpu_tensors_take_the_fused_path():
    assert cpu_fusion.applies(torch.zeros(1, dtype=torch.bfloat16))
    assert not cpu_fusion.applies(torch.zeros(1))  # fp32: measured slower fused, stays unfused


def test_fused_network_has_bf16_accuracy(monkeypatch):
    """The whole network in bf16 with and without the fused pairs, against fp32: the fused path's
    output and every parameter gradient are as close to fp32 as the unfused bf16 path's (bf16
    rounding differs between the two, by design: the fused op rounds once instead of twice)."""
    torch.manual_seed(0)
    model = build_unet(model_config("flowers64", image_size=32)).to(memory_format=torch.channels_last)
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

    assert any(not torch.equal(f, p) for f, p in zip(fused, plain))  # the fused path really ran
    for i, (e, p, f) in enumerate(zip(exact, plain, fused)):
        # bf16 has an 8-bit mantissa (relative rounding 2^-9 = 0.2%); errors that accumulate over
        # the network land at 1-5% here for both paths, the fused one at most 1.2x the unfused.
        assert err(f, e) <= 1.5 * err(p, e) + 1e-3, f"tensor {i}: fused {err(f, e):.4f}, unfused {err(p, e):.4f}"
