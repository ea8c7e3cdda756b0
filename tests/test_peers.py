"""benchmarks/peers.py: each system trains for the budget, paints, is scored and drawn; a second
run reuses the scores; the table and sd_eval.py's lines read back; bad systems are one line."""

import argparse
import json
import math
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import peers
from benchmarks.peer_systems import PEERS, missing_packages


def pictures(folder, n=24, size=32):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g)
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return folder


@pytest.mark.skipif(
    bool(missing_packages(list(PEERS))),
    reason=f"the peers' packages are not installed ({missing_packages(list(PEERS))}): "
    "pip install -r requirements-peers.txt",
)
def test_every_system_trains_for_the_budget_then_is_scored_and_drawn(tmp_path, capsys):
    argv = ["--image-dir", str(pictures(tmp_path / "real")), "--image-size", "32", "--minutes", "0.01"]
    argv += ["--num-samples", "3", "--steps", "2", "--out-dir", str(tmp_path / "out")]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--figure", str(tmp_path / "peers.png")]
    argv += ["--system", "diffusers", "--system", "ddpm-pytorch"]
    argv += ["--system", "ours: --recipe improved --batch-size 8 --num-workers 0"]
    assert peers.main(argv) == 0
    for name in ("diffusers", "ddpm-pytorch", "ours"):
        record = json.loads((tmp_path / "out" / name / "record.json").read_text())
        assert record["steps"] >= 1 and record["images_per_s"] > 0, record
        assert record["kid_err"] >= 0 and record["fid"] >= 0 and record["extractor"] == "efficientnet-lite0"
    for name in ("diffusers", "ddpm-pytorch"):  # their own samplers' images, scored from the folder
        shots = sorted((tmp_path / "out" / name / "samples").iterdir())
        assert [p.name for p in shots] == ["00000.png", "00001.png", "00002.png"]
        assert Image.open(shots[0]).size == (32, 32)
        assert json.loads((tmp_path / "out" / name / "record.json").read_text())["departures"]
    table = (tmp_path / "out" / "peers.md").read_text()
    assert (
        table.count("\n| ") == 4 and "| ours (`--recipe improved --batch-size 8 --num-workers 0`) |" in table
    )
    assert Image.open(tmp_path / "peers.png").size[0] == 900
    capsys.readouterr()
    assert peers.main(argv) == 0  # the same command again: every system scored already
    assert capsys.readouterr().out.count("scored already") == 3
    assert peers.main([*argv, "--num-samples", "2"]) == 2  # other settings: not the same numbers
    assert "was scored with other settings" in capsys.readouterr().err


def test_the_table_and_sd_evals_lines():
    text = "real: 8189 images\nsamples: KID [efficientnet-lite0] 0.03750 ± 0.00090   "
    text += "FID [efficientnet-lite0] 48.012"
    assert peers.parse_scores(text) == dict(
        kid=0.0375, kid_err=0.0009, fid=48.012, extractor="efficientnet-lite0"
    )
    with pytest.raises(peers.UserError, match="no 'samples: KID"):
        peers.parse_scores("total 3s")
    rows = [
        dict(
            system="diffusers",
            steps=700,
            batch_size=16,
            images_per_s=9.71,
            kid=0.2,
            kid_err=0.004,
            fid=150.0,
            extractor="efficientnet-lite0",
        ),
        dict(system="best", flags="--recipe improved", steps=1200, batch_size=32, images_per_s=60.0),
    ]
    args = argparse.Namespace(minutes=20, num_samples=1000, steps=20, image_size=64)
    table = peers.table(rows, args)
    assert "| diffusers | 700 x 16 | 9.7 | 0.2000 ± 0.0040 | 150.0 |" in table
    assert "| best (`--recipe improved`) | 1200 x 32 | 60.0 |  |  |" in table
    assert "KID [efficientnet-lite0]" in table and "20 minutes" in table and "1000 samples" in table


