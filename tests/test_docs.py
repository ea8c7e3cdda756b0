"""The scripts that draw docs/ run and draw what they say."""

import sys

import numpy as np
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "docs"))
import make_drawing
import make_progress


def test_drawing_is_the_committed_one():
    """docs/drawing.png is exactly what make_drawing.py draws (no hand edits, no stale file)."""
    drawn = np.asarray(make_drawing.draw_flower())
    assert np.array_equal(drawn, np.asarray(Image.open(ROOT / "docs" / "drawing.png").convert("RGB")))


def test_progress_strip_shows_the_grids_in_epoch_order(tmp_path, capsys):
    colours = {1: (255, 0, 0), 50: (0, 0, 255)}
    for epoch, colour in colours.items():
        Image.new("RGB", (266, 134), colour).save(tmp_path / f"epoch_{epoch}.png")
    out = tmp_path / "progress.png"
    assert make_progress.main([str(tmp_path), "--epochs", "1", "50", "--out", str(out)]) == 0
    strip = np.asarray(Image.open(out).convert("RGB")).astype(int)
    row = strip[strip.shape[0] // 2]
    red = np.flatnonzero((row[:, 0] > 200) & (row[:, 2] < 50))
    blue = np.flatnonzero((row[:, 2] > 200) & (row[:, 0] < 50))
    assert len(red) > 100 and len(blue) > 100 and red.max() < blue.min()  # epoch 1 left of epoch 50
    assert make_progress.main([str(tmp_path), "--epochs", "1", "2", "--out", str(out)]) == 2
    assert "epoch_2.png" in capsys.readouterr().err
    # bad files and names: one line each; a new folder is made, a missing suffix named
    (tmp_path / "epoch_3.png").write_text("not an image")
    assert make_progress.main([str(tmp_path), "--epochs", "3", "--out", str(out)]) == 2
    assert make_progress.main([str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "x.txt")]) == 2
    assert all(line.startswith("error:") for line in capsys.readouterr().err.splitlines())
    assert make_progress.main([str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "new" / "strip")]) == 0
    assert (tmp_path / "new" / "strip.png").is_file() and "strip.png" in capsys.readouterr().out
