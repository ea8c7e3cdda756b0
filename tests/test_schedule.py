"""Step budgets (lib/schedule.py): the LR as a function of the step against closed forms, and runs
whose weights do not depend on how busy the machine was (--max-steps, a fixed --max-minutes)."""

import math
import shutil
import time

import pytest
import torch

import lib.trainer
import sd_train
from conftest import assert_same_state, run_args
from lib.schedule import lr_factor, progress_at, total_steps
from lib.training import Training

RATE = dict(step=10, seconds=6.0, seconds_per_step=0.5)  # step 10 after 6 s, 0.5 s a step since


def test_run_length_in_steps_against_closed_forms():
    assert total_steps(7, None, None) == 7 and total_steps(7, 1.0, RATE) == 7  # --max-steps rules
    assert total_steps(None, 1.0, None) is None  # minutes not timed yet
    assert total_steps(None, None, RATE) is None  # no step budget at all
    assert total_steps(None, 1.0, RATE) == 10 + (60 - 6) / 0.5  # 118
    assert total_steps(None, 2.0, RATE) == 238  # one more minute: 120 more steps at that rate
    assert total_steps(None, 0.05, RATE) == 4  # less than was spent: a length the run has passed
    assert total_steps(None, 0.01, RATE) == 1  # never below one step
    # progress: the nearer of the two ends, epochs (counted in images) or steps
    assert progress_at(30, epochs_done=1.5, epochs=10) == 0.15
    assert progress_at(30, epochs_done=1.5, epochs=10, total_steps=60) == 0.5
    assert progress_at(0, epochs_done=0, epochs=10, total_steps=60) == 0.0


def cosine_lr(step, total, lr=1e-3):
    return lr * 0.5 * (1 + math.cos(math.pi * step / total))


def slow_steps(monkeypatch, seconds=0.05):
    """A loaded machine: every training step takes `seconds` longer."""
    step = Training.step

    def slowed(self, *args, **kwargs):
        time.sleep(seconds)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Training, "step", slowed)


def test_max_steps_reruns_bit_identical_on_a_loaded_machine(data_root, tmp_path, monkeypatch, capsys):
    # 4 steps an epoch; the cosine decay runs to step 6, mid-epoch 2
    flags = ["--epochs", "50", "--max-steps", "6", "--lr-schedule", "cosine", "--lr", "1e-3"]
    assert sd_train.main(run_args(data_root, tmp_path / "a", *flags)) == 0
    out = capsys.readouterr().out
    assert "6 steps done in epoch 2" in out and "a larger --max-steps" in out
    slow_steps(monkeypatch)
    assert sd_train.main(run_args(data_root, tmp_path / "b", *flags)) == 0
    assert_same_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["train"]
    assert state["global_step"] == 6 and state["epoch"] == 1
    assert state["log"][0]["lr"] == pytest.approx(cosine_lr(3, 6))  # epoch 1's last step: step 3 of 6
    # the budget is spent: a resume needs a larger one, which extends the run
    assert sd_train.main(["--resume", str(tmp_path / "a" / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "has trained 6 steps (" in err and "already, its budget: pass a larger --max-steps" in err
    assert sd_train.main(["--resume", str(tmp_path / "a" / "last.pt"), "--max-steps", "9"]) == 0
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["train"]["global_step"] == 9


class Clock:
    """lib.trainer's clock, made to read 0.25 s more at each look: the trainer looks once per step,
    so the timed rate is exactly 0.25 s a step."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.25
        return self.now


def test_max_minutes_fixes_the_length_once_and_resumes_identically(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lib.trainer, "time", Clock())
    flags = ["--epochs", "1", "--max-minutes", "0.05", "--lr-schedule", "cosine"]
    assert sd_train.main(run_args(data_root, tmp_path / "a", *flags)) == 0
    assert "0.05 minutes of training come to 12 steps at 0.250 s a step" in capsys.readouterr().out
    rate = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["train"]["budget_rate"]
    # timed over steps 2 and 3 (the first pays one-off costs), 3 s at 0.25 s a step: 12 steps
    assert rate == dict(step=3, seconds=0.75, seconds_per_step=0.25)
    monkeypatch.undo()
    # one resume on a quiet machine, one on a loaded one: the same length, LRs and weights
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert sd_train.main(["--resume", str(tmp_path / "a" / "last.pt"), "--epochs", "50"]) == 0
    slow_steps(monkeypatch)
    assert sd_train.main(["--resume", str(tmp_path / "b" / "last.pt"), "--epochs", "50"]) == 0
    assert_same_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["train"]
    assert state["budget_rate"] == rate and state["global_step"] == 12  # timed once, never again
    assert state["log"][2]["lr"] == pytest.approx(3e-4 * lr_factor("cosine", 11, progress=11 / 12))
    capsys.readouterr()
    assert sd_train.main(["--resume", str(tmp_path / "b" / "last.pt")]) == 2
    err = capsys.readouterr().err
    assert "has trained 12 steps (" in err and "its budget: pass a larger --max-minutes" in err


def test_a_resume_may_swap_the_kind_of_budget(data_root, tmp_path, capsys):
    argv = run_args(data_root, tmp_path, "--epochs", "50", "--max-minutes", "0.001")
    assert sd_train.main(argv) == 0
    assert sd_train.main(["--resume", str(tmp_path / "last.pt"), "--max-steps", "1000", "--epochs", "2"]) == 0
    args = torch.load(tmp_path / "last.pt", weights_only=True)["train"]["args"]
    assert args["max_steps"] == 1000 and args["max_minutes"] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--max-steps", "5", "--max-minutes", "1"], "two budgets for one run: give one of them"),
        (["--max-minutes", "0"], "--max-minutes must be > 0"),
    ],
)
def test_bad_budgets_get_one_line(data_root, tmp_path, capsys, flags, message):
    assert sd_train.main(run_args(data_root, tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_run_whose_rate_was_never_timed_goes_by_its_minutes(data_root, tmp_path, capsys):
    # 4 steps take far less than the timing window: the rate is not timed yet (as in checkpoints
    # written before budgets were kept in steps, or a run stopped while timing)
    assert sd_train.main(run_args(data_root, tmp_path, "--epochs", "1", "--max-minutes", "5")) == 0
    state = torch.load(tmp_path / "last.pt", weights_only=True)["train"]
    assert state["budget_rate"] is None
    capsys.readouterr()
    assert (
        sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--max-minutes", "1e-5"]) == 2
    )
    assert "pass a larger --max-minutes" in capsys.readouterr().err
    assert sd_train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2"]) == 0  # 5 minutes: on
    assert torch.load(tmp_path / "last.pt", weights_only=True)["train"]["global_step"] == 8
