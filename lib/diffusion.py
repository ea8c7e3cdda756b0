"""Continuous-time cosine diffusion: schedule, denoiser, training loss and the DDIM sampler.

Everything here takes the network as a plain callable `model(x_t, noise_var) -> eps_hat`: the
network is told the noise level itself (its variance), not a time t, so it never depends on how t
maps to noise (as EDM's networks see sigma, Karras et al. 2022; DiT's see the step t), and any
noise predictor, an oracle included, plugs in.
Images are in the normalized space (per-channel mean 0, std 1, or b with sd_train.py --input-scale b);
lib/normalization.py maps to and from it.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The schedule's ends as the signal rates at t=0 and t=1; the original's: at t=0 the image keeps
# 95% of its signal, at t=1 only 2%. Never reaching 100% or 0% keeps both the denoiser's division
# by signal_rate and the loss at t=0 well conditioned. A network trained on other ends carries them
# (checkpoint config "signal_rates", read back by signal_rates_of).
SIGNAL_RATES = (0.95, 0.02)
PREDICTIONS = ("eps", "v")  # what the network predicts: the noise (the original), or v


def diffusion_schedule(t, signal_rates=SIGNAL_RATES):
    """t in [0, 1] (any shape) -> (noise_rate, signal_rate), with signal^2 + noise^2 = 1.

    The angle moves linearly from acos(signal_rates[0]) to acos(signal_rates[1]) (0.95 and 0.02
    by default): the cosine schedule of Nichol & Dhariwal 2021, written as an angle as in the
    Keras DDIM example.
    """
    start, end = (math.acos(rate) for rate in signal_rates)
    angle = start + t * (end - start)
    return torch.sin(angle), torch.cos(angle)


def unwrapped(model, attribute):
    """The module inside model's wrappers (Guided, EpsFromV, DDP, torch.compile, ...) that holds
    `attribute`, or None."""
    while not hasattr(model, attribute):
        inner = [getattr(model, name) for name in ("net", "module", "_orig_mod") if hasattr(model, name)]
        if not inner:
            return None
        model = inner[0]
    return model


def signal_rates_of(model):
    """The schedule's ends a network was trained on (its `signal_rates`), through its wrappers;
    SIGNAL_RATES for a callable that carries none (an oracle, a network of an older copy)."""
    net = unwrapped(model, "signal_rates")
    return SIGNAL_RATES if net is None else tuple(net.signal_rates)


def denoise(model, x_t, noise_rate, signal_rate):
    """Predict the noise and the clean image. x_t: (B,C,H,W); rates: (B,1,1,1).

    x_t = signal_rate * x0 + noise_rate * eps  =>  x0_hat = (x_t - noise_rate * eps_hat) / signal_rate
    """
    eps = model(x_t, noise_rate.flatten() ** 2)  # the network is conditioned on the noise variance
    x0 = (x_t - noise_rate * eps) / signal_rate
    return eps, x0


def min_snr_weight(noise_rate, signal_rate, gamma, prediction="eps"):
    """Min-SNR-gamma weighting (Hang et al. 2023), SNR = signal_rate^2 / noise_rate^2: for noise
    prediction min(SNR, gamma) / SNR, for v-prediction min(SNR, gamma) / (SNR + 1). With the L2
    loss that makes each level's loss min(SNR, gamma) times the squared error of x0 (with L1 the
    weight is the same, and no longer that product). The nearly clean levels, whose noise is hard
    to see and whose gradients conflict with the rest, count less. This schedule's SNR peaks at
    0.95^2 / (1 - 0.95^2) = 9.26 (t = 0), so for noise prediction gamma 5 lowers the weight only
    for t < 0.083, to no less than 0.54 (the v weight is below 1 at every t)."""
    snr = (signal_rate / noise_rate) ** 2
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def v_target(x0, eps, noise_rate, signal_rate):
    """v = signal_rate * eps - noise_rate * x0 (Salimans & Ho 2022, eq. 10): the velocity of x_t
    along the circle signal^2 + noise^2 = 1. Then x0 = s x_t - n v and eps = n x_t + s v."""
    return signal_rate * eps - noise_rate * x0


class EpsFromV(nn.Module):
    """A v-predicting network seen as a noise predictor, eps_hat = n x_t + s v_hat, so that every
    sampler (which asks for eps) runs it unchanged."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t, noise_var, labels=None):
        noise_rate = noise_var.sqrt()[:, None, None, None]
        signal_rate = (1 - noise_var).sqrt()[:, None, None, None]
        v = self.net(x_t, noise_var) if labels is None else self.net(x_t, noise_var, labels)
        return noise_rate * x_t + signal_rate * v


