import csv
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

import sd_train
from conftest import ROOT, TINY, StopAfter, assert_same_state, loss_curve, run_args
from lib.bn_stats import recompute_bn_stats
from lib.checkpoint import load_model, make_checkpoint, read_checkpoint
from lib.data import _ignore_stop_signals, load_images, start_workers
from lib.diffusion import signal_rates_of
from lib.normalization import FLOWERS_MEAN, model_stats, to_model_space
from lib.run_folder import lock_run_folder
from lib.runtime import autocast, pick_precision
from lib.unet import build_unet


@pytest.mark.parametrize(
    "options", [{}, dict(adaptive_norm=True, attention=True, activation="silu", zero_init=True)]
)
def test_loss_halves_on_real_flowers(data_root, options):
    """A small U-Net on 640 real flowers at 32 px: 200 Adam steps (lr 1e-3, batch 32, bf16 where
    native) take the L1 noise loss from ~0.75 (an untrained network; 0.80 = E|eps| for a zero
    output) below half of that; with the original's network and with every network option."""
    losses = loss_curve(
        load_images(32, data_root, limit=640),
        literal=False,
        precision=pick_precision("auto", torch.device("cpu")),
        cfg=dict(TINY, **options),
    )
    assert losses[-20:].mean() < 0.5 * losses[:10].mean(), losses


def test_dry_run_prints_the_exact_parameter_counts(capsys):
    assert sd_train.main(["--dry-run"]) == 0
    assert "parameters: 65289475" in capsys.readouterr().out
    assert sd_train.main(["--dry-run", "--preset", "flowers64"]) == 0
    out = capsys.readouterr().out
    assert (
        "parameters: 1713059" in out
        and "epochs: 500" in out
        and "batch_size: 64" in out
        and "lr: 0.0003" in out
    )
    # the network options: the preset's, each overridable, shown in the config
    assert (
        sd_train.main(
            ["--dry-run", "--preset", "flowers64-v2", "--no-attention", "--activation", "leaky_relu"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "'adaptive_norm': True, 'zero_init': True}" in out and "parameters: 1981475" in out


def test_a_short_run_writes_every_output(data_root, tmp_path):
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "2")) == 0
    for name in ("epoch_1.png", "epoch_2.png", "best.pt", "last.pt", "training_log.csv", "loss_curve.png"):
        assert (tmp_path / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "training_log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "loss", "lr", "seconds", "images_per_s", "kid", "kid_err"}
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["config"]["image_size"] == 32 and ckpt["train"]["epoch"] == 2


def test_save_every_writes_every_nth_epoch_and_the_last(data_root, tmp_path, monkeypatch):
    from lib.trainer import TrainingRun

    written, save = [], TrainingRun.save
    monkeypatch.setattr(
        TrainingRun, "save", lambda run, name, **_: written.append((run.state["epoch"], name))
    )
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "5", "--save-every", "2")) == 0
    # epochs 2 and 4, the last, and epoch 1, whose sample grid is drawn (run_args: --sample-every 100)
    assert [e for e, name in written if name == "last.pt"] == [1, 2, 4, 5]
    assert {e for e, name in written if name == "best.pt"} <= {1, 2, 4, 5}
    # the real files: best.pt holds the written epoch of least loss
    monkeypatch.setattr(TrainingRun, "save", save)
    argv = run_args(data_root, tmp_path / "files", "--epochs", "5", "--save-every", "2")
    assert sd_train.main(argv) == 0
    log = torch.load(tmp_path / "files" / "last.pt", weights_only=True)["train"]["log"]
    best = torch.load(tmp_path / "files" / "best.pt", weights_only=True)["train"]
    assert best["epoch"] == min((1, 2, 4, 5), key=lambda e: log[e - 1]["loss"])
    # a stop request between saves still writes the epoch it ends with
    args, _ = sd_train.resolve_args(
        run_args(data_root, tmp_path / "stop", "--epochs", "5", "--save-every", "4")
    )
    sd_train.train(args, None, StopAfter(5))  # asked after each of the 4 steps, then at the end of epoch 1
    assert torch.load(tmp_path / "stop" / "last.pt", weights_only=True)["train"]["epoch"] == 1


