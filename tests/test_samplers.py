"""The samplers against closed forms: for Gaussian data x0 ~ N(m, s0^2 I) both the ideal noise
predictor and the probability-flow ODE's solution are known exactly, so each sampler's error
and its order of convergence can be measured without a trained network."""

import itertools

import pytest
import torch

from lib.diffusion import SIGNAL_RATES, ddim_sample, diffusion_schedule
from lib.samplers import dpmpp_2m_sample, heun_sample, sigma_of_t, t_of_sigma, time_grid

M, S0 = 0.3, 0.5  # the data's mean and standard deviation


def ideal_model(x_t, noise_var):
    """E[eps | x_t] for x_t = s x0 + n eps, x0 ~ N(M, S0^2): n (x_t - s M) / (s^2 S0^2 + n^2)."""
    n2 = noise_var.to(torch.float64)[:, None, None, None]
    s = torch.sqrt(1 - n2)
    return torch.sqrt(n2) * (x_t - s * M) / (s**2 * S0**2 + n2)


class Ideal:
    """ideal_model on a schedule with other ends, as a network trained on them carries them."""

    def __init__(self, signal_rates):
        self.signal_rates = signal_rates

    def __call__(self, x_t, noise_var):
        return ideal_model(x_t, noise_var)


def exact_end(noise, t_start, rates=SIGNAL_RATES):
    """The ODE from x_t at t_start to t = 0, then x0_hat there. In y = x_t / s the flow is linear:
    y - M scales by sqrt((S0^2 + sigma^2) / (S0^2 + sigma'^2)); the denoiser shrinks y - M by
    S0^2 / (S0^2 + sigma^2)."""
    s_start = diffusion_schedule(torch.tensor(t_start, dtype=torch.float64), rates)[1]
    sig_a, sig_0 = sigma_of_t(t_start, rates), sigma_of_t(0.0, rates)
    y0 = M + (noise / s_start - M) * torch.sqrt((S0**2 + sig_0**2) / (S0**2 + sig_a**2))
    return M + (y0 - M) * S0**2 / (S0**2 + sig_0**2)


def error(sampler, steps, t_start, rates=SIGNAL_RATES, **kw):
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(Ideal(rates), noise, steps=steps, t_start=t_start, **kw)
    return (out - exact_end(noise, t_start, rates)).abs().max().item()


@pytest.mark.parametrize("rates", [SIGNAL_RATES, (0.999, 0.01)])  # the original's ends, and closer to clean
@pytest.mark.parametrize("t_start", [1.0, 0.6])
@pytest.mark.parametrize(
    "sampler,counts,order,final",
    [
        (ddim_sample, (16, 32, 64), 1, 0.05),
        (dpmpp_2m_sample, (17, 33, 65), 2, 1e-3),  # n evaluations: n - 1 steps of halving size
        (heun_sample, (33, 65, 129), 2, 1e-3),  # 2 per step + 1: 16, 32, 64 steps
    ],
)
def test_each_sampler_converges_with_its_order(sampler, counts, order, final, t_start, rates):
    """Halving the steps cuts the error about 2x (first order) or 4x (second order). On DDIM's own
    grid, uniform in t: on the lambda grid the ratios reach 4 from above, more slowly."""
    grid = {} if sampler is ddim_sample else dict(spacing="uniform-t")
    errors = [error(sampler, n, t_start, rates, **grid) for n in counts]
    # Ends closer to clean (sigma 0.045, not 0.33) bend the path more near t = 0, where a grid
    # uniform in t steps as long as anywhere: the same order, from a larger error.
    assert errors[-1] < final * (1 if rates == SIGNAL_RATES else 5), errors
    for coarse, fine in itertools.pairwise(errors):
        assert 0.75 * 2**order < coarse / fine < 1.35 * 2**order, errors


@pytest.mark.parametrize("spacing", ["lambda", "edm"])
@pytest.mark.parametrize("sampler", [dpmpp_2m_sample, heun_sample])
def test_other_grids_converge_to_the_same_image(sampler, spacing):
    # two halvings of the step: 16x for a second-order method (4x for a first-order one)
    assert error(sampler, 9, 1.0, spacing=spacing) > 8 * error(sampler, 33, 1.0, spacing=spacing)
    assert error(sampler, 129, 1.0, spacing=spacing) < 2e-3


@pytest.mark.parametrize("spacing,heun_gain", [("uniform-t", 2), ("lambda", 1.5)])
def test_second_order_beats_ddim(spacing, heun_gain):
    # DPM-Solver++ at half DDIM's evaluations; Heun, whose Euler predictions from sigma = 50 are
    # coarse, at equal evaluations once there are enough of them. (On this Gaussian the uniform-t
    # grid is the more accurate; on the flowers the lambda grid scores better: docs/sampling.md.)
    assert error(dpmpp_2m_sample, 10, 1.0, spacing=spacing) < error(ddim_sample, 20, 1.0) / 4
    assert error(heun_sample, 17, 1.0, spacing=spacing) < error(ddim_sample, 17, 1.0) / heun_gain


def test_few_evaluations_are_counted_exactly():
    calls = []

    def counting(x_t, noise_var):
        calls.append(1)
        return ideal_model(x_t, noise_var)

    noise = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    for sampler, counts in ((heun_sample, (3, 4, 5, 10)), (dpmpp_2m_sample, (1, 2, 3, 10))):
        for n in counts:
            calls.clear()
            sampler(counting, noise, steps=n)
            assert len(calls) == n, (sampler.__name__, n)
    # one evaluation: the denoiser's one-step x0_hat at t_start, as DDIM's; two: DDIM's first step
    # to t = 0 (where DDIM's own would stop at t = 1/2)
    assert torch.allclose(
        dpmpp_2m_sample(ideal_model, noise, steps=1), ddim_sample(ideal_model, noise, steps=1)
    )
    with pytest.raises(ValueError, match="at least 3"):
        heun_sample(ideal_model, noise, steps=2)


def test_grids_run_from_t_start_to_zero():
    assert torch.allclose(
        t_of_sigma(sigma_of_t(torch.tensor([0.0, 0.3, 1.0]))), torch.tensor([0.0, 0.3, 1.0]).double()
    )
    for spacing in ("uniform-t", "lambda", "edm"):
        t = time_grid(0.8, 6, spacing)
        assert t[0] == 0.8 and t[-1] == 0.0 and (t.diff() < 0).all()
    lam = -torch.log(sigma_of_t(time_grid(1.0, 5, "lambda")))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(4))
    with pytest.raises(ValueError, match="unknown spacing"):
        time_grid(1.0, 4, "nope")
