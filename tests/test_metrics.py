import numpy as np
import pytest
import torch
from PIL import Image
from test_checkpoint import tiny_checkpoint

import sd_eval
import sd_train
from lib.cli import UserError
from lib.metrics import InceptionV3, fid, frechet_distance, kid
from lib.run_folder import read_log


def test_kid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g, dtype=torch.float64)
    b = torch.randn(400, 16, generator=g, dtype=torch.float64)
    # Against itself the unbiased estimator is off by -2 (k(x,x) - k(x,y)) / m, here ~ -0.04:
    # zero on the scale of the distances below.
    same, same_std = kid(a, a.clone(), num_subsets=20, subset_size=200)
    assert abs(same) < 0.05 and same_std >= 0
    twin, _ = kid(a, b, num_subsets=20, subset_size=200)  # two draws of one distribution
    assert abs(twin) < 0.05
    shifted, _ = kid(a, b + 0.5, num_subsets=20, subset_size=200)
    far, _ = kid(a, b + 1.0, num_subsets=20, subset_size=200)
    assert shifted > 0.5 and far > 5 * shifted


def test_kid_matches_torch_fidelity_on_whole_sets():
    """Same unbiased estimator as torch-fidelity's (the reference KID code): with one subset of
    all samples the random draw is only a permutation, so both must agree to float precision."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 64, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(300, 64, generator=g, dtype=torch.float64) + 0.1
    ours, _ = kid(real, fake, num_subsets=1, subset_size=300)
    ref = kid_features_to_metric(real, fake, kid_subsets=1, kid_subset_size=300, verbose=False, rng_seed=0)
    assert ours == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert ours > 0.01  # the two sets differ: a real test of the cross term


def mmd2(x, y):
    """The unbiased MMD^2 of two sets with KID's kernel, written out pair by pair."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j)
    xy = sum(k(a, b) for a in x for b in y)
    return xx / (len(x) * (len(x) - 1)) + yy / (len(y) * (len(y) - 1)) - 2 * xy / (len(x) * len(y))


def test_kid_error_is_the_jackknife_over_the_samples_written_out():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(12, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(7, 4, generator=g, dtype=torch.float64) + 0.5
    mean, error = kid(real, fake, num_subsets=3, subset_size=7, seed=5)
    # the same subsets of real images (every subset holds all 7 fakes), drawn as kid() draws them
    draws = torch.Generator().manual_seed(5)
    subsets = []
    for _ in range(3):
        subsets.append(real[torch.randperm(12, generator=draws)[:7]])
        torch.randperm(7, generator=draws)
    values = torch.tensor([mmd2(x, fake) for x in subsets])
    assert mean == pytest.approx(values.mean().item(), rel=1e-12)
    left_out = torch.tensor(
        [sum(mmd2(x, torch.cat([fake[:j], fake[j + 1 :]])) for x in subsets) / 3 for j in range(7)]
    )
    jackknife = 6 / 7 * (left_out - left_out.mean()).square().sum()
    assert error == pytest.approx((jackknife + values.var() / 3).sqrt().item(), rel=1e-9)
    assert kid(real.float(), fake.float(), num_subsets=3, subset_size=7, seed=5)[0] == pytest.approx(mean)


@pytest.mark.parametrize("num_fake, subset, low, high", [(100, 100, 0.8, 1.3), (300, 100, 0.9, 1.5)])
def test_kid_error_covers_a_new_draw_of_the_samples(num_fake, subset, low, high):
    """The printed ± against what it claims: the spread of KID over independent draws of the
    fake set (a model sampled with 80 seeds) and of the subsets, the real set fixed. Gaussians
    with a known shift. With subsets of all the fakes (sd_eval.py's case) the ± matched that
    spread within 10% in trials of this test; with smaller subsets it runs 10-20% high."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    values, errors = [], []
    for i in range(80):
        fake = torch.randn(num_fake, 16, generator=g, dtype=torch.float64) + 0.3
        value, error = kid(real, fake, num_subsets=10, subset_size=subset, seed=i)
        values.append(value)
        errors.append(error)
    spread, printed = torch.tensor(values).std().item(), torch.tensor(errors).mean().item()
    assert low < printed / spread < high


def test_frechet_distance_matches_the_closed_form():
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (s1 - s2)^2 with s the standard deviations.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9)
    # A full covariance against itself, shifted: only the means count.
    a = np.random.default_rng(0).normal(size=(5, 5))
    cov = a @ a.T + np.eye(5)
    assert frechet_distance(mu1.repeat(2)[:5], cov, mu1.repeat(2)[:5] + 1, cov) == pytest.approx(
        5.0, abs=1e-6
    )


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = (
        torch.randn(20000, 3, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
        + 1
    )
    assert fid(x, y) == pytest.approx(3 * 1.0 + 1.0, rel=0.03)  # means differ by 1 in 3 dims; one std 1 -> 2


def test_inception_loading_code_runs_on_a_random_state_dict(tmp_path, monkeypatch):
    """No network: build torch-fidelity's network untrained, save its state dict, load it back
    through our --inception-weights path and extract features of the right shape."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    monkeypatch.setattr(torch, "load", lambda *a, **k: {})
    untrained = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path="unused"
    )
    monkeypatch.undo()
    torch.save(untrained.state_dict(), tmp_path / "random_inception.pt")
    extractor = InceptionV3(tmp_path / "random_inception.pt")
    features = extractor(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="does not fit the FID Inception"):
        InceptionV3(tmp_path / "wrong.pt")


