import os
import pickle

import pytest
import torch

from conftest import ROOT, TINY
from lib.checkpoint import load_model, make_checkpoint, read_checkpoint
from lib.cli import UserError
from lib.diffusion import signal_rates_of
from lib.files import atomic_save
from lib.normalization import FLOWERS_MEAN, FLOWERS_STD, model_stats
from lib.sample import generate, initial_noise
from lib.unet import ResidualBlock, build_unet, model_config


def tiny_checkpoint(path, train_state=None):
    torch.manual_seed(0)
    model = build_unet(TINY)
    atomic_save(make_checkpoint(TINY, [0.5] * 3, [0.25] * 3, model.state_dict(), train_state), path)
    return model


def original_layout(model, n_averaged=123):
    """A state dict as the original repo saves it: torch.save(AveragedModel(unet).state_dict()),
    with a (never used) 1x1 adaptation conv in every residual block."""
    sd = {"n_averaged": torch.tensor(n_averaged)}
    for name, module in model.named_modules():
        if isinstance(module, ResidualBlock) and module.channel_adaptation is None:
            w = module.block[0].num_features
            sd[f"module.{name}.channel_adaptation.weight"] = torch.randn(w, w, 1, 1)
            sd[f"module.{name}.channel_adaptation.bias"] = torch.randn(w)
    sd.update({f"module.{k}": v for k, v in model.state_dict().items()})
    return sd


def test_round_trip(tmp_path):
    model = tiny_checkpoint(tmp_path / "m.pt", train_state={"epoch": 3})
    loaded, ckpt = load_model(tmp_path / "m.pt")
    assert ckpt["config"] == TINY and ckpt["norm"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert ckpt["format"] == "flowers-ddim/1"  # the original's network: readable by older code
    # a network option: /3, which the readers of /1 and /2 (that would build LeakyReLU) refuse
    assert make_checkpoint(dict(TINY, activation="silu"), *[[0.5] * 3] * 2, {})["format"] == "flowers-ddim/3"
    assert ckpt["train"] == {"epoch": 3}
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not loaded.training  # ready to sample


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    tiny_checkpoint(path)
    before = path.read_bytes()
    with pytest.raises((AttributeError, pickle.PicklingError)):
        atomic_save({"format": "x", "bad": lambda: 0}, path)  # cannot be pickled
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "flowers-ddim/1", "ema": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing to load"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a checkpoint of this repo"):
        read_checkpoint(tmp_path / "other.pt")
    torch.save({"format": "flowers-ddim/1", "config": TINY}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"incomplete checkpoint \(no norm, ema"):
        read_checkpoint(tmp_path / "partial.pt")
    # what a newer version writes is refused by name, never built as some other network
    torch.save({"format": "flowers-ddim/9"}, tmp_path / "newer.pt")
    with pytest.raises(UserError, match="format flowers-ddim/9, newer than this version reads"):
        read_checkpoint(tmp_path / "newer.pt")
    newer = dict(make_checkpoint(TINY, [0.5] * 3, [0.25] * 3, build_unet(TINY).state_dict()))
    newer["config"] = dict(TINY, norm_layer="group")
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(UserError, match=r"config keys this version does not know \(norm_layer\)"):
        load_model(tmp_path / "newer.pt")


def test_weights_that_do_not_fit_the_config(tmp_path):
    model = build_unet(TINY)
    wrong = dict(TINY, widths=[16, 32, 48])
    atomic_save(make_checkpoint(wrong, [0.5] * 3, [0.25] * 3, model.state_dict()), tmp_path / "m.pt")
    with pytest.raises(UserError, match=r"do not fit the network.*wrong shape"):
        load_model(tmp_path / "m.pt")
    sd = model.state_dict()
    sd.pop("out_conv.bias")
    atomic_save(make_checkpoint(TINY, [0.5] * 3, [0.25] * 3, sd), tmp_path / "m2.pt")
    with pytest.raises(UserError, match=r"missing: out_conv\.bias"):
        load_model(tmp_path / "m2.pt")


