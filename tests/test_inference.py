import pytest
import torch
from PIL import Image
from test_checkpoint import original_layout, tiny_checkpoint

import sd_inference
from lib.unet import build_unet, model_config


def test_writes_the_figure_and_one_png_per_image(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    out, save_dir = tmp_path / "fig.png", tmp_path / "imgs"
    assert (
        sd_inference.main(
            [
                "--checkpoint",
                str(tmp_path / "m.pt"),
                "--steps",
                "2",
                "--out",
                str(out),
                "--save-dir",
                str(save_dir),
                "--no-show",
            ]
        )
        == 0
    )
    assert Image.open(out).size == (1000, 540)  # 2x4 panels of 2.5 in at 100 dpi, plus the title
    files = sorted(save_dir.glob("*.png"))
    assert len(files) == 8
    assert all(Image.open(f).size == (32, 32) for f in files)  # the checkpoint's image size


def test_an_unknown_sampler_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as stop:  # argparse's choices
        sd_inference.main(["--sampler", "euler"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "invalid choice: 'euler'" in err and "\n" not in err


@pytest.mark.parametrize("sampler", ["dpm++2m", "heun"])
def test_second_order_samplers_paint_sketch_and_interpolate(tmp_path, sampler, monkeypatch):
    import lib.sample

    seen, real = [], lib.sample.sample  # which sampler generate() really runs
    monkeypatch.setattr(lib.sample, "sample", lambda name, *a, **k: seen.append(name) or real(name, *a, **k))
    tiny_checkpoint(tmp_path / "m.pt")
    Image.new("RGB", (40, 30), (200, 30, 60)).save(tmp_path / "drawing.png")
    common = ["--checkpoint", str(tmp_path / "m.pt"), "--sampler", sampler, "--steps", "3", "--no-show"]
    for extra in ([], ["--init-image", str(tmp_path / "drawing.png")], ["--interpolate"]):
        out = tmp_path / f"fig{len(extra)}.png"
        assert sd_inference.main([*common, *extra, "--out", str(out), "--save-dir", str(tmp_path / "s")]) == 0
        assert out.is_file()
    assert seen and set(seen) == {sampler}


def test_same_seed_same_images_other_seed_other_images(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")

    def sample(seed, name):
        d = tmp_path / name
        assert (
            sd_inference.main(
                [
                    "--checkpoint",
                    str(tmp_path / "m.pt"),
                    "--steps",
                    "2",
                    "--num-images",
                    "3",
                    "--seed",
                    str(seed),
                    "--out",
                    str(tmp_path / f"{name}.png"),
                    "--save-dir",
                    str(d),
                    "--no-show",
                ]
            )
            == 0
        )
        return [Image.open(f).tobytes() for f in sorted(d.glob("*.png"))]

    assert sample(1, "a") == sample(1, "b")
    assert sample(1, "a") != sample(2, "c")


def test_loads_an_original_checkpoint(tmp_path):
    model = build_unet(model_config("flowers64"))
    torch.save(original_layout(model), tmp_path / "model.pt")
    assert (
        sd_inference.main(
            [
                "--checkpoint",
                str(tmp_path / "model.pt"),
                "--image-size",
                "16",
                "--steps",
                "1",
                "--num-images",
                "2",
                "--out",
                str(tmp_path / "f.png"),
                "--save-dir",
                str(tmp_path / "i"),
                "--no-show",
            ]
        )
        == 0
    )
    assert Image.open(next((tmp_path / "i").glob("*.png"))).size == (16, 16)


def test_missing_default_model_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sd_inference, "DEFAULT_CHECKPOINT", tmp_path / "models" / "flowers128-v2-cond.pt")
    assert sd_inference.main(["--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert "not there yet" in err and "sd_train.py --preset flowers64" in err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--checkpoint", "CKPT", "--num-images", "0"], "--num-images must be >= 1"),
        (["--checkpoint", "CKPT", "--eta", "2"], "--eta must be in [0, 1]"),
        (["--checkpoint", "CKPT", "--interpolate", "--eta", "0.5"], "leave --eta at 0"),
        (["--checkpoint", "CKPT", "--steps", "0"], "--steps must be >= 1 for ddim"),
        (["--checkpoint", "CKPT", "--sampler", "heun", "--steps", "2"], "--steps must be >= 3 for heun"),
        (["--checkpoint", "CKPT", "--sampler", "dpm++2m", "--eta", "1"], "--eta applies to ddim only"),
        (
            ["--checkpoint", "CKPT", "--image-size", "30"],
            "--image-size: image size 30 must be a positive multiple of 4",
        ),
        (["--checkpoint", "MISSING"], "checkpoint not found"),
        (["--checkpoint", "TEXT"], "not a readable checkpoint"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, argv, message):
    tiny_checkpoint(tmp_path / "m.pt")
    (tmp_path / "t.pt").write_text("not a checkpoint")
    subst = {
        "CKPT": str(tmp_path / "m.pt"),
        "MISSING": str(tmp_path / "nope.pt"),
        "TEXT": str(tmp_path / "t.pt"),
    }
    argv = [subst.get(a, a) for a in argv] + ["--out", str(tmp_path / "f.png")]
    assert sd_inference.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_bad_output_paths_fail_before_sampling(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    (tmp_path / "file").write_text("a file, not a folder")
    for out, message in ((tmp_path / "f.xyz", "cannot write .xyz"), (tmp_path / "file" / "f.png", "error:")):
        assert (
            sd_inference.main(["--checkpoint", str(tmp_path / "m.pt"), "--out", str(out), "--no-show"]) == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err
    # a mistyped checkpoint leaves no empty output folders behind
    assert (
        sd_inference.main(
            [
                "--checkpoint",
                str(tmp_path / "typo.pt"),
                "--out",
                str(tmp_path / "figs" / "x.png"),
                "--save-dir",
                str(tmp_path / "imgs"),
                "--no-show",
            ]
        )
        == 2
    )
    assert not (tmp_path / "figs").exists() and not (tmp_path / "imgs").exists()


def test_out_without_a_suffix_is_a_png_and_says_so(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    assert (
        sd_inference.main(
            [
                "--checkpoint",
                str(tmp_path / "m.pt"),
                "--steps",
                "1",
                "--num-images",
                "1",
                "--out",
                str(tmp_path / "fig"),
                "--no-show",
            ]
        )
        == 0
    )
    assert (tmp_path / "fig.png").is_file() and str(tmp_path / "fig.png") in capsys.readouterr().out
    # a folder: the default name inside it, not a file beside it
    assert (
        sd_inference.main(
            [
                "--checkpoint",
                str(tmp_path / "m.pt"),
                "--steps",
                "1",
                "--num-images",
                "1",
                "--out",
                str(tmp_path) + "/",
                "--no-show",
            ]
        )
        == 0
    )
    assert (tmp_path / "generated.png").is_file()


def test_ctrl_c_is_one_line_and_status_130(capsys):
    from lib.cli import run_cli

    def body(args):
        raise KeyboardInterrupt

    assert run_cli(body, None) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_many_images_go_to_save_dir_and_the_figure_shows_a_screenful(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    out, save_dir = tmp_path / "fig.png", tmp_path / "imgs"
    argv = ["--checkpoint", str(tmp_path / "m.pt"), "--steps", "1", "--num-images", "40", "--no-show"]
    assert sd_inference.main([*argv, "--out", str(out), "--save-dir", str(save_dir)]) == 0
    assert len(list(save_dir.glob("*.png"))) == 40  # every image saved
    assert Image.open(out).size == (1500, 1540)  # 32 panels, 6 wide and 6 high, not 4 x 10
    assert "the figure shows the first 32 of 40 images; all 40 are in" in capsys.readouterr().out
    assert sd_inference.main([*argv, "--num-images", "33", "--out", str(out)]) == 0
    assert "--save-dir DIR saves them all" in capsys.readouterr().out
    assert sd_inference.main([*argv, "--interpolate", "--num-images", "64", "--out", str(out)]) == 0
    assert "32 of the 64 frames, evenly spaced" in capsys.readouterr().out  # the whole way, both ends