def test_inception_offline_gives_one_line_naming_the_flag(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="--inception-weights"):
        InceptionV3()
    with pytest.raises(UserError, match=r"--inception-weights .*no such file"):
        InceptionV3(tmp_path / "missing.pth")


def real_folder(path, n=24, size=40):
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        color = tuple(torch.randint(0, 256, (3,), generator=g).tolist())
        Image.new("RGB", (size, size), color).save(path / f"{i}.png")
    return path


def test_eval_cli_end_to_end(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    real = real_folder(tmp_path / "real")
    argv = [
        "--checkpoint",
        str(tmp_path / "m.pt"),
        "--num-samples",
        "8",
        "--steps",
        "2",
        "--image-dir",
        str(real),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--kid-subsets",
        "5",
        "--floor",
    ]
    assert sd_eval.main(argv) == 0
    out = capsys.readouterr().out
    assert "samples: KID [efficientnet-lite0]" in out and "FID [efficientnet-lite0]" in out
    assert "floor (real vs real): KID [efficientnet-lite0]" in out
    assert len(list((tmp_path / "cache").glob("features-efficientnet-lite0-*.pt"))) == 1
    assert sd_eval.main(argv) == 0  # second run reads the cached reference features
    assert (
        sd_eval.main(
            [
                "--samples-dir",
                str(real),
                "--image-size",
                "32",
                "--image-dir",
                str(real),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--kid-subsets",
                "5",
            ]
        )
        == 0
    )
    assert "samples: KID" in capsys.readouterr().out


def test_samples_dir_is_scored_at_the_samples_own_size(tmp_path, capsys):
    samples, real = real_folder(tmp_path / "samples", size=24), real_folder(tmp_path / "real", size=40)
    argv = ["--samples-dir", str(samples), "--image-dir", str(real), "--cache-dir", str(tmp_path / "c")]
    assert sd_eval.main([*argv, "--kid-subsets", "5"]) == 0
    out = capsys.readouterr().out
    assert "real: 24 images at 24 px" in out and "samples: KID" in out  # the real images made 24 px
    assert "KID's ± is one standard error of the score over the draw of its 24 images" in out
    assert "FID: 24 images cannot fill a 1280-d covariance" in out
    Image.new("RGB", (30, 24)).save(samples / "odd.png")  # one picture of another shape
    assert sd_eval.main(argv) == 2
    err = capsys.readouterr().err
    assert "not all square and of one size (24x24, 30x24)" in err and err.count("\n") == 1
    assert sd_eval.main([*argv, "--image-size", "16", "--kid-subsets", "5"]) == 0  # asked for: resized
    assert "real: 24 images at 16 px" in capsys.readouterr().out


def test_eval_cli_bad_inputs(tmp_path, capsys):
    assert sd_eval.main(["--num-samples", "8"]) == 2
    assert "give --checkpoint or --samples-dir" in capsys.readouterr().err
    tiny_checkpoint(tmp_path / "m.pt")
    for extra, message in (
        (["--eta", "2"], "--eta must be in [0, 1]"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--sampler", "heun", "--steps", "1"], "--steps must be >= 3 for heun"),
        (["--sampler", "dpm++2m", "--eta", "0.5"], "--eta applies to ddim only"),
        (["--kid-subsets", "0"], "--kid-subsets must be >= 1"),
        (["--kid-subset-size", "2"], "--kid-subset-size must be >= 3"),
        (["--samples-dir", str(tmp_path)], "choose one"),
    ):
        assert sd_eval.main(["--checkpoint", str(tmp_path / "m.pt"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert sd_eval.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    one = real_folder(tmp_path / "one", n=1)
    assert (
        sd_eval.main(
            [
                "--samples-dir",
                str(one),
                "--image-size",
                "32",
                "--image-dir",
                str(real_folder(tmp_path / "r")),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 2
    )
    assert "at least 3 images on each side, got 1" in capsys.readouterr().err


def test_training_tracks_kid_and_keeps_the_best_by_it(tmp_path):
    real = real_folder(tmp_path / "real", n=16, size=20)
    argv = [
        "--preset",
        "flowers64",
        "--image-size",
        "16",
        "--image-dir",
        str(real),
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--num-workers",
        "0",
        "--num-samples",
        "2",
        "--sample-steps",
        "2",
        "--eval-every",
        "1",
        "--eval-samples",
        "8",
        "--eval-steps",
        "2",
        "--best-by",
        "kid",
        "--out-dir",
        str(tmp_path / "run"),
    ]
    assert sd_train.main(argv) == 0
    log = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train"]["log"]
    assert all(r["kid"] is not None and r["kid_err"] > 0 for r in log)  # each probe with its error
    rows = read_log(tmp_path / "run")
    assert [float(r["kid_err"]) for r in rows] == [r["kid_err"] for r in log]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["train"]
    assert best["best_kid"] == pytest.approx(min(r["kid"] for r in log[: best["epoch"]]), abs=1e-6)
    assert (tmp_path / "run" / "kid_curve.png").is_file()


def test_ieee_fp32_context_sets_and_restores_the_gpu_precision_flags():
    from lib.runtime import ieee_fp32

    def flags():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    before = flags()
    with ieee_fp32():
        assert flags() == (False, False)
        # The precision as inductor reads it (it raises once the per-backend API was used).
        assert torch.get_float32_matmul_precision() == "highest"
    assert flags() == before