def test_sample_grids_with_a_second_order_sampler(data_root, tmp_path):
    argv = run_args(data_root, tmp_path, "--epochs", "1", "--sampler", "heun", "--sample-steps", "3")
    assert sd_train.main(argv) == 0
    assert (tmp_path / "epoch_1.png").is_file()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train"]["args"]["sampler"] == "heun"


def test_literal_path_trains_and_its_checkpoint_samples_on_the_fast_path(data_root, tmp_path):
    assert (
        sd_train.main(run_args(data_root, tmp_path, "--epochs", "1", "--literal", "--num-workers", "2")) == 0
    )
    from lib.checkpoint import load_model

    model, ckpt = load_model(tmp_path / "last.pt")
    assert not model.literal and ckpt["train"]["args"]["literal"]


def test_resume_equals_an_uninterrupted_run(data_root, tmp_path):
    assert sd_train.main(run_args(data_root, tmp_path / "straight", "--epochs", "2")) == 0
    assert sd_train.main(run_args(data_root, tmp_path / "split", "--epochs", "1")) == 0
    assert sd_train.main(["--resume", str(tmp_path / "split" / "last.pt"), "--epochs", "2"]) == 0
    assert_same_state(tmp_path / "straight" / "last.pt", tmp_path / "split" / "last.pt")


def test_stop_mid_epoch_then_resume_equals_an_uninterrupted_run(data_root, tmp_path):
    assert sd_train.main(run_args(data_root, tmp_path / "straight", "--epochs", "2")) == 0
    args, _ = sd_train.resolve_args(run_args(data_root, tmp_path / "split", "--epochs", "2"))
    sd_train.train(
        args, None, StopAfter(7)
    )  # asked after each of 4 steps + at the end of epoch 1, then stop after step 2 of epoch 2
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["train"]
    assert (state["epoch"], state["epoch_steps"], state["images_done"]) == (1, 2, 32)
    assert sd_train.main(["--resume", str(tmp_path / "split" / "last.pt")]) == 0
    assert_same_state(tmp_path / "straight" / "last.pt", tmp_path / "split" / "last.pt")


