"""Class conditioning: labels from Flowers102 and from subfolders, label dropout, classifier-free
guidance, --class names, class-conditional checkpoints, and the class probe of sd_eval.py."""

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import sd_eval
import sd_inference
import sd_train
from conftest import ORIGINAL_RECIPE, TINY, run_args
from lib import training
from lib.checkpoint import FORMAT_2, load_model, make_checkpoint
from lib.classes import GUIDANCE, classes_across, classes_like, drawn_classes, parse_classes, spread
from lib.cli import UserError
from lib.data import TEST, TRAIN, VAL, DecodedBatches, image_labels, load_labelled_images
from lib.diffusion import Guided
from lib.files import atomic_save
from lib.metrics import ClassProbe
from lib.unet import build_unet

CONDITIONAL = dict(TINY, num_classes=3, classes=["red", "green", "blue"])
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def colour_folder(root, per_class=4):
    """root/<colour>/k.png: flat images of their class's colour, 40x48 (not square)."""
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (48, 40), tuple(c + 5 * k for c in rgb)).save(root / name / f"{k}.png")
    return root


def test_flowers102_labels_and_splits_follow_the_mat_files(data_root):
    labels, names, splits = image_labels(data_root)
    mat = scipy.io.loadmat(data_root / "flowers-102" / "imagelabels.mat")["labels"][0] - 1  # 1-based
    ids = scipy.io.loadmat(data_root / "flowers-102" / "setid.mat")
    order = [ids[key][0] - 1 for key in ("trnid", "valid", "tstid")]  # load_images' order of files
    assert labels.tolist() == [int(mat[i]) for split in order for i in split]
    assert splits.tolist() == [s for s, split in zip((TRAIN, VAL, TEST), order, strict=True) for _ in split]
    assert len(names) == 102 and names[0] == "pink primrose" and labels.max() == 101


def test_subfolders_are_the_classes_and_a_limit_keeps_images_with_their_labels(tmp_path):
    root = colour_folder(tmp_path / "pics")
    images, labels, names = load_labelled_images(16, image_dir=root)
    assert names == ["blue", "green", "red"]  # sorted, as ImageFolder
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    images, labels, _ = load_labelled_images(16, image_dir=root, limit=5)
    assert len(images) == len(labels) == 5
    for image, label in zip(images, labels, strict=True):  # the dominant channel names the class
        assert int(image[:, 8, 8].float().argmax()) == {0: 2, 1: 1, 2: 0}[int(label)]
    splits = image_labels(image_dir=root)[2]
    assert splits.tolist() == [TRAIN, TRAIN, VAL, TEST] * 3


def test_a_flat_folder_has_no_classes(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="one subfolder per class"):
        image_labels(image_dir=tmp_path)


def test_decoded_batches_keep_each_image_with_its_label():
    images = torch.arange(10, dtype=torch.uint8)[:, None, None, None].expand(10, 3, 2, 2)
    data = DecodedBatches(images, torch.device("cpu"), labels=torch.arange(10) * 7)
    for x, y in data.batches([torch.tensor([3, 1]), torch.tensor([9])]):
        assert (x[:, 0, 0, 0].long() * 7).tolist() == y.tolist()


def test_label_dropout_gives_the_null_class_at_its_rate(monkeypatch):
    seen = []

    def loss(model, x0, generator=None, labels=None, **objective):
        seen.append(labels)
        return model(x0, torch.full((len(x0),), 0.5), labels).square().mean()

    monkeypatch.setattr(training, "training_loss", loss)
    run = training.Training(dict(TINY, num_classes=5), torch.device("cpu"), "fp32", 1e-3)
    labels = torch.arange(4000) % 5
    run.step(torch.zeros(4000, 3, 8, 8), torch.Generator().manual_seed(0), 0.9, labels, 0.25)
    dropped = seen[0] == 5
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert (seen[0][~dropped] == labels[~dropped]).all()


def conditional_net():
    torch.manual_seed(0)
    return build_unet(CONDITIONAL).eval()


@torch.no_grad()
def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    net = conditional_net()
    x, noise_var, labels = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 1, 2, 1])
    eps_c, eps_u = net(x, noise_var, labels), net(x, noise_var)
    assert torch.equal(eps_u, net(x, noise_var, torch.full((4,), 3)))  # no labels: the null class
    assert not torch.allclose(eps_c, eps_u)
    assert torch.equal(Guided(net, labels, 1.0, 3)(x, noise_var), eps_c)
    assert torch.equal(Guided(net, labels, 0.0, 3)(x, noise_var), eps_u)
    # W = 3 runs both halves as one batch of 8: the same as two separate calls
    torch.testing.assert_close(Guided(net, labels, 3.0, 3)(x, noise_var), eps_u + 3 * (eps_c - eps_u))


