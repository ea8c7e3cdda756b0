"""The noise-predicting U-Net of the original repo, and the table of named presets.

The network maps (noisy image, noise variance) to the predicted noise. It knows nothing about the
diffusion schedule: the diffusion code (lib/diffusion.py) decides which variance goes with which
image. Attribute names follow the original so that its state dicts map onto ours key for key.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import cpu_fusion

# Every model-shaping default lives here. `image_size` is a property of the data the network is
# trained on, not of the network (which is fully convolutional), but it travels with the preset.
PRESETS = {
    # The original repo: 128x128, four down levels (128 -> 8), 65,289,475 parameters.
    "sd128": dict(image_size=128, widths=(64, 128, 256, 512, 1024), embedding_dim=64, block_depth=2),
    # A small model that trains on a laptop CPU: 64x64, three down levels (64 -> 8), 1,713,059 parameters.
    "flowers64": dict(image_size=64, widths=(32, 64, 96, 128), embedding_dim=32, block_depth=2),
    # The original's four down levels at a quarter of its parameters (16,329,347; its widths halved):
    # 128 px trained on one GPU in minutes, 33 MB in fp16, small enough to ship in the repo.
    "flowers128": dict(image_size=128, widths=(32, 64, 128, 256, 512), embedding_dim=32, block_depth=2),
}


def sinusoidal_embedding(noise_var, dim):
    """Embed one scalar per image as [sin(2*pi*f*v), cos(2*pi*f*v)], f log-spaced in [1, 1000].

    noise_var: (B,) -> (B, dim). Log-spaced frequencies let the network resolve both the small
    and the large noise levels (the Transformer positional encoding, Vaswani et al. 2017, used on
    a continuous variable as in NeRF's Fourier features).
    """
    freqs = torch.exp(torch.linspace(math.log(1.0), math.log(1000.0), dim // 2, device=noise_var.device))
    angles = 2.0 * math.pi * freqs * noise_var.float()[:, None]  # (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResidualBlock(nn.Module):
    """[1x1 conv if the width changes] -> x + conv3(lrelu(conv3(bn(x))))."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        # The original allocates this conv in every block; it only runs where widths differ, so we
        # only allocate it there (no dead weights; the original's extra keys are dropped on load).
        self.channel_adaptation = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.block = nn.Sequential(
            nn.BatchNorm2d(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.LeakyReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )

    def residual(self, x, fuse_ops=False):
        """The block after channel adaptation: (B, out_ch, H, W) -> (B, out_ch, H, W).

        fuse_ops: where lib/cpu_fusion.py applies (bf16 on a CPU), each convolution runs with the
        step after it, LeakyReLU or the residual add, as one oneDNN call: the same function."""
        if fuse_ops and cpu_fusion.applies(x):
            norm, conv1, act, conv2 = self.block
            return cpu_fusion.conv_add(
                cpu_fusion.conv_leaky_relu(norm(x), conv1, act.negative_slope), conv2, x
            )
        return x + self.block(x)

    def forward(self, x, fuse_ops=False):
        if self.channel_adaptation is not None:
            x = self.channel_adaptation(x)
        return self.residual(x, fuse_ops)


class Level(nn.Module):
    """One resolution level: `block_depth` residual blocks (a container; UNet.forward runs it)."""

    def __init__(self, in_channels, width):
        super().__init__()
        self.residual_blocks = nn.ModuleList(ResidualBlock(c, width) for c in in_channels)


class UNet(nn.Module):
    """widths=(w0, ..., wL): L down levels at w0..w(L-1), a bottleneck at wL, L up levels.

    literal=True runs the original's formulation (embedding upsampled to a full map and
    concatenated); literal=False (default) runs an exactly equivalent, cheaper one (see forward).
    """

    def __init__(self, widths, embedding_dim, block_depth, literal=False, num_classes=0):
        super().__init__()
        self.widths, self.embedding_dim, self.block_depth = tuple(widths), embedding_dim, block_depth
        self.literal, self.num_classes = literal, num_classes
        *level_widths, bottom = self.widths
        self.in_conv = nn.Conv2d(3, level_widths[0], 1)
        # Class-conditional: a learned vector per class, plus one for "no class" (index
        # num_classes, what label dropout trains and unguided sampling uses), enters beside the
        # noise embedding: both are constant over the image.
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes else None
        conditions = embedding_dim * (2 if num_classes else 1)

        self.down_blocks = nn.ModuleList()
        ch = level_widths[0] + conditions  # cat([in_conv(x), embeddings])
        for w in level_widths:
            self.down_blocks.append(Level([ch] + [w] * (block_depth - 1), w))
            ch = w
        self.bottleneck = nn.ModuleList(ResidualBlock(c, bottom) for c in [ch] + [bottom] * (block_depth - 1))
        ch = bottom

        # Each up block consumes the skips of the matching down block, last saved first used.
        self.up_blocks = nn.ModuleList()
        for w in reversed(level_widths):
            in_channels = []
            for _ in range(block_depth):
                in_channels.append(ch + w)
                ch = w
            self.up_blocks.append(Level(in_channels, w))
        self.out_conv = nn.Conv2d(level_widths[0], 3, 1)

    def forward(self, x, noise_var, labels=None):
        """x: (B, 3, H, W) noisy images; noise_var: (B,) noise_rate**2; labels: (B,) class indices
        of a class-conditional network (None or num_classes: no class) -> (B, 3, H, W) noise."""
        e = self.embed(noise_var, labels).to(x.dtype)
        return self._forward_literal(x, e) if self.literal else self._forward_fused(x, e)

    def embed(self, noise_var, labels):
        """-> (B, E) or (B, 2E): the noise level's sinusoidal features, then the class's vector."""
        e = sinusoidal_embedding(noise_var, self.embedding_dim)
        if self.class_embedding is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional network")
            return e
        if labels is None:
            labels = torch.full(noise_var.shape, self.num_classes, device=noise_var.device)
        return torch.cat([e, self.class_embedding(labels).float()], dim=1)

    def _forward_literal(self, x, e):
        """The original's computation, step by step."""
        e_map = F.interpolate(e[:, :, None, None], size=x.shape[-2:], mode="bilinear", align_corners=True)
        h = torch.cat([self.in_conv(x), e_map], dim=1)  # (B, w0 + E, H, W)
        skips = []
        for level in self.down_blocks:
            for block in level.residual_blocks:
                h = block(h)  # (B, w_i, H/2^i, W/2^i)
                skips.append(h)
            h = F.avg_pool2d(h, 2)
        for block in self.bottleneck:
            h = block(h)  # (B, wL, H/2^L, W/2^L)
        for level in self.up_blocks:
            h = upsample(h)
            for block in level.residual_blocks:
                h = block(torch.cat([h, skips.pop()], dim=1))  # last saved skip first
        return self.out_conv(h)  # (B, 3, H, W)

    def _forward_fused(self, x, e):
        """The same function with fewer operations, by exact identities of linear maps.

        A 1x1 conv of a concatenation is the sum of 1x1 convs of its parts, so
        1. in_conv, the concatenated embedding (constant over space) and the first 1x1 conv fold
           into one 3-channel 1x1 conv plus a per-image bias: no (w0 + E)-channel map is built;
        2. in each up level, the 1x1 conv of cat([upsample(h), skip]) splits, and its h part
           commutes with the upsampling (one mixes channels, the other mixes pixels with weights
           that sum to 1): it runs at the low resolution, and fewer channels are upsampled;
        3. on a CPU in bf16 the blocks run their convolutions fused with LeakyReLU and the
           residual add (lib/cpu_fusion.py).
        tests/test_unet.py checks 1 and 2 (outputs and gradients against _forward_literal, fp64),
        tests/test_cpu_fusion.py checks 3; README's "Speed" says what each saves.
        """
        w0 = self.widths[0]
        adapt = self.down_blocks[0].residual_blocks[0].channel_adaptation
        a_x, a_e = adapt.weight.flatten(1).split([w0, e.shape[1]], dim=1)  # (w0, w0), (w0, E)
        weight = (a_x @ self.in_conv.weight.flatten(1))[:, :, None, None]  # (w0, 3, 1, 1)
        per_image = F.linear(e, a_e, a_x @ self.in_conv.bias + adapt.bias)  # (B, w0)
        h = F.conv2d(x, weight) + per_image[:, :, None, None]  # (B, w0, H, W)
        skips = []
        for i, level in enumerate(self.down_blocks):
            for j, block in enumerate(level.residual_blocks):
                step = block.residual if i == j == 0 else block  # the fold above did the first adaptation
                h = step(h, fuse_ops=True)  # (B, w_i, H/2^i, W/2^i)
                skips.append(h)
            h = F.avg_pool2d(h, 2)
        for block in self.bottleneck:
            h = block(h, fuse_ops=True)  # (B, wL, H/2^L, W/2^L)
        for level in self.up_blocks:
            first, *rest = level.residual_blocks
            a_h, a_s = first.channel_adaptation.weight.split([h.shape[1], skips[-1].shape[1]], dim=1)
            h = upsample(F.conv2d(h, a_h)) + F.conv2d(skips.pop(), a_s, first.channel_adaptation.bias)
            h = first.residual(h, fuse_ops=True)  # (B, w, 2h, 2w)
            for block in rest:
                h = block(torch.cat([h, skips.pop()], dim=1), fuse_ops=True)
        return self.out_conv(h)  # (B, 3, H, W)


def upsample(h):
    """Bilinear 2x, corners aligned (the original's nn.UpsamplingBilinear2d)."""
    return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)


def model_config(preset, image_size=None):
    """The preset's config dict (what a checkpoint stores), with an optional image-size override."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    cfg["widths"] = list(cfg["widths"])
    if image_size is not None:
        cfg["image_size"] = image_size
    check_image_size(cfg["image_size"], len(cfg["widths"]) - 1)
    return cfg


def check_image_size(image_size, num_levels):
    step = 2**num_levels
    if image_size <= 0 or image_size % step:
        raise ValueError(
            f"image size {image_size} must be a positive multiple of {step} "
            f"(the network halves it {num_levels} times)"
        )


def build_unet(cfg, literal=False):
    """The network a config describes; "num_classes" (absent: 0) makes it class-conditional."""
    return UNet(cfg["widths"], cfg["embedding_dim"], cfg["block_depth"], literal, cfg.get("num_classes", 0))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