def test_ema_bn_stats_own_gives_the_average_its_own_statistics_and_changes_nothing_else(data_root, tmp_path):
    """--ema-bn-stats own: last.pt's averaged weights carry the BatchNorm statistics lib.bn_stats
    computes for them on the run's images; the weights, the live network, Adam and the losses are
    those of the same run without it, also across a resume (the next step copies them back)."""
    assert sd_train.main(run_args(data_root, tmp_path / "live", "--epochs", "2")) == 0
    assert sd_train.main(run_args(data_root, tmp_path / "own", "--epochs", "1", "--ema-bn-stats", "own")) == 0
    assert sd_train.main(["--resume", str(tmp_path / "own" / "last.pt"), "--epochs", "2"]) == 0
    live, own = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("live", "own"))
    assert own["train"]["args"]["ema_bn_stats"] == "own" and live["train"]["args"]["ema_bn_stats"] == "live"
    stats = {k for k in own["ema"] if "running_" in k or "num_batches" in k}  # BatchNorm's buffers
    for k in own["ema"]:
        assert torch.equal(own["ema"][k], live["ema"][k]) == (k not in stats), k
    for k in own["train"]["model"]:
        assert torch.equal(own["train"]["model"][k], live["train"]["model"][k]), k
    assert [r["loss"] for r in own["train"]["log"]] == [r["loss"] for r in live["train"]["log"]]

    averaged, ckpt = load_model(tmp_path / "live" / "last.pt")  # the same weights, live statistics
    mean, std = model_stats(ckpt)
    with autocast(torch.device("cpu"), pick_precision("auto", torch.device("cpu"))):
        recompute_bn_stats(averaged, mean, std, load_images(32, data_root, limit=64), batch_size=64, seed=0)
    for k, v in averaged.state_dict().items():
        torch.testing.assert_close(v, own["ema"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_stop_at_an_epoch_end_saves_without_sampling_first(data_root, tmp_path):
    args, _ = sd_train.resolve_args(run_args(data_root, tmp_path, "--epochs", "2"))
    sd_train.train(args, None, StopAfter(5))  # asked after each of the 4 steps, then at the end of epoch 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train"]["epoch"] == 1
    assert not (tmp_path / "epoch_1.png").exists()  # the grid (and a KID) would delay last.pt


def test_stop_in_the_last_epoch_leaves_a_complete_run(data_root, tmp_path, capsys):
    args, _ = sd_train.resolve_args(run_args(data_root, tmp_path, "--epochs", "1"))
    sd_train.train(args, None, StopAfter(5))  # at the end of the only epoch
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train"]["epoch"] == 1
    out = capsys.readouterr().out
    assert "the run is complete" in out and "resume with" not in out


def test_resume_guards_and_overrides(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert sd_train.main(run_args(data_root, run, "--epochs", "1")) == 0
    # a new run in a used folder would replace its checkpoints: refused, naming the way out
    assert sd_train.main(run_args(data_root, run, "--epochs", "1")) == 2
    assert "--resume" in capsys.readouterr().err
    # nothing left to do is said before any work, as is a change of the network
    assert sd_train.main(["--resume", str(run / "last.pt")]) == 2
    assert "at the end of epoch 1 already: pass --epochs N with N > 1" in capsys.readouterr().err
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2", "--image-size", "64"]) == 2
    assert "the run used 32" in capsys.readouterr().err
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2", "--attention"]) == 2
    assert "--attention cannot change on --resume (the run used False)" in capsys.readouterr().err
    old = tmp_path / "old.pt"
    shutil.copy(run / "last.pt", old)
    # flags given on resume override the saved ones, the LR schedule's included
    assert (
        sd_train.main(
            ["--resume", str(run / "last.pt"), "--epochs", "2", "--lr-patience", "3", "--lr-factor", "0.25"]
        )
        == 0
    )
    sched = torch.load(run / "last.pt", weights_only=True)["train"]["scheduler"]
    assert (sched["patience"], sched["factor"]) == (3, 0.25)
    # the older state resumed into the folder would replace the newer last.pt: refused
    assert sd_train.main(["--resume", str(old), "--epochs", "2", "--out-dir", str(run)]) == 2
    assert "further along" in capsys.readouterr().err
    # so would a run resumed into another run's folder, however far along either is
    assert sd_train.main(run_args(data_root, tmp_path / "other", "--epochs", "1", "--seed", "7")) == 0
    assert (
        sd_train.main(
            ["--resume", str(run / "last.pt"), "--epochs", "3", "--out-dir", str(tmp_path / "other")]
        )
        == 2
    )
    assert "belongs to another run" in capsys.readouterr().err
    # a generator state of another device type (a CUDA run resumed on a CPU) gets fresh streams
    ckpt = torch.load(old, weights_only=True)
    ckpt["train"]["rng"]["device"] = [torch.zeros(16, dtype=torch.uint8)]  # the size of a CUDA state
    torch.save(ckpt, old)
    assert sd_train.main(["--resume", str(old), "--epochs", "2", "--overwrite", "--out-dir", str(run)]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["train"]["epoch"] == 2
    # one-shot flags apply to their own command: that last.pt was written under --overwrite, and
    # resuming it must not overwrite anything unasked; switches turn off with --no-*
    args, _ = sd_train.resolve_args(["--resume", str(run / "last.pt"), "--no-flip", "--epochs", "3"])
    assert torch.load(run / "last.pt", weights_only=True)["train"]["args"]["overwrite"]
    assert not args.overwrite and not args.flip and args.limit == 64  # the rest as saved
    # an explicit --lr restarts the schedule there, even at the run's first value
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for group in ckpt["train"]["optimizer"]["param_groups"]:
        group["lr"] = 1.5e-4  # as if the schedule had halved it
    torch.save(ckpt, run / "last.pt")
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "3", "--lr", "3e-4"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["train"]["log"][-1]["lr"] == 3e-4
    # a run that stopped early stays stopped unless --early-stop grows
    ckpt = torch.load(run / "last.pt", weights_only=True)
    ckpt["train"]["bad_epochs"] = 5
    torch.save(ckpt, run / "last.pt")
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "4", "--early-stop", "5"]) == 2
    assert "stopped early" in capsys.readouterr().err


def test_init_from_starts_a_new_run_at_a_checkpoints_ema_weights(data_root, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    assert sd_train.main(run_args(data_root, src, "--epochs", "1")) == 0
    ema = torch.load(src / "last.pt", weights_only=True)["ema"]
    # fine-tuned at twice the size (--preset is not used: the network is the checkpoint's)
    new = run_args(data_root, tmp_path / "new", "--init-from", str(src / "last.pt"), "--image-size", "64")
    seen = {}

    class FirstStepSeen(sd_train.TrainingRun):
        def train_epoch(self, stop):
            seen.update(model=self.training.model.state_dict(), ema=self.training.ema.state_dict())
            seen["step"] = self.state["global_step"]
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sd_train, "TrainingRun", FirstStepSeen)
        assert sd_train.main([*new, "--preset", "sd128", "--epochs", "1"]) == 130
    assert seen["step"] == 0
    for name in ("model", "ema"):
        assert seen[name].keys() == ema.keys()
        assert all(torch.equal(seen[name][k], ema[k]) for k in ema), name
    assert sd_train.main([*new, "--epochs", "1", "--norm-stats", "data"]) == 0
    ckpt = torch.load(tmp_path / "new" / "last.pt", weights_only=True)
    assert ckpt["norm"] == torch.load(src / "last.pt", weights_only=True)["norm"]  # what the weights know
    assert ckpt["config"] == dict(ckpt["config"], image_size=64, widths=[32, 64, 96, 128])
    assert ckpt["train"]["global_step"] == 4  # a fresh optimizer: 64 images in batches of 16
    assert ckpt["train"]["args"]["init_from"] == str(src / "last.pt")
    # what cannot work is one line each
    capsys.readouterr()
    assert sd_train.main([*new, "--resume", str(src / "last.pt")]) == 2
    assert "give one of them" in capsys.readouterr().err
    assert sd_train.main([*new, "--image-size", "30", "--out-dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: --image-size:")
    assert sd_train.main([*new, "--class-cond", "--out-dir", str(tmp_path / "x")]) == 2
    assert "is an unconditional model" in capsys.readouterr().err
    assert sd_train.main([*new, "--activation", "silu", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--activation: --init-from" in err and err.endswith("has leaky_relu\n")
    cfg = dict(ckpt["config"], num_classes=2, classes=["a", "b"])
    torch.save(
        make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, build_unet(cfg).state_dict()), tmp_path / "cond.pt"
    )
    args = run_args(data_root, tmp_path / "x", "--init-from", str(tmp_path / "cond.pt"))
    assert sd_train.main(args) == 2
    assert "(2: a, b, ...) are not this data's (102: pink primrose" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_input_scale_has_its_own_key_and_never_compounds(data_root, tmp_path, capsys):
    src = tmp_path / "src"
    assert sd_train.main(run_args(data_root, src, "--epochs", "1")) == 0
    norm = torch.load(src / "last.pt", weights_only=True)["norm"]
    # fine-tuned at twice the side with the schedule shifted by 2 log(1/2) (Hoogeboom et al. 2023)
    run = tmp_path / "run"
    new = run_args(data_root, run, "--init-from", str(src / "last.pt"), "--image-size", "64")
    assert sd_train.main([*new, "--epochs", "1", "--input-scale", "0.5"]) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["norm"] == norm and ckpt["config"]["input_scale"] == 0.5  # norm: the data's own
    assert ckpt["format"] == "flowers-ddim/3"  # readers that know no input scale refuse it
    # the model's space is the normalized image times 1/2
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    scaled = to_model_space(pixels, *model_stats(ckpt))
    assert torch.allclose(scaled, 0.5 * to_model_space(pixels, norm["mean"], norm["std"]), atol=1e-6)
    # a resumed run keeps it; it cannot change on resume
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    again = torch.load(run / "last.pt", weights_only=True)
    assert again["norm"] == norm and again["config"]["input_scale"] == 0.5
    capsys.readouterr()
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "3", "--input-scale", "1"]) == 2
    assert "--input-scale cannot change on --resume (the run used 0.5)" in capsys.readouterr().err
    # a second fine-tune: the scale is absolute (given again or not), never 0.5 x 0.5
    for i, flags in enumerate([["--input-scale", "0.5"], []]):
        out = tmp_path / f"again{i}"
        argv = run_args(data_root, out, "--init-from", str(run / "last.pt"), "--image-size", "64")
        assert sd_train.main([*argv, "--epochs", "1", *flags]) == 0
        second = torch.load(out / "last.pt", weights_only=True)
        assert second["norm"] == norm and second["config"]["input_scale"] == 0.5
    # back to 1: the key leaves the config (the original's configs stay as they were)
    argv = run_args(data_root, tmp_path / "one", "--init-from", str(run / "last.pt"), "--image-size", "64")
    assert sd_train.main([*argv, "--epochs", "1", "--input-scale", "1"]) == 0
    assert "input_scale" not in torch.load(tmp_path / "one" / "last.pt", weights_only=True)["config"]


def test_the_schedule_ends_travel_with_the_weights(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert sd_train.main(run_args(data_root, run, "--epochs", "1", "--signal-rates", "0.999", "0.01")) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["config"]["signal_rates"] == [0.999, 0.01] and ckpt["format"] == "flowers-ddim/3"
    model, _ = load_model(run / "last.pt")
    assert signal_rates_of(model) == (0.999, 0.01)
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2"]) == 0  # kept on resume
    assert torch.load(run / "last.pt", weights_only=True)["config"]["signal_rates"] == [0.999, 0.01]
    capsys.readouterr()
    assert (
        sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "3", "--signal-rates", "0.95", "0.02"])
        == 2
    )
    assert "--signal-rates cannot change on --resume" in capsys.readouterr().err
    # a fine-tune keeps them unless told, and may move them; the original's ends leave no key
    for flags, expected in [([], [0.999, 0.01]), (["--signal-rates", "0.95", "0.02"], None)]:
        out = tmp_path / f"ft{len(flags)}"
        argv = run_args(data_root, out, "--init-from", str(run / "last.pt"), "--epochs", "1")
        assert sd_train.main([*argv, *flags]) == 0
        assert torch.load(out / "last.pt", weights_only=True)["config"].get("signal_rates") == expected


def test_a_training_state_with_the_scale_folded_into_std_reads_as_before(data_root, tmp_path):
    # last.pt files written before the key existed: std / b in norm, b only in the saved flags
    run = tmp_path / "run"
    new = run_args(data_root, run, "--epochs", "1", "--input-scale", "0.5")
    assert sd_train.main(new) == 0
    ckpt = torch.load(run / "last.pt", weights_only=True)
    old = dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "input_scale"})
    old["norm"] = dict(ckpt["norm"], std=[s / 0.5 for s in ckpt["norm"]["std"]])
    old["format"] = "flowers-ddim/1"
    torch.save(old, tmp_path / "old.pt")
    read = read_checkpoint(tmp_path / "old.pt")
    assert read["config"]["input_scale"] == 0.5
    assert read["norm"]["std"] == pytest.approx(ckpt["norm"]["std"], rel=1e-12)
    assert model_stats(read)[1] == pytest.approx(model_stats(ckpt)[1], rel=1e-12)
    # and it resumes as the run it was
    shutil.copy(tmp_path / "old.pt", run / "last.pt")
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2"]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["config"]["input_scale"] == 0.5


