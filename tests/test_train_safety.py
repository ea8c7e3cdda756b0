"""What a training run keeps when something goes wrong (a diverged loss, overflowing fp16 steps, a
failing KID probe or sample grid), and where a resumed run writes."""

import math

import pytest
import torch

import sd_train
from conftest import StopAfter, run_args
from lib import trainer
from lib.cli import UserError
from lib.training import Training


def losses_become(monkeypatch, value, steps):
    """Training.step returns `value` at the given global steps (1-based), as an overflow would."""
    real_step, seen = Training.step, []

    def step(self, *args):
        seen.append(None)
        loss = real_step(self, *args)
        return torch.full_like(loss, value) if len(seen) in steps else loss

    monkeypatch.setattr(Training, "step", step)


def saved(path):
    return torch.load(path, weights_only=True)["train"]


def test_a_resumed_run_writes_beside_its_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert sd_train.main(run_args(data_root, "runs/x", "--epochs", "1")) == 0  # a relative --out-dir
    run = tmp_path / "here" / "runs" / "x"
    assert saved(run / "last.pt")["args"]["out_dir"] == str(run)  # kept absolute
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert sd_train.main(["--resume", "../here/runs/x/last.pt", "--epochs", "2"]) == 0
    assert saved(run / "last.pt")["epoch"] == 2
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing started where the command ran
    assert f"writing to {run}" in capsys.readouterr().out


def test_a_diverged_loss_with_a_stop_request_saves_nothing(data_root, tmp_path, monkeypatch):
    """The loss turns NaN in step 2 (bf16: no loss scaling, so its step was taken) and a stop is
    asked right after: the error comes before last.pt, which would hold NaN weights."""
    losses_become(monkeypatch, math.nan, steps={2})
    args, _ = sd_train.resolve_args(run_args(data_root, tmp_path, "--epochs", "1", "--precision", "bf16"))
    with pytest.raises(UserError, match="diverged in epoch 1: 1 of its 2 steps"):
        sd_train.train(args, None, StopAfter(2))
    assert not (tmp_path / "last.pt").exists()


def test_fp16_steps_the_scaler_skips_are_counted_not_fatal(data_root, tmp_path, monkeypatch, capsys):
    """A batch whose fp16 forward pass overflows (its images scaled by 1e6): the scaler skips the
    step, and the run goes on with every weight and BatchNorm statistic finite."""
    real, calls = trainer.to_model_space, []

    def overflowing(*args, **kwargs):
        calls.append(None)
        x0 = real(*args, **kwargs)
        return x0 * 1e6 if len(calls) == 2 else x0

    monkeypatch.setattr(trainer, "to_model_space", overflowing)
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "1", "--precision", "fp16")) == 0
    assert "1 steps skipped (fp16 overflow)" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    for name, tensors in (("ema", ckpt["ema"]), ("model", ckpt["train"]["model"])):
        for key, value in tensors.items():
            assert torch.isfinite(value.float()).all(), (name, key)  # running statistics included
    state = ckpt["train"]
    assert math.isfinite(state["best_loss"]) and state["log"][0]["loss"] == round(state["best_loss"], 6)


def test_fp16_steps_skipped_again_and_again_mean_divergence(data_root, tmp_path, monkeypatch, capsys):
    # 64 images at batch 2: 32 steps; from step 3 on every loss overflows
    losses_become(monkeypatch, math.inf, steps=set(range(3, 33)))
    argv = run_args(data_root, tmp_path, "--epochs", "1", "--precision", "fp16", batch_size=2)
    assert sd_train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "diverged in epoch 1: 30 of its 32 steps" in err and "bf16" in err
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("where", ["kid", "grid"])
def test_a_failure_after_the_epoch_keeps_the_epoch(data_root, tmp_path, monkeypatch, capsys, where):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory\nmore lines of a long message")

    if where == "kid":
        monkeypatch.setattr(trainer.KidProbe, "__call__", out_of_memory)
    else:
        monkeypatch.setattr(trainer, "generate", out_of_memory)
    kid_args = ["--eval-every", "1", "--eval-samples", "4", "--eval-steps", "1"] if where == "kid" else []
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "2", *kid_args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "failed after epoch 1 (RuntimeError: out of memory)" in err
    assert saved(tmp_path / "last.pt")["epoch"] == 1  # written before the probe and the grid


def test_kid_needs_three_training_images(data_root, tmp_path, capsys):
    argv = run_args(data_root, tmp_path, "--epochs", "1", "--limit", "2", "--eval-every", "1", batch_size=1)
    assert sd_train.main(argv) == 2
    assert "--eval-every needs at least 3 training images" in capsys.readouterr().err
