"""Sketch-to-image (SDEdit) and noise interpolation."""

import pytest
import torch
from PIL import Image
from test_checkpoint import tiny_checkpoint
from test_diffusion import oracle_for

import sd_inference
from conftest import TINY
from lib.data import load_image
from lib.diffusion import add_noise
from lib.normalization import to_model_space
from lib.sample import generate, initial_noise, interpolation_noise, sketch_per_seed, sketch_to_image, slerp
from lib.unet import build_unet

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.2]


def tiny_model():
    torch.manual_seed(0)
    return build_unet(TINY).eval()


class Recorder(torch.nn.Module):
    """Wraps a model and records the noise variances the sampler asks about."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x, noise_var):
        self.seen.append(round(noise_var[0].item(), 6))
        return self.model(x, noise_var)


def test_with_a_perfect_denoiser_the_drawing_comes_back_at_any_strength():
    drawing = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    x0 = to_model_space(drawing, MEAN, STD).double()

    class Oracle(torch.nn.Module):  # sketch_to_image asks the model for its device
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, v):
            return oracle_for(x0)(x.double(), v.double())

    for strength in (0.01, 0.3, 1.0):
        _, result = sketch_to_image(Oracle(), drawing, MEAN, STD, strength=strength, steps=20)
        torch.testing.assert_close(result, drawing.float() / 255, atol=1e-5, rtol=0)


def test_strength_one_is_plain_sampling_of_the_noised_drawing():
    model = tiny_model()
    drawing = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    noisy, result = sketch_to_image(model, drawing, MEAN, STD, strength=1.0, steps=4, seed=7)
    x1 = add_noise(to_model_space(drawing, MEAN, STD), 1.0, initial_noise(1, 32, 7))
    torch.testing.assert_close(result, generate(model, x1, MEAN, STD, steps=4))  # same steps, same times
    assert (noisy - drawing.float() / 255).abs().mean() > 0.2  # t=1: 2% of the drawing is left


def test_several_seeds_in_one_batch_paint_what_each_seed_paints_alone():
    model, drawing = tiny_model(), torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    noisy, results = sketch_per_seed(model, drawing, MEAN, STD, 0.7, 6, seed=3, n=3, sampler="dpm++2m")
    assert results.shape == noisy.shape == (3, 3, 32, 32)
    for i in range(3):
        alone = sketch_to_image(model, drawing, MEAN, STD, 0.7, 6, seed=3 + i, sampler="dpm++2m")
        torch.testing.assert_close(noisy[i : i + 1], alone[0])
        torch.testing.assert_close(results[i : i + 1], alone[1], atol=1e-5, rtol=1e-5)  # batch rounding
    assert (results[0] - results[1]).abs().mean() > 0.01  # each seed its own noise


def test_lower_strength_starts_later_with_steps_of_the_same_length():
    rec = Recorder(tiny_model())
    sketch_to_image(rec, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), MEAN, STD, strength=0.5, steps=20)
    plain = Recorder(rec.model)
    generate(plain, initial_noise(1, 32, 0), MEAN, STD, steps=20)
    assert rec.seen == plain.seen[10:]  # the last 10 of the 20 plain steps


def test_interpolation_endpoints_are_the_two_plain_samples():
    model = tiny_model()
    noise = interpolation_noise(32, seed=3, frames=5)
    assert torch.equal(noise[0], initial_noise(1, 32, 3)[0]) and torch.equal(
        noise[-1], initial_noise(1, 32, 4)[0]
    )
    strip = generate(model, noise, MEAN, STD, steps=3)
    torch.testing.assert_close(strip[0], generate(model, initial_noise(1, 32, 3), MEAN, STD, steps=3)[0])
    torch.testing.assert_close(strip[-1], generate(model, initial_noise(1, 32, 4), MEAN, STD, steps=3)[0])
    # between the ends the noise keeps a Gaussian's norm (a straight line would lose ~30% midway)
    mid = slerp(initial_noise(1, 32, 3), initial_noise(1, 32, 4), 0.5)
    assert mid.norm() / initial_noise(1, 32, 3).norm() == pytest.approx(1.0, abs=0.05)


def test_any_picture_mode_and_size_loads(tmp_path):
    Image.new("RGBA", (50, 30), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent: white
    Image.new("L", (17, 90), 40).save(tmp_path / "gray.jpg")
    assert load_image(tmp_path / "clear.png", 16).shape == (1, 3, 16, 16)
    assert load_image(tmp_path / "clear.png", 16).min() == 255
    assert load_image(tmp_path / "gray.jpg", 16).shape == (1, 3, 16, 16)


def test_cli_sketch_and_interpolation(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    Image.new("RGBA", (70, 50), (200, 50, 80, 255)).save(tmp_path / "drawing.png")
    ckpt = ["--checkpoint", str(tmp_path / "m.pt"), "--steps", "2", "--no-show"]
    sketch = ["--init-image", str(tmp_path / "drawing.png"), "--strength", "0.5"]
    assert sd_inference.main([*ckpt, *sketch, "--out", str(tmp_path / "sketch.png")]) == 0
    assert Image.open(tmp_path / "sketch.png").size[0] == 750  # drawing | noised | result
    strip = ["--interpolate", "--num-images", "5", "--out", str(tmp_path / "strip.png")]
    assert sd_inference.main([*ckpt, *strip]) == 0
    assert Image.open(tmp_path / "strip.png").size[0] == 1250  # five frames in a row
    (tmp_path / "bad.png").write_text("not an image")
    for extra, message in (
        (["--init-image", str(tmp_path / "missing.png")], "image not found"),
        (["--init-image", str(tmp_path / "bad.png")], "cannot read"),
        (["--init-image", str(tmp_path / "drawing.png"), "--strength", "0"], "--strength must be in (0, 1]"),
    ):
        assert sd_inference.main(ckpt + extra + ["--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err


class ZeroNoisePredictor(torch.nn.Module):
    """Predicts eps = 0, so x0_hat = x_t / signal_rate: the sampler's fresh noise shows in the output."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate() reads the device from it

    def forward(self, x, noise_var):
        return torch.zeros_like(x)