def test_an_unconditional_network_is_unchanged_and_refuses_labels():
    torch.manual_seed(0)
    plain = build_unet(TINY)
    assert "class_embedding.weight" not in plain.state_dict()
    with pytest.raises(ValueError, match="unconditional"):
        plain(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([0]))


def test_class_names_indices_and_near_misses():
    names = ["pink primrose", "sunflower", "Giant White Arum Lily"]
    assert parse_classes("SUNFLOWER, 0,giant white arum lily", names) == [1, 0, 2]
    with pytest.raises(UserError, match="did you mean 'sunflower'"):
        parse_classes("sunflowr", names)
    with pytest.raises(UserError, match="not one of the model's 3 classes"):
        parse_classes("3", names)
    with pytest.raises(UserError, match="class-conditional model"):
        parse_classes("sunflower", [])
    assert parse_classes("10,2", ["1", "10", "2"]) == [1, 2]  # a class named "10" before index 10
    assert spread([4, 7], 5).tolist() == [4, 7, 4, 7, 4]
    assert classes_across(4, 102).tolist() == [0, 25, 51, 76]


def test_samples_scored_against_real_images_get_the_real_class_frequencies():
    real = torch.tensor([0] * 30 + [1] * 10)
    drawn = classes_like(real, 20, seed=3)
    assert torch.equal(drawn, classes_like(real, 20, seed=3))
    assert drawn.bincount().tolist() != [10, 10]  # not balanced: ~15 and ~5
    assert sorted(classes_like(real, 40).tolist()) == sorted(real.tolist())  # all of them once
    zeros, ones = classes_like(real, 100).bincount().tolist()  # two whole draws, then part of one
    assert zeros >= 60 and ones >= 20 and zeros + ones == 100


def save_conditional(path, classes=CONDITIONAL["classes"]):
    net = conditional_net()
    atomic_save(
        make_checkpoint(dict(CONDITIONAL, classes=classes), [0.5] * 3, [0.25] * 3, net.state_dict()), path
    )


def test_a_conditional_checkpoint_is_format_2_and_names_its_classes(tmp_path):
    save_conditional(tmp_path / "c.pt")
    ckpt = load_model(tmp_path / "c.pt")[1]
    assert ckpt["format"] == FORMAT_2 and ckpt["config"]["classes"] == ["red", "green", "blue"]
    save_conditional(tmp_path / "bad.pt", classes=["red"])
    with pytest.raises(UserError, match="names 1 classes for 3"):
        load_model(tmp_path / "bad.pt")


def test_inference_paints_named_classes_and_refuses_them_without_a_conditional_model(tmp_path, capsys):
    save_conditional(tmp_path / "c.pt")
    common = ["--checkpoint", str(tmp_path / "c.pt"), "--steps", "2", "--no-show"]
    out = ["--save-dir", str(tmp_path / "s"), "--out", str(tmp_path / "f.png")]
    assert (
        sd_inference.main([*common, *out, "--class", "blue,0", "--num-images", "3", "--guidance", "3"]) == 0
    )
    assert len(list((tmp_path / "s").glob("*.png"))) == 3
    assert sd_inference.main([*common, "--list-classes"]) == 0
    assert "  2  blue" in capsys.readouterr().out
    assert sd_inference.main([*common, "--class", "bleu"]) == 2
    assert "did you mean 'blue'" in capsys.readouterr().err
    unconditional = ["--checkpoint", str(ORIGINAL_RECIPE), "--no-show"]
    assert sd_inference.main([*unconditional, "--class", "sunflower"]) == 2
    assert "--class needs a class-conditional model" in capsys.readouterr().err
    assert sd_inference.main([*unconditional, "--guidance", "2"]) == 2
    assert "--guidance needs a class-conditional model" in capsys.readouterr().err