def test_resume_switching_loss_scaling_on(data_root, tmp_path):
    # a bf16/fp32 run saves an empty GradScaler state; the literal path (or fp16) scales the loss
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "1", "--limit", "32")) == 0
    assert sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--literal"]) == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train"]["scaler"]  # now a real state
    # and back to the fast path with fp16 scaling: Adam runs fused again (the literal run's unfused
    # setting, carried over, made the scaler's fused step fail)
    assert (
        sd_train.main(
            ["--resume", str(tmp_path / "last.pt"), "--epochs", "3", "--no-literal", "--precision", "fp16"]
        )
        == 0
    )
    groups = torch.load(tmp_path / "last.pt", weights_only=True)["train"]["optimizer"]["param_groups"]
    assert all(g["fused"] for g in groups)


def test_stop_request_before_and_during_training(capsys):
    stop = sd_train.StopRequest()
    try:
        with pytest.raises(KeyboardInterrupt):  # loading data: nothing to save, stop at once
            stop._handle(signal.SIGINT, None)
        stop.arm()
        stop._handle(signal.SIGTERM, None)  # training: finish the step, save, exit
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()


def test_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sd_train, "resolve_args", interrupted)
    assert sd_train.main([]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: interrupted") and "\n" not in err


def test_sigterm_saves_last_and_exits_cleanly(data_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "sd_train.py"), *run_args(data_root, tmp_path, "--epochs", "1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out  # saved, but not finished
    assert "SIGTERM" in out and "--resume" in out
    state = torch.load(tmp_path / "last.pt", weights_only=True)["train"]
    assert 1 <= state["epoch"] < 1000
    assert sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", str(state["epoch"] + 1)]) == 0
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train"]["epoch"] == state["epoch"] + 1


def test_bad_inputs_exit_2_with_one_line(data_root, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (
            ["--preset", "flowers64", "--data-root", str(tmp_path / "none"), "--out-dir", str(tmp_path)],
            "flowers-102/jpg",
        ),
        (
            [
                "--preset",
                "flowers64",
                "--image-dir",
                str(tmp_path / "empty"),
                "--out-dir",
                str(tmp_path / "new"),
            ],
            "holds no images",
        ),
        (["--preset", "flowers64", "--image-size", "36", "--data-root", str(data_root)], "multiple of 8"),
        (["--resume", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (run_args(data_root, tmp_path, "--epochs", "0"), "--epochs must be >= 1"),
        (run_args(data_root, tmp_path, "--ema-decay", "5"), "--ema-decay must be in [0, 1)"),
        (run_args(data_root, tmp_path, "--lr", "-1"), "--lr must be > 0"),
        (run_args(data_root, tmp_path, "--input-scale", "0"), "--input-scale must be a finite number > 0"),
        (run_args(data_root, tmp_path, "--input-scale", "inf"), "--input-scale must be a finite number > 0"),
        (
            run_args(data_root, tmp_path, "--signal-rates", "0.5", "0.9"),
            "--signal-rates: signal rates must satisfy",
        ),
        (
            run_args(data_root, tmp_path, "--signal-rates", "1", "0.02"),
            "--signal-rates: signal rates must satisfy",
        ),
        (
            run_args(data_root, tmp_path, "--sampler", "heun", "--eval-steps", "2"),
            "must be >= 3 for --sampler heun",
        ),
        (run_args(data_root, tmp_path, "--save-every", "0"), "--save-every must be >= 1"),
    ]
    (tmp_path / "file").write_text("not a folder")
    cases += [
        (run_args(data_root, tmp_path / "file" / "run"), "cannot write --out-dir"),
        (
            [
                "--preset",
                "flowers64",
                "--data-root",
                str(tmp_path / "none"),
                "--out-dir",
                str(tmp_path / "new"),
            ],
            "flowers-102/jpg",
        ),
    ]
    for argv, message in cases:
        assert sd_train.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "new").exists()  # a failed start leaves no empty run folder


def test_trains_on_a_folder_of_own_pictures(tmp_path, capsys):
    from PIL import Image

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(6):
        Image.new("RGB", (40 + i, 36), (40 * i, 100 + 10 * i, 200 - 5 * i)).save(pictures / f"{i}.png")
    out = tmp_path / "run"
    argv = [
        "--preset",
        "flowers64",
        "--image-size",
        "16",
        "--image-dir",
        str(pictures),
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--num-samples",
        "2",
        "--sample-steps",
        "2",
        "--out-dir",
        str(out),
    ]
    assert sd_train.main(argv) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["norm"]["mean"] != list(FLOWERS_MEAN)  # statistics computed from the folder
    assert ckpt["norm"]["mean"][2] == pytest.approx(187.5 / 255, abs=1e-3)
    assert math.isfinite(ckpt["train"]["best_loss"])
    # the run's grids must not become training images of its next run
    assert sd_train.main([*argv[:-1], str(pictures / "run")]) == 2
    assert "inside --image-dir" in capsys.readouterr().err
    # pictures without variation in a channel cannot be normalized: one line, not NaN losses
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (10 * i, 100, 200)).save(flat / f"{i}.png")
    assert sd_train.main([*argv[:5], str(flat), *argv[6:-1], str(tmp_path / "run2")]) == 2
    assert "do not vary in colour channel G" in capsys.readouterr().err


def test_help_shows_every_default_and_no_empty_ones():
    text = " ".join(sd_train.get_parser().format_help().split())  # argparse wraps lines
    assert "passes over the images (default: 500)" in text and "(default: 2000)" in text
    assert "(by --recipe: original 0.999, improved 0.995)" in text  # what each recipe sets
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--flip, --no-flip" in text


def test_a_folder_in_use_by_another_run_is_refused(data_root, tmp_path, capsys):
    # flock locks belong to an open file, so a lock taken here stands for a run in another process
    held = lock_run_folder(tmp_path)
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "1")) == 2
    assert f"another training run (process {os.getpid()}) is writing to {tmp_path}" in capsys.readouterr().err
    held.close()
    assert (
        sd_train.main(run_args(data_root, tmp_path, "--epochs", "1")) == 0
    )  # free again; the run released it too
    held = lock_run_folder(tmp_path)
    assert (
        sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2"]) == 2
    )  # a resume of a run still going
    held.close()


