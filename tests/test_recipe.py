"""Training recipes: each option's maths against its closed form, --recipe original as the
original's loop bit for bit, and the recipe flags' plumbing."""

import copy
import math

import pytest
import torch

import sd_train
from conftest import run_args
from lib.checkpoint import load_model, make_checkpoint
from lib.cli import UserError
from lib.data import epoch_order, load_images
from lib.diffusion import EpsFromV, diffusion_schedule, min_snr_weight, training_loss, v_target
from lib.normalization import FLOWERS_MEAN, FLOWERS_STD, to_model_space
from lib.schedule import lr_factor
from lib.training import ema_decay_at, ema_update
from lib.unet import build_unet, model_config


def test_min_snr_weights_at_known_snrs():
    snr = torch.tensor([0.25, 1.0, 5.0, 25.0])
    signal_rate = (snr / (1 + snr)).sqrt()  # signal^2 + noise^2 = 1, SNR = signal^2 / noise^2
    noise_rate = (1 / (1 + snr)).sqrt()
    torch.testing.assert_close(
        min_snr_weight(noise_rate, signal_rate, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.2])
    )


def test_min_snr_weights_for_v_prediction():
    # v's squared error is (SNR + 1) times x0's, so the weight is min(SNR, gamma) / (SNR + 1)
    snr = torch.tensor([0.25, 1.0, 9.0])
    signal_rate, noise_rate = (snr / (1 + snr)).sqrt(), (1 / (1 + snr)).sqrt()
    torch.testing.assert_close(
        min_snr_weight(noise_rate, signal_rate, 5.0, "v"), torch.tensor([0.2, 0.5, 0.5])
    )


def test_v_identities():
    x0, eps = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    noise_rate, signal_rate = diffusion_schedule(torch.rand(5, 1, 1, 1, dtype=torch.float64))
    x_t = signal_rate * x0 + noise_rate * eps
    v = v_target(x0, eps, noise_rate, signal_rate)
    torch.testing.assert_close(signal_rate * x_t - noise_rate * v, x0)  # x0 = s x_t - n v
    torch.testing.assert_close(noise_rate * x_t + signal_rate * v, eps)  # eps = n x_t + s v

    def v_oracle(x, noise_var):  # the true v for this x0: (s x_t - x0) / n
        n, s = noise_var.sqrt().view(-1, 1, 1, 1), (1 - noise_var).sqrt().view(-1, 1, 1, 1)
        return (s * x - x0) / n

    torch.testing.assert_close(EpsFromV(v_oracle)(x_t, noise_rate.flatten() ** 2), eps)
    loss = training_loss(v_oracle, x0, torch.Generator().manual_seed(0), prediction="v")
    assert loss < 1e-6  # a perfect v predictor has no loss


def test_a_v_checkpoint_loads_as_a_noise_predictor(tmp_path):
    cfg = dict(model_config("flowers64", 32), prediction="v")
    net = build_unet(cfg).eval()
    ckpt = make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, net.state_dict())
    torch.save(ckpt, tmp_path / "v.pt")
    model, _ = load_model(tmp_path / "v.pt")
    assert isinstance(model, EpsFromV)
    x, var = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, var),
            var.sqrt()[:, None, None, None] * x + (1 - var).sqrt()[:, None, None, None] * net(x, var),
        )
    torch.save(dict(ckpt, config=dict(cfg, prediction="x0")), tmp_path / "x0.pt")
    with pytest.raises(UserError, match="unknown prediction 'x0'"):
        load_model(tmp_path / "x0.pt")


def test_weighted_l2_loss_is_the_weighted_mean_of_per_image_errors():
    def half(x, v):  # a fixed, imperfect noise predictor
        return 0.5 * x

    x0 = torch.randn(6, 3, 4, 4)
    loss = training_loss(half, x0, torch.Generator().manual_seed(0), loss="l2", min_snr_gamma=5.0)
    g = torch.Generator().manual_seed(0)  # the same draws: times, then noise
    t, eps = torch.rand(6, 1, 1, 1, generator=g), torch.randn(x0.shape, generator=g)
    n, s = diffusion_schedule(t)
    per_image = (half(s * x0 + n * eps, None) - eps).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per_image * min_snr_weight(n, s, 5.0).flatten()).mean())
    # the default is still the original's: L1 over all pixels
    a = training_loss(half, x0, torch.Generator().manual_seed(0))
    b = training_loss(half, x0, torch.Generator().manual_seed(0), loss="l1", min_snr_gamma=0.0)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, (half(s * x0 + n * eps, None) - eps).abs().mean())