def as_noise_predictor(net, prediction):
    """The network as the samplers want it, whatever it was trained to predict."""
    return EpsFromV(net) if prediction == "v" else net


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6 with w = scale - 1):
        eps = eps_u + scale * (eps_c - eps_u),
    eps_c the noise predicted for `labels`, eps_u for no class. scale 1 is the plain conditional
    model, 0 the unconditional one; above 1 samples follow their class more closely. The two
    predictions run as one batch of twice the size (the network is in eval mode: BatchNorm's
    running statistics make each image's output independent of the others)."""

    def __init__(self, net, labels, scale, null_label):
        super().__init__()
        self.net, self.scale = net, scale
        self.labels, self.null = labels, torch.full_like(labels, null_label)

    def forward(self, x_t, noise_var):
        if self.scale == 1:
            return self.net(x_t, noise_var, self.labels)
        if self.scale == 0:
            return self.net(x_t, noise_var, self.null)
        both = self.net(
            torch.cat([x_t, x_t]), torch.cat([noise_var, noise_var]), torch.cat([self.labels, self.null])
        )
        eps_c, eps_u = both.chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


def drop_labels(labels, share, generator, null_label):
    """Each class replaced by "no class" (null_label) with probability `share`: classifier-free
    guidance trains one network both ways (Ho & Salimans 2022)."""
    dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < share
    return labels.masked_fill(dropped, null_label)


def training_loss(model, x0, generator=None, loss="l1", min_snr_gamma=0.0, prediction="eps", labels=None):
    """The error of the network's prediction, t ~ U(0, 1) per image: by default the original's
    objective, L1 between predicted and true noise over all pixels. loss "l2" squares the error
    instead; prediction "v" makes v (v_target) the network's target; min_snr_gamma > 0 weights
    each image by min_snr_weight; labels (B,) go to a class-conditional network.

    x0: (B, C, H, W) normalized clean images -> scalar loss (fp32 even under autocast).
    """
    b = x0.shape[0]
    t = torch.rand(b, 1, 1, 1, device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    noise_rate, signal_rate = diffusion_schedule(t, signal_rates_of(model))
    x_t = signal_rate * x0 + noise_rate * eps
    out = (
        model(x_t, noise_rate.flatten() ** 2)
        if labels is None
        else model(x_t, noise_rate.flatten() ** 2, labels)
    )
    target = eps if prediction == "eps" else v_target(x0, eps, noise_rate, signal_rate)
    if loss == "l1" and not min_snr_gamma:
        return F.l1_loss(out.float(), target.float())
    error = out.float() - target.float()
    per_image = (error.abs() if loss == "l1" else error.square()).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        per_image = per_image * min_snr_weight(noise_rate, signal_rate, min_snr_gamma, prediction).flatten()
    return per_image.mean()


def add_noise(x0, t, eps, signal_rates=SIGNAL_RATES):
    """The forward process: x_t = signal_rate(t) x0 + noise_rate(t) eps; t a float in [0, 1]."""
    noise_rate, signal_rate = diffusion_schedule(torch.tensor(float(t), dtype=torch.float64), signal_rates)
    return signal_rate.item() * x0 + noise_rate.item() * eps


def ddim_sample(model, noise, steps=20, eta=0.0, generator=None, t_start=1.0, on_step=None):
    """DDIM (Song et al. 2021, eq. 12) on the continuous schedule, from t_start down to 0.

    noise: (B,C,H,W) the state at t_start: pure Gaussian noise for t_start=1, or a noised image
    (add_noise) for SDEdit (Meng et al. 2022). Each of the `steps` steps predicts eps_hat and
    x0_hat at t and remixes them with the rates of t - t_start/steps. eta=0 is the
    deterministic DDIM of the original; eta=1 re-injects fresh noise with the variance of the
    DDPM posterior (Ho et al. 2020), sigma = eta * sqrt(n'^2 / n^2) * sqrt(1 - s^2 / s'^2):
        x_{t'} = s' x0_hat + sqrt(n'^2 - sigma^2) eps_hat + sigma z
    Like the original, returns the last x0 estimate (made at t = t_start/steps), not a remix at t=0.
    on_step(t, x_t, x0_hat), if given, sees every step (to show the process, as the notebook does).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= eta <= 1.0:  # past 1, sigma exceeds n' and its square root turns NaN
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    b, rates = noise.shape[0], signal_rates_of(model)
    step_size = t_start / steps
    x_t = noise
    for i in range(steps):
        t = torch.full((b, 1, 1, 1), t_start - i * step_size, device=noise.device, dtype=noise.dtype)
        noise_rate, signal_rate = diffusion_schedule(t, rates)
        eps, x0 = denoise(model, x_t, noise_rate, signal_rate)
        if on_step is not None:
            on_step(t.flatten()[0].item(), x_t, x0)
        if i == steps - 1:
            break
        next_noise_rate, next_signal_rate = diffusion_schedule(t - step_size, rates)
        if eta > 0:
            sigma = (
                eta * (next_noise_rate / noise_rate) * torch.sqrt(1 - (signal_rate / next_signal_rate) ** 2)
            )
            z = torch.randn(noise.shape, device=noise.device, generator=generator, dtype=x0.dtype)
            x_t = next_signal_rate * x0 + torch.sqrt(next_noise_rate**2 - sigma**2) * eps + sigma * z
        else:
            x_t = next_signal_rate * x0 + next_noise_rate * eps
    return x0