@pytest.mark.parametrize(
    "stage,extra", [("loading images", ["--limit", "8189"]), ("steps per epoch", ["--literal"])]
)
def test_sigterm_to_the_whole_process_group_stops_cleanly(data_root, tmp_path, stage, extra):
    # systemd, Slurm and `kill -- -PGID` signal every process of the group, the image-decoding
    # workers too: the run must still stop the orderly way, with no "worker killed" traceback.
    cmd = [
        sys.executable,
        str(ROOT / "sd_train.py"),
        *run_args(data_root, tmp_path, "--epochs", "1000", "--num-workers", "2", *extra),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines = []
    while not any(stage in line for line in lines) and (line := proc.stdout.readline()):
        lines.append(line)
    time.sleep(1)  # into the decoding (the whole data set: seconds) or into the steps
    os.killpg(proc.pid, signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "killed by signal" not in out, out
    if stage == "loading images":
        assert "error: interrupted" in out  # stopped before training: nothing to save
    else:
        assert "SIGTERM: stopping after this step" in out and "--resume" in out


def _slow_start(worker_id):
    time.sleep(1)  # the window in which a group's SIGTERM can reach a worker before its init ran
    _ignore_stop_signals(worker_id)


def test_a_worker_signalled_before_its_init_neither_dies_nor_runs_the_parents_handler():
    previous = signal.signal(signal.SIGTERM, lambda *_: os._exit(3))  # stands for the stop handler
    try:
        before = set(multiprocessing.active_children())
        batches = start_workers(
            DataLoader(list(range(4)), batch_size=2, num_workers=1, worker_init_fn=_slow_start)
        )
        (worker,) = set(multiprocessing.active_children()) - before
        time.sleep(0.3)  # the worker runs Python now, inside its init
        os.kill(worker.pid, signal.SIGTERM)
        assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_widths_and_block_depth_flags_shape_a_new_run_and_are_fixed_after(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--widths", "16,32,48,64", "--block-depth", "1", "--epochs", "1"]
    assert sd_train.main(run_args(data_root, run, *flags)) == 0
    cfg = torch.load(run / "last.pt", weights_only=True)["config"]
    assert (cfg["widths"], cfg["block_depth"]) == ([16, 32, 48, 64], 1)
    capsys.readouterr()
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2", "--block-depth", "2"]) == 2
    assert "--block-depth cannot change on --resume (the run used 1)" in capsys.readouterr().err
    same = ["--widths", "16,32,48,64", "--block-depth", "1", "--dry-run"]  # the run's own values: no change
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "2", *same]) == 0
    new = run_args(data_root, tmp_path / "new", "--init-from", str(run / "last.pt"))
    assert sd_train.main([*new, "--widths", "16,32,48,96"]) == 2
    assert capsys.readouterr().err.endswith("has [16, 32, 48, 64]\n")
    with pytest.raises(SystemExit):
        sd_train.main(run_args(data_root, tmp_path / "x", "--widths", "16,x"))
    assert "expected comma-separated integers, got '16,x'" in capsys.readouterr().err
