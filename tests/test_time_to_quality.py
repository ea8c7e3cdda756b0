"""benchmarks/time_to_quality.py: runs recipes for the same minutes, resumes them, draws the figure."""

import os
import signal
import subprocess
import sys
import time

from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import time_to_quality


def test_two_recipes_for_the_same_minutes_then_the_figure(data_root, tmp_path, capsys):
    # one step an epoch: whenever the budget runs out, at least one epoch (and its probe) is done
    tiny = "--image-size 32 --limit 16 --batch-size 16 --num-workers 0 --eval-samples 4 --eval-steps 1"
    argv = ["--data-root", str(data_root), "--minutes", "0.003", "--eval-every", "1"]
    argv += ["--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--figure", str(tmp_path / "ttq.png")]
    argv += ["--run", f"a: --recipe original {tiny}", "--run", f"b: --recipe improved {tiny}"]
    assert time_to_quality.main(argv) == 0
    for name in ("a", "b"):
        assert (tmp_path / "runs" / name / "last.pt").is_file()
        rows = time_to_quality.read_log(tmp_path / "runs" / name)
        assert rows and all(row["kid"] for row in rows)  # a probe at every epoch's end
    assert Image.open(tmp_path / "ttq.png").size == (850, 450)
    capsys.readouterr()
    assert time_to_quality.main(argv) == 0  # the same command again: nothing left to train
    assert capsys.readouterr().out.count("trained already") == 2


def test_seeds_expand_into_runs_and_summarize_as_mean_and_std(capsys):
    runs = [("a", ["--recipe", "original"]), ("b", ["--max-steps", "5"])]
    expanded = time_to_quality.expand(runs, 2)
    assert [(name, flags[-2:], group) for name, flags, group in expanded] == [
        ("a-s0", ["--seed", "0"], "a"),
        ("b-s0", ["--seed", "0"], "b"),
        ("a-s1", ["--seed", "1"], "a"),
        ("b-s1", ["--seed", "1"], "b"),
    ]
    assert time_to_quality.expand(runs, 1) == [("a", runs[0][1], "a"), ("b", runs[1][1], "b")]
    scores = {
        name: dict(kid=kid, kid_err=0.001, fid=fid, top1=None)
        for name, kid, fid in (
            ("a-s0", 0.10, 80.0),
            ("b-s0", 0.02, 30.0),
            ("a-s1", 0.12, 84.0),
            ("b-s1", 0.03, 31.0),
        )
    }
    time_to_quality.summarize(expanded, scores)
    out = capsys.readouterr().out
    assert "| a | 2 | 0.1100 ± 0.0141 | 82.0 ± 2.8 |  |" in out  # std of 0.10, 0.12: 0.0141
    assert "| b-s1 | 0.0300 ± 0.0010 | 31.0 |  |" in out


def test_sd_eval_lines_are_read_back():
    # sd_eval.py's line, as score() prints it
    line = "samples: KID [efficientnet-lite0] 0.03750 ± 0.00090   FID [efficientnet-lite0] 48.012   "
    line += "(1000 vs 8189 real)"
    assert time_to_quality.SCORE.search(line).groups() == ("0.03750", "0.00090", "48.012")


def test_a_run_needs_a_name(capsys):
    assert time_to_quality.main(["--run", "--recipe improved"]) == 2
    assert "NAME: sd_train.py flags" in capsys.readouterr().err


def test_ctrl_c_reaches_the_training_run_which_saves_before_it_ends(data_root, tmp_path):
    tiny = "--image-size 32 --limit 16 --batch-size 4 --num-workers 0 --eval-samples 4 --eval-steps 1"
    argv = ["--data-root", str(data_root), "--minutes", "30", "--out-dir", str(tmp_path / "runs")]
    argv += [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--figure",
        str(tmp_path / "ttq.png"),
        "--eval-every",
        "50",
    ]
    argv += ["--run", f"a: --recipe improved {tiny}"]
    script = ROOT / "benchmarks" / "time_to_quality.py"
    # a terminal's Ctrl-C: SIGINT to the whole foreground process group, parent and child
    study = subprocess.Popen(
        [sys.executable, str(script), *argv],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    last = tmp_path / "runs" / "a" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.is_file() and time.monotonic() < deadline:  # epoch 1 is written: training is on
        time.sleep(0.2)
    assert last.is_file()
    os.killpg(study.pid, signal.SIGINT)
    out, err = study.communicate(timeout=120)
    assert study.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "error: interrupted"
    assert "stopped in epoch" in out.decode() or "stopped after epoch" in out.decode()  # it saved
    assert "Traceback" not in err.decode()
