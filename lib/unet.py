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
from lib.diffusion import SIGNAL_RATES

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
    # flowers64's widths with the recipe study's network levers on (NETWORK_OPTIONS; docs/recipes.md).
    "flowers64-v2": dict(
        image_size=64,
        widths=(32, 64, 96, 128),
        embedding_dim=32,
        block_depth=2,
        adaptive_norm=True,
        attention=True,
        activation="silu",
        zero_init=True,
    ),
}

# Departures from the original network, each a config key that an old config lacks (so it reads
# as the original's value) and an sd_train.py flag:
#   adaptive_norm  the noise level (and class) also scale and shift every block's normalized input,
#                  not only the input image (AdaGN of Dhariwal & Nichol 2021, on BatchNorm here),
#                  through one MLP of the embeddings, 4 x embedding_dim wide (as DDPM's)
#   attention      multi-head self-attention in the bottleneck (DDPM, Ho et al. 2020: 8x8 at 64 px),
#                  heads of ATTENTION_HEAD_DIM channels, GroupNorm of up to 32 groups before it
#   activation     "leaky_relu" (the original's) or "silu" (DDPM and most later U-Nets)
#   zero_init      the output conv starts at zero, so the first prediction is 0 rather than noise
NETWORK_OPTIONS = dict(adaptive_norm=False, attention=False, activation="leaky_relu", zero_init=False)
ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}
ATTENTION_HEAD_DIM = 32


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
    """[1x1 conv if the width changes] -> x + conv3(act(conv3(bn(x)))); with cond_dim > 0,
    bn(x) * (1 + scale) + shift in place of bn(x), scale and shift linear in the conditioning."""

    def __init__(self, in_ch, out_ch, activation="leaky_relu", cond_dim=0):
        super().__init__()
        # The original allocates this conv in every block; it only runs where widths differ, so we
        # only allocate it there (no dead weights; the original's extra keys are dropped on load).
        self.channel_adaptation = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.block = nn.Sequential(
            nn.BatchNorm2d(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            ACTIVATIONS[activation](),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        # Zero at the start: a new block begins with an unmodulated norm, as the plain block (DiT's
        # adaLN-Zero goes further: it also zeroes a gate on the residual, making the block the identity).
        self.modulation = nn.Linear(cond_dim, 2 * out_ch) if cond_dim else None
        if self.modulation is not None:
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def residual(self, x, fuse_ops=False, cond=None):
        """The block after channel adaptation: (B, out_ch, H, W) -> (B, out_ch, H, W); cond: (B, D)
        for an adaptive-norm block.

        fuse_ops: where lib/cpu_fusion.py applies (bf16 on a CPU), the second convolution runs with
        the residual add, and the first with a LeakyReLU after it, as one oneDNN call each: the
        same function (a SiLU runs on its own)."""
        norm, conv1, act, conv2 = self.block
        h = norm(x)
        if self.modulation is not None:
            scale, shift = self.modulation(cond).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)  # h * (1 + scale) + shift in one pass
        if not (fuse_ops and cpu_fusion.applies(x)):
            return x + conv2(act(conv1(h)))
        if isinstance(act, nn.LeakyReLU):
            h = cpu_fusion.conv_leaky_relu(h, conv1, act.negative_slope)
        else:  # oneDNN's fused SiLU would have to keep the conv's output for its backward anyway
            h = act(conv1(h))
        return cpu_fusion.conv_add(h, conv2, x)

    def forward(self, x, fuse_ops=False, cond=None):
        if self.channel_adaptation is not None:
            x = self.channel_adaptation(x)
        return self.residual(x, fuse_ops, cond)


class SelfAttention(nn.Module):
    """x + proj(attention(norm(x))) over the pixels of a small map, heads of ATTENTION_HEAD_DIM
    channels (Vaswani et al. 2017; at 8x8 that is 64 tokens). proj starts at zero: the block
    begins as the identity."""

    def __init__(self, channels):
        super().__init__()
        if channels % ATTENTION_HEAD_DIM:
            raise ValueError(f"attention needs a multiple of {ATTENTION_HEAD_DIM} channels, got {channels}")
        self.heads = channels // ATTENTION_HEAD_DIM
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """One resolution level: `block_depth` residual blocks (a container; UNet.forward runs it)."""

    def __init__(self, in_channels, width, block=ResidualBlock):
        super().__init__()
        self.residual_blocks = nn.ModuleList(block(c, width) for c in in_channels)


class UNet(nn.Module):
    """widths=(w0, ..., wL): L down levels at w0..w(L-1), a bottleneck at wL, L up levels.

    literal=True runs the original's formulation (embedding upsampled to a full map and
    concatenated); literal=False (default) runs an exactly equivalent, cheaper one (see forward).
    """

    def __init__(self, widths, embedding_dim, block_depth, literal=False, num_classes=0, **options):
        super().__init__()
        unknown = set(options) - set(NETWORK_OPTIONS)
        if unknown:
            raise ValueError(f"unknown network options {sorted(unknown)}")
        opt = {**NETWORK_OPTIONS, **options}
        if opt["activation"] not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {opt['activation']!r}; choose from {', '.join(ACTIVATIONS)}"
            )
        self.widths, self.embedding_dim, self.block_depth = tuple(widths), embedding_dim, block_depth
        self.literal, self.num_classes = literal, num_classes
        *level_widths, bottom = self.widths
        self.in_conv = nn.Conv2d(3, level_widths[0], 1)
        # Class-conditional: a learned vector per class, plus one for "no class" (index
        # num_classes, what label dropout trains and unguided sampling uses), enters beside the
        # noise embedding: both are constant over the image.
        self.class_embedding = nn.Embedding(num_classes + 1, embedding_dim) if num_classes else None
        conditions = embedding_dim * (2 if num_classes else 1)
        # adaptive_norm: one MLP of the embeddings, read by every block (as DDPM's time embedding)
        cond_dim = 4 * embedding_dim if opt["adaptive_norm"] else 0
        self.cond_mlp = nn.Sequential(nn.Linear(conditions, cond_dim), nn.SiLU()) if cond_dim else None

        def block(c_in, c_out):
            return ResidualBlock(c_in, c_out, opt["activation"], cond_dim)

        self.down_blocks = nn.ModuleList()
        ch = level_widths[0] + conditions  # cat([in_conv(x), embeddings])
        for w in level_widths:
            self.down_blocks.append(Level([ch] + [w] * (block_depth - 1), w, block))
            ch = w
        self.bottleneck = nn.ModuleList(block(c, bottom) for c in [ch] + [bottom] * (block_depth - 1))
        self.attention = SelfAttention(bottom) if opt["attention"] else None  # after the first block
        ch = bottom

        # Each up block consumes the skips of the matching down block, last saved first used.
        self.up_blocks = nn.ModuleList()
        for w in reversed(level_widths):
            in_channels = []
            for _ in range(block_depth):
                in_channels.append(ch + w)
                ch = w
            self.up_blocks.append(Level(in_channels, w, block))
        self.out_conv = nn.Conv2d(level_widths[0], 3, 1)
        if opt["zero_init"]:
            nn.init.zeros_(self.out_conv.weight)
            nn.init.zeros_(self.out_conv.bias)

    def forward(self, x, noise_var, labels=None):
        """x: (B, 3, H, W) noisy images; noise_var: (B,) noise_rate**2; labels: (B,) class indices
        of a class-conditional network (None or num_classes: no class) -> (B, 3, H, W) noise."""
        e = self.embed(noise_var, labels).to(x.dtype)
        c = None if self.cond_mlp is None else self.cond_mlp(e)
        return self._forward_literal(x, e, c) if self.literal else self._forward_fused(x, e, c)

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

    def _forward_literal(self, x, e, c):
        """The original's computation, step by step."""
        e_map = F.interpolate(e[:, :, None, None], size=x.shape[-2:], mode="bilinear", align_corners=True)
        h = torch.cat([self.in_conv(x), e_map], dim=1)  # (B, w0 + E, H, W)
        skips = []
        for level in self.down_blocks:
            for block in level.residual_blocks:
                h = block(h, cond=c)  # (B, w_i, H/2^i, W/2^i)
                skips.append(h)
            h = F.avg_pool2d(h, 2)
        h = self._bottleneck(h, c, fuse_ops=False)  # (B, wL, H/2^L, W/2^L)
        for level in self.up_blocks:
            h = upsample(h)
            for block in level.residual_blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), cond=c)  # last saved skip first
        return self.out_conv(h)  # (B, 3, H, W)

    def _forward_fused(self, x, e, c):
        """The same function with fewer operations, by exact identities of linear maps.

        A 1x1 conv of a concatenation is the sum of 1x1 convs of its parts, so
        1. in_conv, the concatenated embedding (constant over space) and the first 1x1 conv fold
           into one 3-channel 1x1 conv plus a per-image bias: no (w0 + E)-channel map is built;
        2. in each up level, the 1x1 conv of cat([upsample(h), skip]) splits, and its h part
           commutes with the upsampling (one mixes channels, the other mixes pixels with weights
           that sum to 1): it runs at the low resolution, and fewer channels are upsampled;
        3. on a CPU in bf16 the blocks run their convolutions fused with LeakyReLU and the
           residual add (lib/cpu_fusion.py; a SiLU runs on its own).
        tests/test_unet.py checks 1 and 2 (outputs and gradients against _forward_literal, fp64),
        tests/test_cpu_fusion.py checks 3; docs/speed.md says what each saves.
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
                h = step(h, fuse_ops=True, cond=c)  # (B, w_i, H/2^i, W/2^i)
                skips.append(h)
            h = F.avg_pool2d(h, 2)
        h = self._bottleneck(h, c, fuse_ops=True)  # (B, wL, H/2^L, W/2^L)
        for level in self.up_blocks:
            first, *rest = level.residual_blocks
            a_h, a_s = first.channel_adaptation.weight.split([h.shape[1], skips[-1].shape[1]], dim=1)
            h = upsample(F.conv2d(h, a_h)) + F.conv2d(skips.pop(), a_s, first.channel_adaptation.bias)
            h = first.residual(h, fuse_ops=True, cond=c)  # (B, w, 2h, 2w)
            for block in rest:
                h = block(torch.cat([h, skips.pop()], dim=1), fuse_ops=True, cond=c)
        return self.out_conv(h)  # (B, 3, H, W)

    def _bottleneck(self, h, c, fuse_ops):
        for i, block in enumerate(self.bottleneck):
            h = block(h, fuse_ops, c)
            if i == 0 and self.attention is not None:
                h = self.attention(h)
        return h


def upsample(h):
    """Bilinear 2x, corners aligned (the original's nn.UpsamplingBilinear2d)."""
    return F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)


