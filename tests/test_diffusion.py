import math

import pytest
import torch

from lib.diffusion import (
    SIGNAL_RATES,
    ddim_sample,
    denoise,
    diffusion_schedule,
    training_loss,
)


def test_schedule_end_points_and_unit_norm():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    noise_rate, signal_rate = diffusion_schedule(t)
    assert signal_rate[0].item() == pytest.approx(0.95, abs=1e-12)
    assert signal_rate[-1].item() == pytest.approx(0.02, abs=1e-12)
    torch.testing.assert_close(signal_rate**2 + noise_rate**2, torch.ones_like(t))
    assert (signal_rate.diff() < 0).all()  # monotone: more noise as t grows
    # the angle, not the rate, is linear in t
    angle = torch.atan2(noise_rate, signal_rate)
    torch.testing.assert_close(
        angle.diff(), torch.full((100,), (math.acos(0.02) - math.acos(0.95)) / 100, dtype=torch.float64)
    )
    assert SIGNAL_RATES == (0.95, 0.02)


def test_other_ends_move_the_end_points_and_keep_the_angle_linear():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    noise_rate, signal_rate = diffusion_schedule(t, (0.999, 0.01))
    assert signal_rate[0].item() == pytest.approx(0.999, abs=1e-12)
    assert signal_rate[-1].item() == pytest.approx(0.01, abs=1e-12)
    angle = torch.atan2(noise_rate, signal_rate)
    step = (math.acos(0.01) - math.acos(0.999)) / 10
    torch.testing.assert_close(angle.diff(), torch.full((10,), step, dtype=torch.float64))


def test_the_loss_trains_on_the_ends_the_network_carries():
    """The noise levels a loss draws lie between the network's own ends."""

    class Spy:
        def __init__(self, signal_rates):
            self.signal_rates, self.seen = signal_rates, []

        def __call__(self, x_t, noise_var):
            self.seen.append(noise_var)
            return torch.zeros_like(x_t)

    for rates in [SIGNAL_RATES, (0.999, 0.01)]:
        model = Spy(rates)
        for seed in range(20):
            training_loss(model, torch.zeros(64, 3, 2, 2), torch.Generator().manual_seed(seed))
        noise_var = torch.cat(model.seen)
        lowest, highest = 1 - rates[0] ** 2, 1 - rates[1] ** 2
        assert lowest <= noise_var.min() < lowest + 0.01 and highest - 0.01 < noise_var.max() <= highest


def oracle_for(x0):
    """A perfect noise predictor for a known clean batch: eps = (x_t - s x0) / n."""

    def model(x_t, noise_var):
        n = noise_var.sqrt().view(-1, 1, 1, 1)
        s = (1 - noise_var).sqrt().view(-1, 1, 1, 1)
        return (x_t - s * x0) / n

    return model


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [1, 20])
def test_ddim_with_an_oracle_recovers_the_clean_image(eta, steps):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    out = ddim_sample(oracle_for(x0), noise, steps=steps, eta=eta, generator=g)
    torch.testing.assert_close(out, x0)


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    def model(x, v):  # any smooth predictor
        return 0.5 * x

    noise = torch.randn(2, 3, 4, 4)
    a = ddim_sample(model, noise, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, noise, eta=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    c = ddim_sample(model, noise, eta=1.0, generator=torch.Generator().manual_seed(1))
    d = ddim_sample(model, noise, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(c, d)


def test_ddim_eta0_step_matches_the_original_loop():
    """One hand-written step of the original's loop (t=1 -> 1/2, then return x0_hat at t=1/2)."""

    def model(x, v):
        return torch.tanh(x) * v.view(-1, 1, 1, 1)

    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    n1, s1 = diffusion_schedule(torch.tensor(1.0, dtype=torch.float64))
    n2, s2 = diffusion_schedule(torch.tensor(0.5, dtype=torch.float64))
    eps = model(x1, (n1**2).expand(2))
    x_half = s2 * (x1 - n1 * eps) / s1 + n2 * eps
    expected = (x_half - n2 * model(x_half, (n2**2).expand(2))) / s2
    torch.testing.assert_close(ddim_sample(model, x1, steps=2), expected)


def test_denoise_inverts_the_forward_process():
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    noise_rate, signal_rate = diffusion_schedule(torch.rand(3, 1, 1, 1))
    x_t = signal_rate * x0 + noise_rate * eps
    _, x0_hat = denoise(lambda x, v: eps, x_t, noise_rate, signal_rate)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


def test_training_loss_is_l1_on_the_noise():
    x0 = torch.randn(5, 3, 4, 4)

    def zero(x, v):
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    loss = training_loss(zero, x0, generator=g)
    g = torch.Generator().manual_seed(0)
    torch.rand(5, 1, 1, 1, generator=g)  # same draws as inside: times first, then the noise
    eps = torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(loss, eps.abs().mean())
    assert oracle_loss_is_zero(x0)


def oracle_loss_is_zero(x0):
    return training_loss(oracle_for(x0), x0).item() < 1e-4


def test_steps_must_be_positive():
    with pytest.raises(ValueError):
        ddim_sample(lambda x, v: x, torch.zeros(1, 3, 4, 4), steps=0)


@pytest.mark.parametrize("eta", [1.5, -0.1])
def test_eta_outside_0_1_is_refused_not_nan(eta):
    """Past eta = 1, sigma exceeds the next noise rate and sqrt(n'^2 - sigma^2) would be NaN."""
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_sample(lambda x, v: 0.5 * x, torch.zeros(1, 3, 4, 4), steps=4, eta=eta)


def test_ddim_eta1_step_is_the_ddpm_posterior():
    """With eta=1 and a perfect predictor, x_{t'} | x_t is the DDPM posterior q(x_{t'} | x_t, x0)
    (Ho et al. 2020, eq. 6-7): check its mean and standard deviation over many draws."""
    x0 = torch.full((20000, 1, 1, 1), 0.7, dtype=torch.float64)
    x1 = torch.full_like(x0, -0.3)  # one state at t=1, copied: the spread comes from the fresh noise
    seen = {}
    ddim_sample(
        oracle_for(x0),
        x1,
        steps=2,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        on_step=lambda t, x_t, x0_hat: seen.setdefault(t, x_t),
    )
    x_half = seen[0.5]
    _, s1 = diffusion_schedule(torch.tensor(1.0, dtype=torch.float64))
    _, s2 = diffusion_schedule(torch.tensor(0.5, dtype=torch.float64))
    abar1, abar2 = s1**2, s2**2
    alpha, beta = abar1 / abar2, 1 - abar1 / abar2
    mean = abar2.sqrt() * beta / (1 - abar1) * 0.7 + alpha.sqrt() * (1 - abar2) / (1 - abar1) * -0.3
    std = ((1 - abar2) / (1 - abar1) * beta).sqrt()
    assert x_half.mean().item() == pytest.approx(mean.item(), abs=4 * std.item() / math.sqrt(20000))
    assert x_half.std().item() == pytest.approx(std.item(), rel=0.03)
