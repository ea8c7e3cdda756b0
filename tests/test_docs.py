"""The scripts that draw docs/ run and draw what they say."""

import argparse
import re
import sys

import numpy as np
import torch
from PIL import Image

import sd_eval
import sd_inference
import sd_train
from conftest import ROOT, TINY
from lib.checkpoint import make_checkpoint
from lib.files import atomic_save
from lib.runtime import setup
from lib.unet import build_unet

sys.path.insert(0, str(ROOT / "docs"))
import make_comparison
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


def test_comparison_rows_are_what_sd_inference_paints(tmp_path, capsys):
    cond = dict(TINY, num_classes=3, classes=["red", "green", "blue"])
    for name, cfg in (("u.pt", TINY), ("c.pt", cond)):
        torch.manual_seed(len(name) + len(cfg))
        atomic_save(
            make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, build_unet(cfg).eval().state_dict()), tmp_path / name
        )
    args = argparse.Namespace(seed=5, num_images=3, steps=2)
    images, classes = make_comparison.paint_row(tmp_path / "c.pt", args, *setup("cpu", "auto"))
    flags = ["--checkpoint", str(tmp_path / "c.pt"), "--seed", "5", "--num-images", "3", "--steps", "2"]
    flags += ["--no-show", "--save-dir", str(tmp_path / "s"), "--out", str(tmp_path / "f.png")]
    assert sd_inference.main(flags) == 0
    saved = [np.asarray(Image.open(f)) for f in sorted((tmp_path / "s").glob("*.png"))]
    ours = (images * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(a, b) for a, b in zip(ours, saved, strict=True))
    assert len(classes) == 3 and set(classes) <= {"red", "green", "blue"}
    out = tmp_path / "cmp.png"
    argv = [
        str(tmp_path / "u.pt"),
        str(tmp_path / "c.pt"),
        "--num-images",
        "2",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert make_comparison.main(argv) == 0 and Image.open(out).size[0] > Image.open(out).size[1]
    assert make_comparison.main([*argv, "--titles", "one"]) == 2
    assert "1 titles for 2 checkpoints" in capsys.readouterr().err


def pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_stays_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_and_image_resolves():
    for page in pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if not target.startswith(("http://", "https://", "#")):
                assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target}"


def test_commands_in_the_pages_name_flags_the_scripts_know():
    parsers = {"sd_train.py": sd_train.get_parser(), "sd_inference.py": sd_inference.get_parser()}
    parsers |= {"sd_eval.py": sd_eval.get_parser()}
    for page in pages():
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                words = command.split("#")[0].split()
                if len(words) > 1 and words[0] == "python" and words[1] in parsers:
                    known = parsers[words[1]]._option_string_actions
                    for word in words[2:]:
                        flag = word.split("=")[0]
                        assert not flag.startswith("--") or flag in known, f"{page.name}: {words[1]} {flag}"
