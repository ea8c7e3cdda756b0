"""Paint flowers with a trained model: a 2x4 figure of eight samples, saved and (with a display) shown.

    python sd_inference.py                                   # the shipped model, models/flowers64.pt
    python sd_inference.py --checkpoint output_sd/best.pt --num-images 16 --seed 3 --save-dir samples/

Reads this repo's checkpoints and the original repo's model.pt / best.pt / last.pt alike.
"""
import argparse
import math
import sys
from pathlib import Path

import matplotlib
import torch
from torchvision.utils import save_image

from lib import UserError
from lib.checkpoint import load_model
from lib.runtime import PRECISIONS, setup
from lib.sample import generate, initial_noise

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "flowers64.pt"
NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint of this repo or of the original (default: models/flowers64.pt)")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps")
    p.add_argument("--eta", type=float, default=0.0, help="0: deterministic DDIM (the original); 1: DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--image-size", type=int, default=None, help="override the checkpoint's image size")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fp32 reproduces the original exactly")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once")
    p.add_argument("--out", default="generated.png", help="where the figure is saved")
    p.add_argument("--save-dir", default=None, help="also save each image as its own PNG here")
    p.add_argument("--no-show", action="store_true", help="never open a window")
    return p


def figure(images, title="Generated Images"):
    """(N, 3, H, W) in [0, 1] -> a matplotlib figure, 4 images a row (2x4 for eight, as the original)."""
    import matplotlib.pyplot as plt
    n = images.shape[0]
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.5 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, images):
        ax.imshow(img.permute(1, 2, 0).numpy())
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def run(args):
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {args.eta}")
    if args.checkpoint is None:
        if not DEFAULT_CHECKPOINT.is_file():
            raise UserError(f"the shipped model {DEFAULT_CHECKPOINT} is not there yet; train one with "
                            "`python sd_train.py --preset flowers64 --data-root <folder with flowers-102/>` "
                            "and pass --checkpoint output_sd/best.pt")
        args.checkpoint = DEFAULT_CHECKPOINT
    device, precision = setup(args.device, args.precision)
    model, ckpt = load_model(args.checkpoint, device, args.image_size)
    model = model.to(memory_format=torch.channels_last)
    size = ckpt["config"]["image_size"]
    noise = initial_noise(args.num_images, size, args.seed)
    images = generate(model, noise, ckpt["norm"]["mean"], ckpt["norm"]["std"], steps=args.steps, eta=args.eta,
                      seed=args.seed, precision=precision, batch_size=args.batch_size)

    if args.save_dir:
        save_dir = Path(args.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            save_image(img, save_dir / f"sample_{args.seed}_{i:04d}.png")
        print(f"saved {len(images)} images of {size}x{size} to {save_dir}")
    # Headless machines get a file; a window only opens where matplotlib found a GUI backend.
    import matplotlib.pyplot as plt
    fig = figure(images)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"saved the figure to {out}")
    if not args.no_show and matplotlib.get_backend().lower() not in NON_INTERACTIVE:
        plt.show()
    plt.close(fig)


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
