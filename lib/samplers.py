"""Second-order samplers of the probability-flow ODE, beside DDIM (lib/diffusion.py).

Both take the network as a callable, as ddim_sample does, and count their cost in network
evaluations (`steps`). They integrate the ODE from t_start down to t = 0, where the original's
schedule still leaves noise_rate 0.31 (sigma = noise_rate / signal_rate = 0.33), and return the
denoiser's x0_hat there: the same end point DDIM reaches in the limit of many steps, since its
last evaluation, at t = t_start / steps, tends to 0. So every sampler converges to one image.

Notation (Karras et al. 2022): y = x_t / signal_rate = x0 + sigma * eps is the image scaled to
signal 1, and the ODE reads dy/dsigma = eps_hat(y, sigma). lambda = log(signal_rate /
noise_rate) = -log(sigma) is the half log-SNR of Lu et al. 2022.
"""

import math

import torch

from lib.cli import UserError
from lib.diffusion import SIGNAL_RATES, ddim_sample, denoise, diffusion_schedule, signal_rates_of

SPACINGS = ("uniform-t", "lambda", "edm")
DEFAULT_SPACING = "lambda"  # measured against the others: docs/sampling.md


def sigma_of_t(t, signal_rates=SIGNAL_RATES):
    noise_rate, signal_rate = diffusion_schedule(torch.as_tensor(t, dtype=torch.float64), signal_rates)
    return noise_rate / signal_rate


def t_of_sigma(sigma, signal_rates=SIGNAL_RATES):
    """The inverse of sigma_of_t: sigma = tan(angle), the angle linear in t."""
    start, end = (math.acos(rate) for rate in signal_rates)
    return (torch.atan(torch.as_tensor(sigma, dtype=torch.float64)) - start) / (end - start)