def model_config(preset, image_size=None, widths=None, block_depth=None, **options):
    """The preset's config dict (what a checkpoint stores), with optional overrides of the image
    size, widths and block depth, and network options (None: the preset's). Options at the
    original's value are left out, so the original's networks keep the original's config."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = dict(PRESETS[preset])
    cfg["widths"] = list(cfg["widths"] if widths is None else widths)
    if len(cfg["widths"]) < 2 or min(cfg["widths"]) < 1:
        raise ValueError(f"widths must be two or more positive numbers (levels, bottleneck), got {widths}")
    if block_depth is not None:
        if block_depth < 1:
            raise ValueError(f"block depth must be >= 1, got {block_depth}")
        cfg["block_depth"] = block_depth
    if image_size is not None:
        cfg["image_size"] = image_size
    for key, value in options.items():
        if key not in NETWORK_OPTIONS:
            raise ValueError(f"unknown network option {key!r}")
        if value is not None:
            cfg[key] = value
        if cfg.get(key, NETWORK_OPTIONS[key]) == NETWORK_OPTIONS[key]:
            cfg.pop(key, None)
    check_image_size(cfg["image_size"], len(cfg["widths"]) - 1)
    if cfg.get("attention") and cfg["widths"][-1] % ATTENTION_HEAD_DIM:
        raise ValueError(
            f"attention needs a bottleneck width that is a multiple of {ATTENTION_HEAD_DIM}, "
            f"got {cfg['widths'][-1]}"
        )
    return cfg


def check_image_size(image_size, num_levels):
    step = 2**num_levels
    if image_size <= 0 or image_size % step:
        raise ValueError(
            f"image size {image_size} must be a positive multiple of {step} "
            f"(the network halves it {num_levels} times)"
        )


# Every key a config may hold (lib/checkpoint.py refuses others, written by a newer version): the
# network's, the input scale of the space its weights were trained in (model_stats), the
# schedule's ends they were trained on (signal_rates), and a few-step student's settings
# (distilled: lib/distill.py).
CONFIG_KEYS = {"image_size", "widths", "embedding_dim", "block_depth", "prediction", "num_classes", "classes"}
CONFIG_KEYS |= {"input_scale", "signal_rates", "distilled", *NETWORK_OPTIONS}


def check_signal_rates(rates):
    """The schedule's ends (signal rate at t=0, at t=1) -> a tuple of two floats, or ValueError."""
    try:
        high, low = (float(r) for r in rates)
    except (TypeError, ValueError):
        raise ValueError(f"signal rates must be two numbers (at t=0, at t=1), got {rates!r}") from None
    if not 0 < low < high < 1:
        raise ValueError(f"signal rates must satisfy 0 < at t=1 < at t=0 < 1, got {high:g} and {low:g}")
    return high, low