@pytest.mark.skipif(bool(missing_packages(list(PEERS))), reason="the peers' packages are not installed")
def test_each_peer_keeps_its_packages_defaults():
    diffusers = PEERS["diffusers"](
        widths=[32, 64], total_steps=1000, image_size=16, sampling_steps=20, seed=0
    )
    opt = diffusers.opt.defaults
    assert (opt["lr"], opt["betas"], opt["weight_decay"], opt["eps"]) == (1e-4, (0.95, 0.999), 1e-6, 1e-8)
    factor = diffusers.lr.lr_lambdas[0]  # warmup from 0 over 500 steps, then cosine to 0 at the run's end
    assert (factor(0), factor(250), factor(500), factor(750), factor(1000)) == pytest.approx(
        (0, 0.5, 1, 0.5, 0)
    )
    ema = diffusers.ema
    assert (ema.decay, ema.use_ema_warmup, ema.inv_gamma, ema.power) == (0.9999, True, 1.0, 0.75)
    cfg = diffusers.schedule.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type) == (1000, "linear", "epsilon")
    x0 = torch.rand(16, 3, 16, 16) * 2 - 1
    assert math.isfinite(diffusers.train_step(x0, "fp32"))
    images = diffusers.sample(2, seed=0, precision="fp32")
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() < images.max() <= 1

    ddpm = PEERS["ddpm-pytorch"](dim=8, total_steps=1000, image_size=16, sampling_steps=20, seed=0)
    assert (ddpm.net.objective, ddpm.net.num_timesteps, ddpm.net.is_ddim_sampling) == ("pred_v", 1000, True)
    assert ddpm.opt.defaults["lr"] == 1e-4 and ddpm.opt.defaults["betas"] == (0.9, 0.99)
    assert (ddpm.ema.beta, ddpm.ema.update_every, ddpm.ema.update_after_step) == (0.995, 10, 100)
    assert math.isfinite(ddpm.train_step(x0, "fp32"))
    images = ddpm.sample(2, seed=0, precision="fp32")
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() < images.max() <= 1


def test_bad_systems_and_budgets_are_one_line(capsys):
    assert peers.main(["--system", "keras"]) == 2
    assert "one of diffusers, ddpm-pytorch, or 'NAME: sd_train.py flags'" in capsys.readouterr().err
    assert peers.main(["--system", "diffusers: --recipe improved"]) == 2  # a peer's name for one of ours
    capsys.readouterr()
    assert peers.main(["--minutes", "0"]) == 2
    assert "--minutes must be > 0" in capsys.readouterr().err
    assert peers.main(["--image-size", "36"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    assert peers.main(["--diffusers-widths", "32,48"]) == 2
    assert "multiples of 32" in capsys.readouterr().err


def test_the_profile_puts_each_systems_step_time_in_categories(capsys):
    """benchmarks/peer_profile.py: a row per system whose categories add up to about its measured
    step (the profiler's own overhead aside), with convolutions among them, and FLOPs per image
    that do not depend on the batch."""
    from benchmarks import peer_profile

    systems = ["best", *([] if missing_packages(["ddpm-pytorch"]) else ["ddpm-pytorch"])]
    argv = ["--systems", *systems, "--steps", "1", "--warmup", "1", "--image-size", "32"]
    assert peer_profile.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| system"))
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in lines:
        if line.startswith("| ") and line != header:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = dict(zip(names, cells, strict=True))
    assert list(rows) == systems
    for row in rows.values():
        ms = [float(row[c]) for c in names[5:]]
        step_ms = 1e3 / float(row["images/s"])
        assert float(row["convolution"]) > 0 and 0.5 * step_ms < sum(ms) < 3 * step_ms, row
    # flowers64-v2 at 32 px: a quarter of its 5.2 GFLOP per image at 64 px
    assert float(rows["best"]["GFLOP/image"]) == pytest.approx(5.2 / 4, rel=0.05)