def test_ema_warmup_decay():
    assert [ema_decay_at(n, 0.999) for n in (0, 1, 500)] == [
        0.0,
        0.999,
        0.999,
    ]  # the original: copy, then 0.999
    assert ema_decay_at(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(10, 0.999, warmup=True) == pytest.approx(11 / 20)
    assert ema_decay_at(100_000, 0.999, warmup=True) == 0.999  # capped at the decay


@pytest.mark.parametrize("power", [1.0, 6.94])
def test_power_ema_weighs_update_k_by_its_closed_form(power):
    """EDM2's power EMA over t updates of weights theta_1..theta_t equals the sum of theta_k times
    (k^(p+1) - (k-1)^(p+1)) / t^(p+1): the first update copies, the weights sum to 1."""
    torch.manual_seed(0)
    thetas = torch.randn(50, 3, dtype=torch.float64)
    ema = [torch.zeros(3, dtype=torch.float64)]
    for step, theta in enumerate(thetas):
        ema_update(ema, [theta], [torch.zeros(1)], [torch.zeros(1)], ema_decay_at(step, 0.999, True, power))
    k = torch.arange(1, 51, dtype=torch.float64)
    weights = (k ** (power + 1) - (k - 1) ** (power + 1)) / 50 ** (power + 1)
    torch.testing.assert_close(ema[0], (weights[:, None] * thetas).sum(0))
    assert ema_decay_at(0, 0.999, power=power) == 0.0


def test_lr_schedules():
    assert [lr_factor("constant", n, warmup_steps=4) for n in (0, 1, 3, 100)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor("rsqrt", 100, decay_steps=400) == 1.0  # before the decay starts
    assert lr_factor("rsqrt", 1600, decay_steps=400) == pytest.approx(0.5)  # 1 / sqrt(4)
    assert lr_factor("cosine", 7, progress=0.0) == 1.0
    assert lr_factor("cosine", 7, progress=0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 7, progress=1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("wsd", 7, progress=0.5, cooldown=0.2) == 1.0  # stable phase
    assert lr_factor("wsd", 7, progress=0.9, cooldown=0.2) == pytest.approx(0.5)  # half-way down
    assert lr_factor("wsd", 7, progress=1.0, cooldown=0.2) == 0.0
    assert lr_factor("plateau", 7, warmup_steps=2) == 1.0  # after the warmup the plateau schedule rules


def test_original_recipe_is_the_original_training_loop_bit_for_bit(data_root, tmp_path):
    """One epoch of `sd_train.py --recipe original` (fp32) against the original's loop written out
    with the library's primitives: Adam 3e-4, L1 on the noise, EMA copied then 0.999."""
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "1", "--precision", "fp32")) == 0
    torch.manual_seed(0)
    model = build_unet(model_config("flowers64", 32)).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=True)
    images, gen = load_images(32, data_root, limit=64), torch.Generator().manual_seed(0)
    for step, idx in enumerate(epoch_order(64, 0, seed=0).split(16)):
        x0 = to_model_space(images[idx], FLOWERS_MEAN, FLOWERS_STD, gen)  # run_args flips
        loss = training_loss(model, x0.contiguous(memory_format=torch.channels_last), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pairs = list(ema.parameters()), list(model.parameters()), list(ema.buffers()), list(model.buffers())
        ema_update(*pairs, 0.999 if step else 0.0)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for key, value in ema.state_dict().items():
        assert torch.equal(ckpt["ema"][key], value), key
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["train"]["model"][key], value), key


def test_improved_recipe_sets_its_options_and_flags_override_them(data_root, tmp_path):
    argv = run_args(data_root, tmp_path, "--epochs", "1", "--recipe", "improved", "--lr", "5e-4")
    assert sd_train.main(argv) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    args = ckpt["train"]["args"]
    expected = {**sd_train.RECIPES["improved"], "lr": 5e-4, "flip": True}  # run_args passes --flip
    assert {key: args[key] for key in expected} == expected
    assert ckpt["norm"]["mean"] != list(FLOWERS_MEAN) and ckpt["norm"]["std"] != list(FLOWERS_STD)
    assert ckpt["norm"]["std"][0] > FLOWERS_STD[0]  # the data's true spread is wider than the original's
    assert math.isfinite(ckpt["train"]["best_loss"])
    assert (
        sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--recipe", "original"]) == 2
    )


def test_v_prediction_trains_samples_and_cannot_switch_on_resume(data_root, tmp_path, capsys):
    argv = run_args(data_root, tmp_path, "--epochs", "1", "--prediction", "v", "--eval-every", "1")
    argv += ["--eval-samples", "4", "--eval-steps", "2"]
    assert sd_train.main(argv) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["config"]["prediction"] == "v" and ckpt["train"]["args"]["prediction"] == "v"
    assert ckpt["format"] == "flowers-ddim/2"  # older readers refuse it rather than sample it as eps
    assert math.isfinite(ckpt["train"]["log"][0]["kid"]) and (tmp_path / "epoch_1.png").is_file()
    assert isinstance(load_model(tmp_path / "last.pt")[0], EpsFromV)
    capsys.readouterr()
    assert sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--prediction", "eps"]) == 2
    assert "--prediction cannot change on --resume" in capsys.readouterr().err


def exit_status(argv):
    try:
        return sd_train.main(argv)
    except SystemExit as e:  # argparse's own checks (choices)
        return e.code


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-minutes", "-1"], "--max-minutes must be > 0"),
        (["--recipe", "fastest"], "invalid choice: 'fastest'"),
        (["--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
        (["--min-snr-gamma", "-1"], "--min-snr-gamma must be >= 0"),
        (["--ema-power", "-1"], "--ema-power must be >= 0"),
    ],
)
def test_bad_recipe_values_are_one_line(data_root, tmp_path, capsys, flags, message):
    assert exit_status(run_args(data_root, tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
