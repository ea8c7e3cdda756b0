"""Pixels <-> the model's space: per-channel normalization x -> (x - mean) / std, and back."""

import torch

from lib.cli import UserError

# Per-channel statistics of Flowers102 (the original's numbers), for the normalization x -> (x - mean) / std.
FLOWERS_MEAN = (0.4750, 0.3940, 0.3079)
FLOWERS_STD = (0.2218, 0.2075, 0.2036)


def model_stats(ckpt):
    """-> (mean, std) that take a checkpoint's pixels into its network's space: the data's
    per-channel statistics ("norm"), with std divided by the run's input scale (config
    "input_scale", sd_train.py --input-scale; 1 where absent): x -> b (x - mean) / std_data."""
    scale = ckpt["config"].get("input_scale", 1.0)
    return list(ckpt["norm"]["mean"]), [s / scale for s in ckpt["norm"]["std"]]


def compute_stats(images, chunk=512):
    """Per-channel mean and std (over all pixels, in [0, 1]) of a uint8 (N, 3, H, W) tensor."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for part in images.split(chunk):
        x = part.double().div(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(0).sqrt()
    if std.min() < 1e-3:  # normalizing would divide by ~0: NaN losses from the first step
        raise UserError(
            f"the images do not vary in colour channel {'RGB'[int(std.argmin())]} (std {std.min():.1e}): "
            "nothing to normalize or learn"
        )
    return mean.tolist(), std.tolist()


def to_model_space(images, mean, std, flip_generator=None):
    """uint8 (or float in [0, 1]) (B,3,H,W) -> normalized float; with a generator, each image is
    mirrored with p=1/2."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    if flip_generator is not None:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=flip_generator) < 0.5
        x = torch.where(flip, x.flip(3), x)
    return (x - per_channel(mean, x.device)) / per_channel(std, x.device)


def per_channel(values, device):
    """Three per-channel numbers -> (1, 3, 1, 1) on the device, sent without waiting: a blocking
    host-to-device copy would make the host wait for the GPU's queue at every training step."""
    device = torch.device(device)
    # Only CUDA copies a pageable temporary safely without waiting (MPS may read it once freed).
    return (
        torch.as_tensor(values, dtype=torch.float32)
        .view(1, 3, 1, 1)
        .to(device, non_blocking=device.type == "cuda")
    )


def to_image_space(x, mean, std):
    """Normalized (B,3,H,W) -> float images clamped to [0, 1]."""
    return (x.float() * per_channel(std, x.device) + per_channel(mean, x.device)).clamp(0, 1)