def time_grid(t_start, points, spacing=DEFAULT_SPACING, rho=7.0, signal_rates=SIGNAL_RATES):
    """`points` times from t_start down to 0 (float64). uniform-t: even steps in t, as DDIM takes;
    lambda: even steps in log sigma (DPM-Solver's choice); edm: sigma^(1/rho) even (Karras et
    al. 2022, eq. 5, rho = 7), short steps where the image is nearly clean."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose from {', '.join(SPACINGS)}")
    if points == 1:
        return torch.tensor([float(t_start)], dtype=torch.float64)
    u = torch.linspace(0, 1, points, dtype=torch.float64)
    if spacing == "uniform-t":
        return t_start * (1 - u)
    sigma_max, sigma_min = sigma_of_t(t_start, signal_rates), sigma_of_t(0.0, signal_rates)
    if spacing == "lambda":
        sigmas = torch.exp(torch.log(sigma_max) + u * (torch.log(sigma_min) - torch.log(sigma_max)))
    else:
        sigmas = (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = t_of_sigma(sigmas, signal_rates)
    t[0], t[-1] = t_start, 0.0  # exact ends, whatever the round trip through atan left
    return t


def _denoise_at(model, x_t, t, on_step):
    """eps_hat and x0_hat of the state x_t at time t (a float)."""
    t_full = torch.full((x_t.shape[0], 1, 1, 1), float(t), device=x_t.device, dtype=x_t.dtype)
    eps, x0 = denoise(model, x_t, *diffusion_schedule(t_full, signal_rates_of(model)))
    eps = eps.to(x_t.dtype)  # a bf16 network output (autocast) would round Heun's slopes
    if on_step is not None:
        on_step(float(t), x_t, x0)
    return eps, x0


def heun_sample(model, noise, steps=20, t_start=1.0, on_step=None, spacing=DEFAULT_SPACING):
    """Heun's method, Karras et al. 2022, Algorithm 1 (deterministic, no churn), in y and sigma.

    noise: the state x_t at t_start. Each step between grid points costs two evaluations (an
    Euler prediction, then the trapezoid correction); the final x0_hat at t = 0 costs one. So
    `steps` = 2 * (points - 1) + 1 for odd counts; an even count takes its first step as a plain
    Euler step (one evaluation), which keeps the method second order. -> x0_hat at t = 0.
    """
    if steps < 3:
        raise ValueError(f"heun needs at least 3 evaluations (one step of two, then x0_hat), got {steps}")
    points, rates = steps // 2 + 1, signal_rates_of(model)
    ts = time_grid(t_start, points, spacing, signal_rates=rates)
    noise_rates, signal_rates = diffusion_schedule(ts, rates)
    sigmas, signal_rates, ts = (noise_rates / signal_rates).tolist(), signal_rates.tolist(), ts.tolist()
    y = noise / signal_rates[0]
    for i in range(points - 1):
        d, _ = _denoise_at(model, signal_rates[i] * y, ts[i], on_step)  # dy/dsigma at (y, sigma_i)
        dsigma = sigmas[i + 1] - sigmas[i]
        y_euler = y + dsigma * d
        if i == 0 and steps % 2 == 0:
            y = y_euler
            continue
        d_next, _ = _denoise_at(model, signal_rates[i + 1] * y_euler, ts[i + 1], None)
        y = y + dsigma * (d + d_next) / 2
    return _denoise_at(model, signal_rates[-1] * y, ts[-1], on_step)[1]


def dpmpp_2m_sample(model, noise, steps=20, t_start=1.0, on_step=None, spacing=DEFAULT_SPACING):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), Algorithm 2: data prediction,
    multistep, steps in lambda. With alpha = signal_rate, sigma = noise_rate, h_i = lambda_i -
    lambda_(i-1):
        x_i = (sigma_i / sigma_(i-1)) x_(i-1) - alpha_i (exp(-h_i) - 1) D_i,
        D_i = (1 + 1 / (2 r_i)) x0_(i-1) - 1 / (2 r_i) x0_(i-2),  r_i = h_(i-1) / h_i,
    and D_1 = x0_0 for the first step (first order: a DDIM step). One evaluation per grid point,
    `steps` points from t_start to 0. -> x0_hat at t = 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rates = signal_rates_of(model)
    ts = time_grid(t_start, steps, spacing, signal_rates=rates)
    noise_rates, signal_rates = (r.tolist() for r in diffusion_schedule(ts, rates))
    lambdas = [math.log(s / n) for n, s in zip(noise_rates, signal_rates, strict=True)]
    x_t, x0_prev, h_prev = noise, None, None
    for i in range(steps):
        _, x0 = _denoise_at(model, x_t, ts[i].item(), on_step)
        if i == steps - 1:
            return x0
        h = lambdas[i + 1] - lambdas[i]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        x_t = (noise_rates[i + 1] / noise_rates[i]) * x_t - signal_rates[i + 1] * math.expm1(-h) * d
        x0_prev, h_prev = x0, h


SAMPLERS = ("ddim", "dpm++2m", "heun")
MIN_EVALUATIONS = {"ddim": 1, "dpm++2m": 1, "heun": 3}  # Heun: one step of two, then x0_hat


def sample(sampler, model, noise, steps=20, eta=0.0, generator=None, t_start=1.0, on_step=None, spacing=None):
    """Run the named sampler for `steps` network evaluations -> x0_hat. Only DDIM takes eta > 0
    (the second-order methods solve the deterministic ODE); spacing picks their time grid
    (None: DEFAULT_SPACING)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if sampler == "ddim":
        return ddim_sample(model, noise, steps, eta, generator, t_start, on_step)
    if eta != 0:
        raise ValueError(f"eta applies to ddim only ({sampler} is deterministic), got {eta}")
    solver = dpmpp_2m_sample if sampler == "dpm++2m" else heun_sample
    return solver(model, noise, steps, t_start, on_step, spacing or DEFAULT_SPACING)


def add_sampler_args(p):
    """--sampler, --steps and --eta, the same in every script."""
    p.add_argument(
        "--sampler",
        default="ddim",
        choices=SAMPLERS,
        help="ddim (the original's), or the second-order dpm++2m and heun (docs/sampling.md)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="network evaluations (heun: 2 per step + 1); default 20, a distilled student's own",
    )
    p.add_argument(
        "--eta", type=float, default=0.0, help="ddim only: 0 deterministic (the original), 1 DDPM-like"
    )


def check_sampler_args(args):
    """One-line errors for --sampler / --steps / --eta values that cannot run."""
    need = MIN_EVALUATIONS[args.sampler]
    if args.steps is not None and args.steps < need:
        raise UserError(f"--steps must be >= {need} for {args.sampler}, got {args.steps}")
    if not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    if args.eta != 0 and args.sampler != "ddim":
        raise UserError(f"--eta applies to ddim only: {args.sampler} is deterministic")
