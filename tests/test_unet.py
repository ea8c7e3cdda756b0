import pytest
import torch

from conftest import randomize_zeros
from lib.unet import (
    PRESETS,
    SelfAttention,
    UNet,
    build_unet,
    count_parameters,
    model_config,
    sinusoidal_embedding,
)


@pytest.mark.parametrize(
    "preset,params",
    [
        ("sd128", 65_289_475),
        ("flowers64", 1_713_059),
        ("flowers128", 16_329_347),
        ("flowers64-v2", 2_047_779),
    ],
)
def test_exact_parameter_counts(preset, params):
    assert count_parameters(build_unet(model_config(preset))) == params


@pytest.mark.parametrize("preset,batch", [("sd128", 1), ("flowers64", 3)])
def test_output_shape_matches_input(preset, batch):
    cfg = model_config(preset)
    s = cfg["image_size"]
    model = build_unet(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, s, s), torch.rand(batch))
    assert out.shape == (batch, 3, s, s)
    assert torch.isfinite(out).all()


def test_any_multiple_of_the_level_count_works():
    model = build_unet(model_config("flowers64", image_size=40)).eval()  # 40 = 5 * 2^3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 40, 40), torch.rand(2)).shape == (2, 3, 40, 40)
    with pytest.raises(ValueError, match="multiple of 8"):
        model_config("flowers64", image_size=36)
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("nope")


def test_embedding_formula():
    v = torch.tensor([0.0, 0.25, 1.0])
    e = sinusoidal_embedding(v, 8)
    freqs = torch.tensor([1.0, 10.0, 100.0, 1000.0])  # log-spaced 1..1000, dim/2 of them
    angles = 2 * torch.pi * freqs * v[:, None]
    # fp32 angles up to 2*pi*1000: absolute error ~1e-4 rad
    torch.testing.assert_close(e, torch.cat([angles.sin(), angles.cos()], 1), rtol=0, atol=1e-3)


def test_no_dead_adaptation_convs():
    model = build_unet(model_config("flowers64"))
    for block in model.modules():
        if hasattr(block, "channel_adaptation") and block.channel_adaptation is not None:
            assert block.channel_adaptation.in_channels != block.channel_adaptation.out_channels


@pytest.mark.parametrize("preset,classes", [(p, 0) for p in PRESETS] + [("flowers64-v2", 3)])
def test_fused_embedding_equals_literal_formulation(preset, classes):
    """The folded in_conv + per-image embedding bias equals upsample + concat + 1x1 conv,
    in the forward pass and in every gradient, in train mode (BatchNorm batch statistics); with
    the network options and classes too."""
    torch.manual_seed(0)
    cfg = model_config(preset, image_size=32 if preset == "sd128" else 64)
    if classes:
        cfg["num_classes"] = classes
    s = cfg["image_size"]
    fused = build_unet(cfg)
    randomize_zeros(fused)
    literal = build_unet(cfg, literal=True)
    literal.load_state_dict(fused.state_dict())
    x, v = torch.randn(2, 3, s, s, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    labels = [torch.tensor([0, classes])] if classes else []  # a class and "no class"
    fused.double(), literal.double()
    out_f, out_l = fused(x, v, *labels), literal(x, v, *labels)
    torch.testing.assert_close(out_f, out_l, rtol=1e-9, atol=1e-9)
    out_f.square().sum().backward()
    out_l.square().sum().backward()
    for (name, pf), pl in zip(fused.named_parameters(), literal.parameters(), strict=True):
        assert pf.grad.abs().sum() > 0, name  # every part of the network is used
        torch.testing.assert_close(pf.grad, pl.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_each_image_is_conditioned_on_its_own_noise_variance():
    # The network's only conditioning is the variance given with each image (it never sees the
    # schedule): changing one image's variance changes that image's output and no other.
    model = UNet((8, 16), 8, 1).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a, b = model(x, torch.tensor([0.1, 0.9])), model(x, torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_new_blocks_start_as_the_identity_and_zero_init_predicts_zero():
    torch.manual_seed(0)
    plain = build_unet(model_config("flowers64", image_size=32)).eval()
    cfg = model_config("flowers64", image_size=32, adaptive_norm=True, attention=True)
    added = build_unet(cfg).eval()
    added.load_state_dict(plain.state_dict(), strict=False)  # the shared weights
    x, v = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(added(x, v), plain(x, v))
        assert not build_unet(model_config("flowers64-v2", image_size=32)).eval()(x, v).any()


def test_attention_is_softmax_attention_over_pixels():
    torch.manual_seed(0)
    attn = SelfAttention(64).double()  # two heads of 32 channels
    randomize_zeros(attn)
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    q, k, v = attn.qkv(attn.norm(x)).flatten(2).chunk(3, dim=1)  # each (B, 64, 16)
    heads = []
    for h in range(2):
        qh, kh, vh = (t[:, 32 * h : 32 * (h + 1)] for t in (q, k, v))
        weights = torch.softmax(qh.transpose(1, 2) @ kh / 32**0.5, dim=-1)  # (B, 16 queries, 16 keys)
        heads.append(vh @ weights.transpose(1, 2))  # (B, 32, 16)
    expected = x + attn.proj(torch.cat(heads, 1).reshape(2, 64, 4, 4))
    torch.testing.assert_close(attn(x), expected)


def test_network_options_are_checked_and_left_out_at_the_originals_values():
    assert model_config("flowers64", activation="leaky_relu", attention=False) == model_config("flowers64")
    assert "attention" not in model_config("flowers64-v2", attention=False)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        build_unet(dict(model_config("flowers64"), activation="gelu"))
    with pytest.raises(ValueError, match="unknown network option"):
        model_config("flowers64", dropout=0.1)


def test_widths_and_depth_override_the_preset():
    cfg = model_config("flowers64-v2", image_size=32, widths=[32, 48, 64], block_depth=1)
    assert (cfg["widths"], cfg["block_depth"], cfg["attention"]) == ([32, 48, 64], 1, True)
    model = build_unet(cfg).eval()
    assert len(model.down_blocks) == len(model.up_blocks) == 2  # one level per width but the last
    assert all(len(level.residual_blocks) == 1 for level in [*model.down_blocks, *model.up_blocks])
    assert len(model.bottleneck) == 1 and model.bottleneck[0].block[1].out_channels == 64
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32), torch.rand(2)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="two or more positive"):
        model_config("flowers64", widths=[64])
    with pytest.raises(ValueError, match="two or more positive"):
        model_config("flowers64", widths=[0, 64])
    with pytest.raises(ValueError, match="block depth must be >= 1"):
        model_config("flowers64", block_depth=0)
    with pytest.raises(ValueError, match="multiple of 32, got 100"):
        model_config("flowers64-v2", widths=[32, 64, 96, 100])
    with pytest.raises(ValueError, match="must be a positive multiple of 16"):
        model_config("flowers64", widths=[8, 16, 32, 64, 128], image_size=40)
