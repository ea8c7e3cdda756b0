"""One self-describing checkpoint file, read safely and written atomically.

Layout (a plain dict, so `torch.load(weights_only=True)` reads it and a crafted file cannot run code):
    format  "flowers-ddim/1"; "/2" for a v-predicting or class-conditional network, "/3" for one
            with network options, an input scale, other schedule ends or a student's settings
            (see checkpoint_format)
    config  {"image_size", "widths", "embedding_dim", "block_depth"}: rebuilds the network;
            "prediction": "v" where the network predicts v (absent: the noise, eps);
            "num_classes" and "classes" for a class-conditional network; lib/unet.py's
            NETWORK_OPTIONS where the network departs from the original's; "input_scale": b where
            sd_train.py --input-scale b multiplied the normalized images; "signal_rates" where
            the schedule's ends are not the original's; "distilled" for a few-step student
            (sd_distill.py: its steps, its teacher's and the guidance it learned)
    norm    {"mean": [3 floats], "std": [3 floats]}: the data's per-channel statistics, which the
            model's space is made from (lib.normalization.model_stats: (x - mean) / std * b).
            Files written before "input_scale" existed hold std / b here
    ema     state dict of the EMA weights (what is sampled)
    train   (best.pt / last.pt only) everything sd_train.py --resume needs; in a student's file
            until its last step, what sd_distill.py --resume needs ("distill")

The original repo's files (a bare state dict of its EMA wrapper: "module.*" keys and "n_averaged")
are read by the same loader and converted on the fly. Exported weights may also be safetensors
(no pickle at all): the EMA tensors, with format, config and norm as JSON strings in its metadata.
"""

import json
import math
import pickle
import re
import sys
from pathlib import Path

import safetensors.torch
import torch

from lib.cli import ArgumentParser, UserError, run_cli
from lib.diffusion import PREDICTIONS, as_noise_predictor
from lib.files import atomic_save, atomic_write
from lib.normalization import FLOWERS_MEAN, FLOWERS_STD
from lib.unet import CONFIG_KEYS, NETWORK_OPTIONS, build_unet, check_image_size

FORMAT = "flowers-ddim/1"
# Each later format is written where the config holds what the readers of the earlier ones would
# ignore, so that those refuse the file instead of sampling it wrongly: /2 a v-predicting or
# class-conditional network, /3 network options (lib/unet.py's NETWORK_OPTIONS), an input scale or
# the schedule's ends (signal_rates) or a student's settings (distilled; readers of /3 refuse config
# keys they do not know).
FORMAT_2 = "flowers-ddim/2"
FORMAT_3 = "flowers-ddim/3"
FORMATS = (FORMAT, FORMAT_2, FORMAT_3)
ORIGINAL_IMAGE_SIZE = 128  # the original trained and sampled at 128 px only; its files do not say


def checkpoint_format(config):
    """The oldest format whose readers build this config's network correctly."""
    if any(k in config for k in (*NETWORK_OPTIONS, "input_scale", "signal_rates", "distilled")):
        return FORMAT_3
    return FORMAT_2 if config.get("prediction", "eps") != "eps" or config.get("num_classes") else FORMAT


def make_checkpoint(config, mean, std, ema_state, train_state=None):
    ckpt = {
        "format": checkpoint_format(config),
        "config": dict(config),
        "norm": {"mean": list(mean), "std": list(std)},
        "ema": ema_state,
    }
    if train_state is not None:
        ckpt["train"] = train_state
    return ckpt


def _is_original(obj):
    return isinstance(obj, dict) and "n_averaged" in obj and any(str(k).startswith("module.") for k in obj)


def _from_original(state, image_size):
    """The original's EMA-wrapper state dict -> our layout. Widths, embedding size and depth
    follow from the tensor shapes; the dead 1x1 adaptation convs are dropped in load_model."""
    sd = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
    try:
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k))})
        widths = [sd[f"down_blocks.{i}.residual_blocks.0.block.0.weight"].shape[0] for i in levels]
        widths.append(sd["bottleneck.0.block.0.weight"].shape[0])
        in_width = sd["in_conv.weight"].shape[0]
        embedding_dim = sd["down_blocks.0.residual_blocks.0.channel_adaptation.weight"].shape[1] - in_width
        block_depth = len({k.split(".")[3] for k in sd if k.startswith("down_blocks.0.residual_blocks.")})
    except (KeyError, IndexError, AttributeError) as e:
        raise UserError(f"looks like the original repo's checkpoint but lacks {e}") from None
    config = {
        "image_size": image_size or ORIGINAL_IMAGE_SIZE,
        "widths": widths,
        "embedding_dim": embedding_dim,
        "block_depth": block_depth,
    }
    return make_checkpoint(config, FLOWERS_MEAN, FLOWERS_STD, sd)