def check_distilled(info):
    """A student's config entry {"steps", "teacher_steps", "guidance"} -> itself, or ValueError."""
    try:
        steps, teacher_steps, guidance = info["steps"], info["teacher_steps"], float(info["guidance"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"distilled must hold steps, teacher_steps and guidance, got {info!r}") from None
    if not (isinstance(steps, int) and isinstance(teacher_steps, int) and 1 <= steps <= teacher_steps):
        raise ValueError(f"distilled steps must be whole numbers, 1 <= steps <= teacher_steps, got {info!r}")
    if not guidance >= 0:
        raise ValueError(f"distilled guidance must be >= 0, got {info['guidance']!r}")
    return dict(steps=steps, teacher_steps=teacher_steps, guidance=guidance)


def build_unet(cfg, literal=False):
    """The network a config describes; "num_classes" (absent: 0) makes it class-conditional, and
    NETWORK_OPTIONS keys (absent: the original's) choose the departures from the original. The
    network carries the schedule's ends it is trained on ("signal_rates", absent: the original's),
    which the loss and the samplers read (lib.diffusion.signal_rates_of), and a student its
    distillation settings ("distilled", lib.distill.distilled_of)."""
    options = {k: cfg[k] for k in NETWORK_OPTIONS if k in cfg}
    net = UNet(
        cfg["widths"], cfg["embedding_dim"], cfg["block_depth"], literal, cfg.get("num_classes", 0), **options
    )
    net.signal_rates = check_signal_rates(cfg.get("signal_rates", SIGNAL_RATES))
    if "distilled" in cfg:
        net.distilled = check_distilled(cfg["distilled"])
    return net


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
