"""Models side by side from the same seeds, one row each.

    python docs/make_comparison.py models/flowers64-original-recipe.pt models/flowers64-v2-cond.pt \
        --out comparison.png

Each row is what `python sd_inference.py --checkpoint MODEL` paints (a class-conditional model:
the classes that command draws from the seed, at the default guidance). Models of one image size
start from the same noise, so the rows differ by the model only.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

import sd_inference
from lib.checkpoint import load_model
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.runtime import add_device_args, setup


def paint_row(checkpoint, args, device, precision):
    """What `sd_inference.py --checkpoint C --seed S --num-images N` paints -> ((N, 3, S, S)
    images in [0, 1], their class names or None)."""
    model, ckpt = load_model(checkpoint, device)
    model = model.to(memory_format=torch.channels_last)  # as sd_inference runs it
    flags = ["--checkpoint", str(checkpoint), "--seed", str(args.seed), "--num-images", str(args.num_images)]
    flags += ["--steps", str(args.steps)]
    inference_args = sd_inference.get_parser().parse_args(flags)
    sd_inference.check_args(inference_args)
    sd_inference.settle(model, inference_args)
    images, _, fig_args = sd_inference.paint(model, ckpt, inference_args, precision)
    return images, fig_args.get("labels")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", help="one row each, top to bottom")
    p.add_argument(
        "--titles", nargs="+", default=None, help="a row title per checkpoint (default: file names)"
    )
    p.add_argument("--num-images", type=int, default=6, help="columns")
    p.add_argument("--seed", type=int, default=0, help="of the noise (and the drawn classes)")
    p.add_argument("--steps", type=int, default=20, help="network evaluations (DDIM, sd_inference's default)")
    p.add_argument("--out", default="docs/comparison.png")
    add_device_args(p, "as sd_inference.py's")
    return run_cli(run, p.parse_args(argv))


def run(args):
    check_at_least(args, num_images=1, steps=1)
    titles = args.titles or [Path(c).stem for c in args.checkpoints]
    if len(titles) != len(args.checkpoints):
        raise UserError(f"--titles: {len(titles)} titles for {len(args.checkpoints)} checkpoints")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise UserError(f"--out {out}: name a .png, .jpg, .pdf or .svg file")
    device, precision = setup(args.device, args.precision)
    rows = [paint_row(c, args, device, precision) for c in args.checkpoints]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = args.num_images
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n + 1.2, 1.85 * len(rows)), squeeze=False)
    for r, ((images, classes), title) in enumerate(zip(rows, titles, strict=True)):
        for c, (ax, image) in enumerate(zip(axes[r], images, strict=True)):
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if classes:
                ax.set_xlabel(classes[c], fontsize=7)  # under its own picture
        axes[r][0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


if __name__ == "__main__":
    sys.exit(main())
