"""Turn a trained network into pictures: fixed-seed noise -> DDIM -> images in [0, 1]."""
import torch

from lib.data import to_image_space
from lib.diffusion import ddim_sample
from lib.runtime import autocast


def initial_noise(num_images, image_size, seed):
    """(N, 3, S, S) standard Gaussian noise drawn on the CPU, so one seed gives the same images on
    every device (CUDA's generator would draw different numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, image_size, image_size, generator=g)


@torch.inference_mode()
def generate(model, noise, mean, std, steps=20, eta=0.0, seed=0, precision="fp32", batch_size=64):
    """noise: (N, 3, S, S) on the CPU -> (N, 3, S, S) float images in [0, 1] on the CPU.

    The model must be in eval mode (BatchNorm running statistics). Large N runs in batches.
    `seed` drives the fresh noise of eta > 0 (one generator for the whole call).
    """
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    out = []
    for chunk in noise.split(batch_size):
        x = chunk.to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            x0 = ddim_sample(model, x, steps=steps, eta=eta, generator=g)
        out.append(to_image_space(x0, mean, std).cpu())
    return torch.cat(out)