def test_original_layout_matches_the_published_key_list():
    expected = {}
    for line in (ROOT / "tests" / "original_checkpoint_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, dtype, shape = line.split("\t")
            expected[name] = (dtype, shape.replace(" ", "").rstrip(",)").lstrip("(") or "")
    sd = original_layout(build_unet(model_config("sd128")))
    got = {k: (str(v.dtype).removeprefix("torch."), ",".join(map(str, v.shape))) for k, v in sd.items()}
    assert got == expected


@pytest.mark.parametrize("preset", ["sd128", "flowers64"])
def test_original_checkpoints_load_and_paint_the_same_images(tmp_path, preset):
    torch.manual_seed(0)
    cfg = model_config(preset)
    model = build_unet(cfg).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
    torch.save(original_layout(model), tmp_path / "model.pt")
    loaded, ckpt = load_model(tmp_path / "model.pt", image_size=32 if preset == "sd128" else None)
    assert ckpt["config"]["widths"] == cfg["widths"]
    assert ckpt["config"]["embedding_dim"] == cfg["embedding_dim"]
    assert ckpt["config"]["block_depth"] == cfg["block_depth"]
    assert ckpt["norm"] == {"mean": list(FLOWERS_MEAN), "std": list(FLOWERS_STD)}
    size = ckpt["config"]["image_size"]
    assert size == (32 if preset == "sd128" else 128)  # the original always used 128; --image-size overrides
    noise = initial_noise(2, 32, seed=1)
    a = generate(loaded, noise, FLOWERS_MEAN, FLOWERS_STD, steps=3)
    b = generate(model, noise, FLOWERS_MEAN, FLOWERS_STD, steps=3)
    torch.testing.assert_close(a, b)


def test_the_input_scale_in_its_own_key_paints_as_the_scale_folded_into_std(tmp_path):
    """The shipped 128 px model keeps input_scale 0.5 in its config and the data's statistics in
    norm; the same weights written the earlier way (std / 0.5 in norm, no key, as the file was
    shipped before) paint the very same images, as exported files of that time still do."""
    path = ROOT / "models" / "flowers128-v2-cond.pt"
    now, ckpt = load_model(path)
    assert ckpt["config"]["input_scale"] == 0.5
    data = read_checkpoint(ROOT / "models" / "flowers64-v2-cond.pt")["norm"]
    assert ckpt["norm"] == data  # the data's own statistics, those of the model it was tuned from
    earlier = dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "input_scale"})
    earlier["norm"] = dict(data, std=[s / 0.5 for s in data["std"]])
    torch.save(earlier, tmp_path / "earlier.pt")
    before, old = load_model(tmp_path / "earlier.pt")
    assert model_stats(old) == model_stats(ckpt)  # bit for bit: dividing by 0.5 is exact
    noise = initial_noise(1, 32, seed=0)
    labels, guided = torch.tensor([3]), dict(guidance=2.0)
    a = generate(now, noise, *model_stats(ckpt), steps=2, labels=labels, **guided)
    b = generate(before, noise, *model_stats(old), steps=2, labels=labels, **guided)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_export_keeps_what_inference_needs(tmp_path, name):
    model = tiny_checkpoint(tmp_path / "last.pt", train_state={"epoch": 3, "big": torch.zeros(1000)})
    from lib.checkpoint import export_weights

    export_weights(tmp_path / "last.pt", tmp_path / name)
    ckpt = read_checkpoint(tmp_path / name)
    assert "train" not in ckpt and ckpt["config"] == TINY and ckpt["format"] == "flowers-ddim/1"
    assert ckpt["norm"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    loaded, _ = load_model(tmp_path / name)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_safetensors_export_is_plain_safetensors_with_the_config_in_its_metadata(tmp_path):
    """No pickle anywhere: any safetensors reader gets the tensors, and the metadata says what they are."""
    import json

    import safetensors

    from lib.checkpoint import export_weights

    classes = ["pink primrose", "hard-leaved pocket orchid"]
    cond = dict(TINY, num_classes=2, classes=classes, prediction="v", adaptive_norm=True, attention=True)
    torch.manual_seed(0)
    model = build_unet(cond)
    with torch.no_grad():  # the zero-initialized modulations and attention output
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    atomic_save(make_checkpoint(cond, [0.5] * 3, [0.25] * 3, model.state_dict()), tmp_path / "c.pt")
    export_weights(tmp_path / "c.pt", tmp_path / "c.safetensors")
    with safetensors.safe_open(tmp_path / "c.safetensors", "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == set(model.state_dict())
    assert meta["format"] == "flowers-ddim/3" and json.loads(meta["config"]) == cond
    a, _ = load_model(tmp_path / "c.pt")
    b, ckpt = load_model(tmp_path / "c.safetensors")
    assert ckpt["config"]["classes"] == classes
    x, noise_var, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(
            a(x, noise_var, y), b(x, noise_var, y)
        )  # the same noise predictor, v turned into eps alike


def test_broken_safetensors_files_give_one_line_errors(tmp_path):
    from lib.checkpoint import export_weights

    tiny_checkpoint(tmp_path / "last.pt")
    export_weights(tmp_path / "last.pt", tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "torn.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "torn.safetensors")
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(UserError, match="not a checkpoint of this repo"):
        read_checkpoint(tmp_path / "foreign.safetensors")


def test_export_cli_never_drops_a_training_state(tmp_path, capsys):
    from lib.checkpoint import main

    tiny_checkpoint(tmp_path / "last.pt", train_state={"epoch": 3})
    assert main([str(tmp_path / "last.pt"), str(tmp_path / "." / "last.pt")]) == 2
    assert "is the source: write to another file" in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "last.pt")["train"] == {"epoch": 3}
    (tmp_path / "file").write_text("a file, not a folder")
    assert main([str(tmp_path / "last.pt"), str(tmp_path / "file" / "m.pt")]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main([str(tmp_path / "last.pt"), str(tmp_path / "m.pt")]) == 0
    assert "train" not in read_checkpoint(tmp_path / "m.pt")
    assert main([str(tmp_path / "last.pt"), str(tmp_path / "m.pt")]) == 0  # an exported model is replaced
    # ... but never another run's training state, nor a file that is not a checkpoint
    tiny_checkpoint(tmp_path / "other.pt", train_state={"epoch": 9})
    (tmp_path / "notes.md").write_text("mine")
    assert main([str(tmp_path / "last.pt"), str(tmp_path / "other.pt")]) == 2
    assert "holds a training state" in capsys.readouterr().err
    assert main([str(tmp_path / "last.pt"), str(tmp_path / "notes.md")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "other.pt")["train"] == {"epoch": 9}
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_shipped_models_hold_no_training_state():
    """models/ ships what painting needs: a training state (optimizer, EMA and RNG states: three
    to four times the weights) would stay in every clone's history for good."""
    shipped = sorted((ROOT / "models").glob("*.pt"))
    assert shipped
    for path in shipped:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert set(ckpt) == {"format", "config", "norm", "ema"}, path.name
        assert path.stat().st_size < 16e6, path.name


def test_the_schedule_ends_round_trip_and_old_files_keep_the_originals(tmp_path):
    cfg = dict(TINY, signal_rates=[0.999, 0.01])
    torch.manual_seed(0)
    net = build_unet(cfg)
    atomic_save(make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, net.state_dict()), tmp_path / "m.pt")
    assert read_checkpoint(tmp_path / "m.pt")["format"] == "flowers-ddim/3"  # older readers refuse it
    model, ckpt = load_model(tmp_path / "m.pt")
    assert signal_rates_of(model) == (0.999, 0.01) and ckpt["config"]["signal_rates"] == [0.999, 0.01]
    for shipped in sorted((ROOT / "models").glob("*.pt")):
        model, ckpt = load_model(shipped)
        assert "signal_rates" not in ckpt["config"] and signal_rates_of(model) == (0.95, 0.02)
    bad = dict(TINY, signal_rates=[0.02, 0.95])
    atomic_save(make_checkpoint(bad, [0.5] * 3, [0.25] * 3, net.state_dict()), tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"unusable config .*signal rates must satisfy"):
        load_model(tmp_path / "bad.pt")
