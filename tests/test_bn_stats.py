"""BatchNorm statistics recomputed for the averaged weights (lib/bn_stats.py): the weights stay,
the statistics become the equal average of each batch's, taken under these weights."""

import copy
import math

import pytest
import torch
from PIL import Image
from test_checkpoint import tiny_checkpoint

from conftest import TINY
from lib.bn_stats import main, recompute_bn_stats
from lib.checkpoint import load_model, make_checkpoint, read_checkpoint
from lib.files import atomic_save
from lib.unet import build_unet

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.2]


def images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def batch_norms(net):
    return [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def direct_statistics(net, x, labels, batches, batch_size, seed, rates, dropout=0.1):
    """Each BatchNorm's input mean and unbiased variance per batch, averaged over the batches: the
    same batches, times, noise and dropped classes as recompute_bn_stats draws (written out here
    with the schedule's closed form), in train mode."""
    seen = {bn: [] for bn in batch_norms(net)}
    hooks = [
        bn.register_forward_hook(
            lambda m, inputs, _: seen[m].append(
                (inputs[0].mean((0, 2, 3)), inputs[0].var((0, 2, 3), unbiased=True))
            )
        )
        for bn in seen
    ]
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(x), generator=g)[: batches * batch_size].split(batch_size)
    (lo, hi), net = (math.acos(r) for r in rates), net.train()
    with torch.no_grad():
        for i in picked:
            x0 = (x[i].float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
            if labels is not None:  # as a training step: the classes dropped first, then t and the noise
                dropped = torch.rand(len(i), generator=g) < dropout
                kept = torch.where(dropped, net.num_classes, labels[i])
            angle = lo + torch.rand(len(i), 1, 1, 1, generator=g) * (hi - lo)
            x_t = torch.cos(angle) * x0 + torch.sin(angle) * torch.randn(x0.shape, generator=g)
            if labels is None:
                net(x_t, torch.sin(angle).flatten() ** 2)
            else:
                net(x_t, torch.sin(angle).flatten() ** 2, kept)
    for h in hooks:
        h.remove()
    return {bn: [torch.stack(s).mean(0) for s in zip(*stats, strict=True)] for bn, stats in seen.items()}


@pytest.mark.parametrize("classes", [0, 3])
def test_the_statistics_are_those_of_these_weights_and_the_weights_stay(classes):
    torch.manual_seed(0)
    cfg = dict(TINY, signal_rates=[0.999, 0.01], **({"num_classes": classes} if classes else {}))
    averaged = build_unet(cfg)
    for bn in batch_norms(averaged):  # statistics from other (the live) weights, as training leaves them
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2)
    x, labels = images(), (torch.arange(40) % classes if classes else None)
    weights = {k: v.clone() for k, v in averaged.named_parameters()}
    before = [bn.running_mean.clone() for bn in batch_norms(averaged)]
    reference = copy.deepcopy(averaged)
    expected = direct_statistics(reference, x, labels, batches=4, batch_size=8, seed=3, rates=(0.999, 0.01))

    assert recompute_bn_stats(averaged, MEAN, STD, x, labels, batches=4, batch_size=8, seed=3) == 4
    assert not averaged.training
    for k, v in averaged.named_parameters():
        assert torch.equal(v, weights[k]), k
    for bn, ref, old in zip(batch_norms(averaged), batch_norms(reference), before, strict=True):
        mean, var = expected[ref]
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.1 and bn.num_batches_tracked == 4
        assert (bn.running_mean - old).abs().max() > 1e-2


def test_the_command_writes_a_new_checkpoint_and_keeps_the_source(tmp_path):
    tiny_checkpoint(tmp_path / "m.pt")
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, img in enumerate(images(24)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    before = (tmp_path / "m.pt").read_bytes()
    args = [
        "--image-dir",
        str(folder),
        "--batches",
        "2",
        "--batch-size",
        "8",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main([str(tmp_path / "m.pt"), str(tmp_path / "bn.pt"), *args]) == 0
    assert (tmp_path / "m.pt").read_bytes() == before
    old, new = read_checkpoint(tmp_path / "m.pt"), read_checkpoint(tmp_path / "bn.pt")
    assert new["config"] == old["config"] and new["norm"] == old["norm"] and "train" not in new
    changed = [k for k in old["ema"] if not torch.equal(old["ema"][k], new["ema"][k])]
    assert changed and all("running" in k or "num_batches" in k for k in changed)
    model, _ = load_model(tmp_path / "bn.pt")
    assert not model.training
    assert main([str(tmp_path / "m.pt"), str(tmp_path / "m.pt"), *args]) == 2  # never over its source


def test_bad_values_are_one_line(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "m.pt")
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "a.png")
    dst = str(tmp_path / "bn.pt")
    assert main([str(tmp_path / "m.pt"), dst, "--image-dir", str(folder)]) == 2
    assert "1 images are fewer than one batch of 64" in capsys.readouterr().err
    assert main([str(tmp_path / "m.pt"), dst, "--image-dir", str(folder), "--batches", "0"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert not (tmp_path / "bn.pt").exists()


def test_only_full_batches_count():
    torch.manual_seed(0)
    net = build_unet(TINY)
    assert recompute_bn_stats(net, MEAN, STD, images(20), batches=50, batch_size=8) == 2  # 20 // 8
    assert batch_norms(net)[0].num_batches_tracked == 2


def test_a_model_of_other_classes_is_refused_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = dict(TINY, num_classes=2, classes=["a", "b"])
    atomic_save(make_checkpoint(cfg, MEAN, STD, build_unet(cfg).state_dict()), tmp_path / "c.pt")
    for name in ["a", "b", "c", "d"]:
        (tmp_path / "pictures" / name).mkdir(parents=True)
        for i, img in enumerate(images(4)):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "pictures" / name / f"{i}.png")
    argv = [str(tmp_path / "c.pt"), str(tmp_path / "bn.pt"), "--image-dir", str(tmp_path / "pictures")]
    assert main([*argv, "--batch-size", "4", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "the classes of" in capsys.readouterr().err and not (tmp_path / "bn.pt").exists()
