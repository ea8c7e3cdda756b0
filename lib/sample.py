"""Turn a trained network into pictures: seeded noise (or a noised drawing) -> sampler -> images in [0, 1]."""

import torch

from lib.diffusion import Guided, add_noise, signal_rates_of, unwrapped
from lib.normalization import to_image_space, to_model_space
from lib.runtime import autocast
from lib.samplers import MIN_EVALUATIONS, sample


def initial_noise(num_images, image_size, seed):
    """(N, 3, S, S) standard Gaussian noise drawn on the CPU, so one seed gives the same images on
    every device (CUDA's generator would draw different numbers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, image_size, image_size, generator=g)


@torch.inference_mode()
def generate(
    model,
    noise,
    mean,
    std,
    steps=20,
    eta=0.0,
    seed=0,
    precision="fp32",
    batch_size=64,
    t_start=1.0,
    sampler="ddim",
    spacing=None,
    labels=None,
    guidance=1.0,
):
    """noise: (N, 3, S, S) on the CPU, the state at t_start -> (N, 3, S, S) float images in
    [0, 1] on the CPU.

    The model must be in eval mode (BatchNorm running statistics). Large N runs in batches.
    sampler, steps (network evaluations), eta and spacing: lib/samplers.py's sample(). labels
    (N,) ask a class-conditional model for these classes, with classifier-free guidance of
    scale `guidance` (lib/diffusion.py's Guided); None samples it without a class.
    `seed` drives the fresh noise of eta > 0: one generator for the whole call, on the model's
    device, seeded apart from initial_noise's stream (else its first draw would repeat the
    starting noise). With eta > 0 the images therefore also depend on the device and batch_size.
    """
    device = next(model.parameters()).device
    # An offset far from any seed people use (the CPU generator keeps only the low 32 bits).
    g = torch.Generator(device).manual_seed((seed + 0x9E3779B9) % 2**32)
    out = []
    label_chunks = [None] * len(noise.split(batch_size)) if labels is None else labels.split(batch_size)
    for chunk, chunk_labels in zip(noise.split(batch_size), label_chunks, strict=True):
        x = chunk.to(device).contiguous(memory_format=torch.channels_last)
        net = model
        if chunk_labels is not None:
            net = Guided(model, chunk_labels.to(device), guidance, null_label=num_classes(model))
        with autocast(device, precision):
            x0 = sample(sampler, net, x, steps, eta, g, t_start, spacing=spacing)
        out.append(to_image_space(x0, mean, std).cpu())
    return torch.cat(out)


def num_classes(model):
    """The classes of a network, through its wrappers; 0 if unconditional."""
    net = unwrapped(model, "num_classes")
    return 0 if net is None else net.num_classes


def slerp(z0, z1, alpha):
    """Spherical interpolation between two noise tensors (per image; Shoemake 1985): Gaussian
    noise lives near a sphere, and a straight line between two points would cut inside it (too
    little noise). Where the two are (nearly) parallel or opposite, sin(theta) ~ 0 and the arc is
    ill-defined: the straight blend is used there (the same path for parallel ones)."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    theta = torch.acos(cos.clamp(-1.0, 1.0))[:, None]
    sin = torch.sin(theta)
    arc = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / sin.clamp_min(1e-6)
    straight = (1 - alpha) * a + alpha * b
    return torch.where(sin > 1e-6, arc, straight).view_as(z0)


def interpolation_noise(image_size, seed, frames):
    """(frames, 3, S, S): the way from the noise of `seed` to that of `seed + 1` on the sphere."""
    z0, z1 = initial_noise(1, image_size, seed), initial_noise(1, image_size, seed + 1)
    return torch.cat([slerp(z0, z1, float(a)) for a in torch.linspace(0, 1, frames)])


@torch.inference_mode()
def sketch_to_image(model, images, mean, std, strength=0.6, steps=20, seed=0, eps=None, **options):
    """SDEdit (Meng et al. 2022): noise uint8 images (N, 3, S, S) to t = strength, denoise from
    there. -> (noisy images, results), both float in [0, 1] on the CPU. strength 1 starts from
    t = 1, where 2% of the signal (the schedule's floor) is still the picture's: nearly plain
    sampling; near 0 the input comes back nearly unchanged. The sampler takes
    round(strength * steps) evaluations (at least the sampler's minimum), so the steps are about
    as long as in plain sampling. eps: the noise (N, 3, S, S), by default drawn from `seed`.
    options: generate()'s (eta, precision, sampler, labels, ...)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if eps is None:
        eps = initial_noise(images.shape[0], images.shape[-1], seed)
    x_t = add_noise(to_model_space(images, mean, std), strength, eps, signal_rates_of(model))
    results = generate(
        model,
        x_t,
        mean,
        std,
        steps=sketch_steps(strength, steps, options.get("sampler", "ddim")),
        seed=seed,
        t_start=strength,
        **options,
    )
    return to_image_space(x_t, mean, std), results


def sketch_steps(strength, steps, sampler="ddim"):
    """The network evaluations of an SDEdit run from t = strength: its share of `steps`."""
    return max(MIN_EVALUATIONS[sampler], round(strength * steps))


def sketch_per_seed(model, image, mean, std, strength, steps, seed, n, labels=None, **options):
    """n SDEdit results of one drawing (1, 3, S, S), each from the noise of its own seed (seed,
    seed + 1, ...), as sketch_to_image of that seed alone paints it (at eta 0, up to the float
    rounding of another batch size), sampled as one batch.
    labels (n,) or None -> (noisy images, results), each (n, 3, S, S). With eta > 0 the fresh
    noise of all n comes from `seed` (generate())."""
    eps = torch.cat([initial_noise(1, image.shape[-1], seed + i) for i in range(n)])
    images = image.expand(n, -1, -1, -1)
    return sketch_to_image(model, images, mean, std, strength, steps, seed, eps=eps, labels=labels, **options)
