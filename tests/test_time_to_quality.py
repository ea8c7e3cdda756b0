"""benchmarks/time_to_quality.py: runs recipes for the same minutes, resumes them, draws the figure."""

import sys

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
    assert capsys.readouterr().out.count("minutes trained already") == 2


def test_a_run_needs_a_name(capsys):
    assert time_to_quality.main(["--run", "--recipe improved"]) == 2
    assert "NAME: sd_train.py flags" in capsys.readouterr().err