def read_checkpoint(path, image_size=None):
    """Load a checkpoint of ours or of the original repo -> our layout (a dict, tensors on CPU).

    image_size overrides the stored image size (the original's files store none).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = (
            _read_safetensors(path)
            if _is_safetensors(path)
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except pickle.UnpicklingError as e:
        # weights_only names the class or function a pickle wanted to build; anything else is
        # a file that is not a pickle at all.
        if "unsupported global" not in str(e).lower():
            raise UserError(f"{path} is not a readable checkpoint (not a file torch.save wrote)") from None
        raise UserError(
            f"{path} holds objects other than tensors and plain values; refusing to load it "
            "(weights_only=True: a checkpoint must not be able to run code)"
        ) from None
    except Exception as e:
        raise UserError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if _is_original(obj):
        return _from_original(obj, image_size)
    if not (isinstance(obj, dict) and obj.get("format") in FORMATS):
        if isinstance(obj, dict) and str(obj.get("format")).startswith("flowers-ddim/"):
            raise UserError(
                f"{path} is format {obj['format']}, newer than this version reads: update the repo"
            )
        raise UserError(f"{path} is not a checkpoint of this repo (format {FORMAT}) nor of the original repo")
    missing = [k for k in ("config", "norm", "ema") if not isinstance(obj.get(k), dict)]
    if missing:
        raise UserError(f"{path} is an incomplete checkpoint (no {', '.join(missing)})")
    if image_size is not None:
        obj["config"]["image_size"] = image_size
    _unfold_input_scale(obj)
    return obj


def _unfold_input_scale(ckpt):
    """A training state written before "input_scale" had its own key kept --input-scale b folded
    into norm's std (std / b); its saved flags name b. Move it to the config: the same model
    space, and norm describes the data again. (Exported weights of that time name no b and stay
    as they are: they paint the same either way.)"""
    scale = ckpt.get("train", {}).get("args", {}).get("input_scale")
    if scale not in (None, 1.0) and "input_scale" not in ckpt["config"]:
        ckpt["config"]["input_scale"] = scale
        ckpt["norm"]["std"] = [s * scale for s in ckpt["norm"]["std"]]


def _is_safetensors(path):
    """A safetensors file opens with its header's length (8 bytes) and the header's JSON; the
    files torch.save writes are zip archives ("PK...")."""
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _read_safetensors(path):
    """-> the checkpoint dict that export_weights stored in a safetensors file."""
    with safetensors.safe_open(path, "pt") as f:
        meta, ema = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    parts = {k: json.loads(meta[k]) for k in ("config", "norm") if k in meta}
    return {"format": meta.get("format"), **parts, "ema": ema}


def _write_safetensors(ckpt, dst):
    meta = {"format": ckpt["format"], "config": json.dumps(ckpt["config"]), "norm": json.dumps(ckpt["norm"])}
    tensors = {k: v.contiguous() for k, v in ckpt["ema"].items()}
    atomic_write(dst, lambda f: f.write(safetensors.torch.save(tensors, metadata=meta)))


def load_weights(model, state, path):
    """load_state_dict with a one-line error when the weights do not fit the network."""
    # The original allocates 1x1 adaptation convs in blocks whose widths match and never runs them.
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or "channel_adaptation" not in k}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        detail = "; ".join(
            f"{name}: {keys[0]}{f' and {len(keys) - 1} more' if len(keys) > 1 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
            if keys
        )
        raise UserError(
            f"the weights in {path} do not fit the network its config describes ({detail or e})"
        ) from None


def load_model(path, device="cpu", image_size=None):
    """-> (network with the EMA weights, in eval mode on `device`, as a noise predictor; the
    checkpoint dict)."""
    ckpt = read_checkpoint(path, image_size)
    cfg = ckpt["config"]
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise UserError(
            f"{path} has config keys this version does not know ({', '.join(unknown)}): update the repo"
        )
    try:
        model = build_unet(cfg)
        check_image_size(cfg.get("image_size"), len(cfg["widths"]) - 1)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ValueError) and image_size is not None:  # the user's override does not fit
            raise UserError(f"--image-size: {e}") from None
        raise UserError(f"{path} has an unusable config {cfg} ({e})") from None
    load_weights(model, ckpt["ema"], path)
    scale = cfg.get("input_scale", 1.0)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise UserError(f"{path} has an unusable input_scale {scale!r} (a finite number > 0)")
    if len(cfg.get("classes", [])) != cfg.get("num_classes", 0):
        raise UserError(f"{path} names {len(cfg.get('classes', []))} classes for {cfg.get('num_classes', 0)}")
    prediction = cfg.get("prediction", "eps")
    if prediction not in PREDICTIONS:
        raise UserError(f"{path} has an unknown prediction {prediction!r} (known: {', '.join(PREDICTIONS)})")
    return as_noise_predictor(model, prediction).to(device).eval(), ckpt


def replaceable(src, dst):
    """Refuse (UserError) to write a model derived from src over src itself, over a file that is
    not a checkpoint, or over a training state: the user's work is never lost."""
    if Path(dst).exists():
        if Path(dst).samefile(src):
            raise UserError(
                f"{dst} is the source: write to another file (this one, and any training state in it, stays)"
            )
        try:
            there = read_checkpoint(dst)
        except UserError:
            raise UserError(
                f"{dst} exists and is not a checkpoint: not replaced (choose another name)"
            ) from None
        if "train" in there:  # replacing an exported model (models/x.pt) is the normal case
            raise UserError(f"{dst} holds a training state (resumable): not replaced (choose another name)")


def export_weights(src, dst):
    """Write the inference part of a checkpoint (config, normalization, EMA weights): a few MB
    instead of the tens that the training state adds. Original-format files come out in ours;
    a dst named *.safetensors is written as safetensors."""
    replaceable(src, dst)
    ckpt = read_checkpoint(src)
    load_model(src)  # refuse to export weights that do not fit their config
    weights = make_checkpoint(ckpt["config"], ckpt["norm"]["mean"], ckpt["norm"]["std"], ckpt["ema"])
    if Path(dst).suffix.lower() == ".safetensors":
        _write_safetensors(weights, dst)
    else:
        atomic_save(weights, dst)


def main(argv=None):
    p = ArgumentParser(
        description="Export a checkpoint's EMA weights for inference: "
        "python -m lib.checkpoint runs/x/best.pt models/x.pt (or models/x.safetensors)"
    )
    p.add_argument("src")
    p.add_argument("dst")

    def run(args):
        export_weights(args.src, args.dst)
        print(f"wrote {args.dst} ({Path(args.dst).stat().st_size / 1e6:.1f} MB)")

    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