def test_without_class_a_conditional_model_paints_classes_drawn_from_the_seed(tmp_path):
    save_conditional(tmp_path / "c.pt")
    common = ["--checkpoint", str(tmp_path / "c.pt"), "--steps", "2", "--no-show", "--num-images", "4"]

    def paint(name, *flags):
        out = ["--save-dir", str(tmp_path / name), "--out", str(tmp_path / f"{name}.png")]
        assert sd_inference.main([*common, "--seed", "3", *out, *flags]) == 0
        return [np.asarray(Image.open(f)) for f in sorted((tmp_path / name).glob("*.png"))]

    drawn = drawn_classes(3, 4, seed=3)
    assert len(set(drawn)) > 1  # the test needs a mix
    as_asked = paint("asked", "--class", ",".join(map(str, drawn)))
    assert all(np.array_equal(a, b) for a, b in zip(paint("drawn"), as_asked, strict=True))
    # --guidance 0 alone: no class at all, the same as ignoring an asked class
    none = paint("none", "--guidance", "0")
    assert all(
        np.array_equal(a, b)
        for a, b in zip(none, paint("ignored", "--class", "red", "--guidance", "0"), strict=True)
    )
    assert not all(np.array_equal(a, b) for a, b in zip(none, as_asked, strict=True))
    # a sketch's result i has the seed --seed + i for its noise, and for its class too
    ckpt = {"config": {"classes": ["red", "green", "blue"]}}
    args = sd_inference.get_parser().parse_args(["--init-image", "x.png", "--seed", "5", "--num-images", "3"])
    labels, names = sd_inference.class_labels(args, ckpt)
    assert labels.tolist() == [drawn_classes(3, 1, 5 + i)[0] for i in range(3)]
    assert names == [ckpt["config"]["classes"][i] for i in labels.tolist()]


def test_the_class_probe_reads_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    features = centres[labels] + torch.randn(400, 16, generator=g)
    splits = torch.tensor([TRAIN, TRAIN, VAL, TEST]).repeat(100)[torch.randperm(400, generator=g)]
    probe = ClassProbe(features, labels, splits, 4)
    assert probe.ceiling[0] > 0.95 and probe.ceiling[1] == 1.0
    assert probe.accuracy(features[:40], labels[:40])[0] > 0.95
    assert probe.accuracy(features[:40], (labels[:40] + 1) % 4)[0] < 0.05  # the wrong classes


def test_class_conditional_training_inference_and_class_fidelity(tmp_path, capsys):
    pics = colour_folder(tmp_path / "pics", per_class=8)
    run = tmp_path / "run"
    flags = ["--image-dir", str(pics), "--image-size", "32", "--batch-size", "8", "--num-workers", "0"]
    flags += ["--sample-every", "2", "--num-samples", "3", "--sample-steps", "2", "--eval-every", "2"]
    flags += ["--eval-samples", "6", "--eval-steps", "2"]
    flags += ["--out-dir", str(run)]
    assert sd_train.main([*flags, "--class-cond", "--epochs", "2", "--preset", "flowers64"]) == 0
    assert (run / "epoch_2.png").is_file()
    ckpt = load_model(run / "last.pt")[1]
    assert ckpt["config"]["classes"] == ["blue", "green", "red"]
    assert sd_train.main(["--resume", str(run / "last.pt"), "--epochs", "3"]) == 0
    args = ["--checkpoint", str(run / "last.pt"), "--image-dir", str(pics), "--num-samples", "12"]
    args += ["--steps", "2", "--kid-subsets", "2", "--cache-dir", str(tmp_path / "cache")]
    assert sd_eval.main([*args, "--class-fidelity"]) == 0
    out = capsys.readouterr().out
    assert f"classes as the real images', guidance {GUIDANCE:g}" in out
    assert "real test images top-1 1.000" in out
    assert "samples: top-1" in out
    assert sd_eval.main([*args, "--class-fidelity", "--guidance", "-1"]) == 2


def test_bad_class_flags_are_one_line_errors(data_root, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (40, 40)).save(flat / "a.png")
    assert sd_train.main(["--image-dir", str(flat), "--class-cond", "--out-dir", str(tmp_path / "r")]) == 2
    assert "one subfolder per class" in capsys.readouterr().err
    for dropout in ("0", "1"):  # without dropped labels no "no class" vector is learnt
        flags = run_args(data_root, tmp_path / "r", "--class-cond", "--label-dropout", dropout)
        assert sd_train.main(flags) == 2
        assert "--label-dropout must be in (0, 1)" in capsys.readouterr().err
    assert sd_train.main(run_args(data_root, tmp_path / "r", "--class-cond", "--literal")) == 2
    assert "drop --literal" in capsys.readouterr().err
    assert sd_train.main(run_args(data_root, tmp_path / "u", "--epochs", "1")) == 0
    assert sd_train.main(["--resume", str(tmp_path / "u" / "last.pt"), "--epochs", "2", "--class-cond"]) == 2
    assert "--class-cond cannot change on --resume" in capsys.readouterr().err