def test_fresh_noise_of_eta_is_not_the_starting_noise():
    """generate(eta=1) must not draw its fresh noise from the stream that made the starting noise
    (same seed, same generator: the first draw would repeat it)."""
    from lib.diffusion import diffusion_schedule

    start = torch.full((4, 3, 16, 16), 0.5)
    out = generate(ZeroNoisePredictor(), start, [0.0] * 3, [1.0] * 3, steps=2, eta=1.0, seed=7, t_start=0.06)
    # Two steps from t=0.06: x_0.03 = (s2/s) x_0.06 + sigma z; the output is x_0.03 / s2 (z std 0.16 there).
    (n, s), (n2, s2) = diffusion_schedule(torch.tensor(0.06)), diffusion_schedule(torch.tensor(0.03))
    sigma = (n2 / n) * torch.sqrt(1 - (s / s2) ** 2)
    z = (out - start / s) * s2 / sigma
    inside = (out > 0) & (out < 1)  # the images are clamped to [0, 1]
    assert inside.float().mean() > 0.99
    assert abs(z[inside].std().item() - 1) < 0.1  # it is the fresh standard noise
    assert torch.corrcoef(torch.stack([z[inside], initial_noise(4, 16, 7)[inside]]))[0, 1].abs() < 0.1


def test_generate_refuses_eta_above_one():
    with pytest.raises(ValueError, match="eta must be in"):
        generate(tiny_model(), initial_noise(1, 32, 0), MEAN, STD, steps=2, eta=1.5)


def test_slerp_ends_keeps_the_norm_and_survives_parallel_and_opposite_noises():
    z0, z1 = initial_noise(1, 8, 0), initial_noise(1, 8, 1)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # a right angle: on the circle
    torch.testing.assert_close(slerp(a, b, 0.5), torch.tensor([[0.5**0.5, 0.5**0.5]]))
    for other in (z0, -z0, 2 * z0):  # the same noise, the opposite, a parallel one: sin(theta) = 0
        for alpha in (0.0, 0.3, 1.0):
            out = slerp(z0, other, alpha)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, (1 - alpha) * z0 + alpha * other, rtol=1e-4, atol=1e-4)
