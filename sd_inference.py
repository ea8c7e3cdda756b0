"""Paint flowers with a trained model: a 2x4 figure of eight samples, saved and (with a display) shown.

    python sd_inference.py                                   # the shipped model (DEFAULT_CHECKPOINT)
    python sd_inference.py --checkpoint output_sd/best.pt --num-images 16 --seed 3 --save-dir samples/
    python sd_inference.py --init-image docs/drawing.png --strength 0.6    # sketch to image (SDEdit)
    python sd_inference.py --interpolate                     # from one noise to another, 8 frames

Reads this repo's checkpoints (.pt, or .safetensors from `python -m lib.checkpoint`) and the original
repo's model.pt / best.pt / last.pt alike.
"""

import math
import os
import sys
from pathlib import Path

import matplotlib
import torch
from torchvision.utils import save_image

from lib.checkpoint import load_model
from lib.classes import GUIDANCE, drawn_classes, parse_classes, spread
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import load_image
from lib.distill import sampling_settings
from lib.normalization import model_stats
from lib.runtime import add_device_args, setup
from lib.sample import generate, initial_noise, interpolation_noise, sketch_per_seed
from lib.samplers import add_sampler_args, check_sampler_args

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "models" / "flowers128-v2-cond.pt"
MAX_PANELS = 32  # a screenful: a figure of more pictures is too large to open or read
NON_INTERACTIVE = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def get_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a .pt or .safetensors checkpoint of this repo, or one of the original's "
        f"(default: models/{DEFAULT_CHECKPOINT.name})",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="default 8 (--init-image: 1 result, each more from other noise; --interpolate: 8 frames)",
    )
    add_sampler_args(p)
    p.add_argument("--seed", type=int, default=0, help="same seed, same images")
    p.add_argument("--image-size", type=int, default=None, help="override the checkpoint's image size")
    add_device_args(p, "fp32 reproduces the original exactly")
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once")
    p.add_argument("--out", default="generated.png", help="where the figure is saved")
    p.add_argument("--save-dir", default=None, help="also save each image as its own PNG here")
    p.add_argument("--no-show", action="store_true", help="never open a window")
    p.add_argument(
        "--init-image", default=None, help="sketch to image: start from this picture, noised to --strength"
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.6,
        help="with --init-image, in (0, 1]: near 0 keeps the picture, 1 nearly ignores it",
    )
    p.add_argument(
        "--interpolate", action="store_true", help="a strip from the noise of --seed to that of --seed + 1"
    )
    cond = p.add_argument_group("class-conditional models (sd_train.py --class-cond)")
    cond.add_argument(
        "--class",
        dest="class_spec",
        default=None,
        help="a class name (any case) or 0-based index; several, comma-separated, take turns over the "
        "figure. Without it a conditional model paints a class per image drawn from --seed (one "
        "for --interpolate), named in the titles",
    )
    cond.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale; 1 the plain conditional model, higher follows the "
        f"class more closely, 0 ignores it: flowers of no particular class (default {GUIDANCE})",
    )
    cond.add_argument("--list-classes", action="store_true", help="print the model's classes and exit")
    return p


def figure(images, title="Generated Images", cols=None, labels=None):
    """(N, 3, H, W) in [0, 1] -> a matplotlib figure, `cols` images a row (default: a grid about
    as wide as tall, at least 4 wide: 2x4 for eight, as the original), optional captions under
    each panel."""
    import matplotlib.pyplot as plt

    n = images.shape[0]
    cols = min(n, cols or max(4, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    # constrained layout keeps room for the title at any number of rows (tight_layout does not)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.5 * cols, 2.5 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    # The last row may have room to spare: fewer images than axes.
    for i, (ax, img) in enumerate(zip(axes.flat, images, strict=False)):
        ax.imshow(img.permute(1, 2, 0).numpy())
        if labels:
            ax.set_title(labels[i % len(labels)], fontsize=9)
    fig.suptitle(title)
    return fig


def check_args(args):
    """One-line errors for flags that cannot work together; --num-images gets its default."""
    if args.init_image and args.interpolate:
        raise UserError("--init-image and --interpolate are two different pictures: choose one")
    if args.num_images is None:
        args.num_images = 1 if args.init_image else 8
    check_at_least(args, num_images=1, batch_size=1)
    check_sampler_args(args)
    if args.interpolate and args.num_images < 2:
        raise UserError("--interpolate needs --num-images >= 2")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    if args.interpolate and args.class_spec and "," in args.class_spec:
        raise UserError("--interpolate walks between two noises of one class: give one --class")
    if args.interpolate and args.eta != 0:  # fresh noise at every step would break the smooth path
        raise UserError("--interpolate needs a deterministic sampler: leave --eta at 0")
    if args.init_image and not 0.0 < args.strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {args.strength}")


def figure_path(out_arg):
    """--out -> the file matplotlib will really write (a folder gets generated.png inside it)."""
    from matplotlib.backend_bases import FigureCanvasBase

    out = Path(out_arg)
    if out_arg.endswith(("/", os.sep)) or out.is_dir():
        out = out / "generated.png"
    if not out.suffix:  # matplotlib would add .png itself; say the name it really writes
        out = out.with_suffix(".png")
    if out.suffix[1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(
            f"--out {out}: matplotlib cannot write {out.suffix} files (use .png, .jpg, .pdf or .svg)"
        )
    return out


def checkpoint_path(arg):
    """--checkpoint, or the shipped model (with a hint where it is missing)."""
    if arg is not None:
        return arg
    if not DEFAULT_CHECKPOINT.is_file():
        raise UserError(
            f"the shipped model {DEFAULT_CHECKPOINT} is not there yet; train one with "
            "`python sd_train.py --preset flowers64-v2 --recipe improved --class-cond "
            "--data-root <folder with flowers-102/>` "
            "and pass --checkpoint output_sd/best.pt (docs/models.md: how the 128 px "
            "one was made)"
        )
    return DEFAULT_CHECKPOINT


def sketch(model, ckpt, drawing, args, precision):
    """--init-image: one SDEdit result per seed -> (results, panels, figure options); each row of
    panels shows the drawing, its noised version and the result."""
    mean, std = model_stats(ckpt)
    labels, names = class_labels(args, ckpt)
    options = sampling_options(args, precision, labels)
    noisy, results = sketch_per_seed(
        model, drawing, mean, std, args.strength, args.steps, args.seed, args.num_images, **options
    )
    rows = zip(noisy.split(1), results.split(1), strict=True)
    panels = torch.cat([torch.cat([drawing.float() / 255, x_t, result]) for x_t, result in rows])
    labels = [
        caption
        for i in range(args.num_images)
        for caption in (
            "drawing",
            f"noised to t={args.strength}",
            f"result: {names[i]}" if names else "result",
        )
    ]
    fig_args = dict(title=f"Sketch to image (strength {args.strength})", cols=3, labels=labels)
    return results, panels, fig_args


def paint(model, ckpt, args, precision):
    """Samples from seeded noise, or an interpolation strip -> (images, panels, figure options)."""
    size = ckpt["config"]["image_size"]
    if args.interpolate:
        noise = interpolation_noise(size, args.seed, args.num_images)
        cols = args.num_images if args.num_images <= 8 else None  # one strip, or a grid read row by row
        fig_args = dict(title=f"Interpolation: seed {args.seed} to {args.seed + 1}", cols=cols)
    else:
        noise, fig_args = initial_noise(args.num_images, size, args.seed), {}
    mean, std = model_stats(ckpt)
    labels, names = class_labels(args, ckpt)
    options = sampling_options(args, precision, labels)
    batch_size, steps = args.batch_size, args.steps
    images = generate(model, noise, mean, std, steps, seed=args.seed, batch_size=batch_size, **options)
    if names:
        fig_args["labels"] = names
    return images, images, fig_args


def class_labels(args, ckpt):
    """-> (labels (num_images,), each image's class name) of a conditional model: --class, or
    classes drawn from --seed; (None, None) for an unconditional one or --guidance 0 alone."""
    names = ckpt["config"].get("classes", [])
    if args.class_spec is not None:
        classes = parse_classes(args.class_spec, names)
    elif not names and args.guidance is not None:
        raise UserError(
            "--guidance needs a class-conditional model (trained with --class-cond); this one is not"
        )
    elif not names or args.guidance == 0:  # an unconditional model, or one asked for no class
        return None, None
    elif args.init_image:  # result i has its own seed's noise, --seed + i (sketch_per_seed), and class
        classes = [drawn_classes(len(names), 1, args.seed + i)[0] for i in range(args.num_images)]
    else:  # the seed's noise, and one class for a whole interpolation strip
        classes = drawn_classes(len(names), 1 if args.interpolate else args.num_images, args.seed)
    labels = spread(classes, args.num_images)
    return labels, [names[i] for i in labels.tolist()]


def settle(model, args):
    """What to sample at: the flags, or a student's own steps and strengths. args.guidance stays
    the flag as given (class_labels reads it); args.scale becomes the scale to guide by."""
    strength = args.strength if args.init_image else None
    args.steps, args.scale, strength = sampling_settings(
        model, args.sampler, args.steps, args.guidance, strength, args.eta
    )
    if strength is not None and strength != args.strength:
        print(f"a student starts at its own steps' times: --strength {args.strength} taken as {strength:g}")
        args.strength = strength


def sampling_options(args, precision, labels):
    """generate()'s keyword arguments from the flags, but for the steps (sketch_to_image scales them)."""
    return dict(eta=args.eta, precision=precision, sampler=args.sampler, labels=labels, guidance=args.scale)


def screenful(panels, n_images, args):
    """At most MAX_PANELS of the panels, saying so where some are left out: the first images, or
    frames spread evenly over an interpolation (both ends included)."""
    per_image = len(panels) // n_images  # sketch to image: drawing, noised drawing, result
    shown = min(n_images, MAX_PANELS // per_image)
    if shown == n_images:
        return panels
    rest = f"all {n_images} are in {args.save_dir}" if args.save_dir else "--save-dir DIR saves them all"
    if args.interpolate:
        print(f"the figure shows {shown} of the {n_images} frames, evenly spaced; {rest}")
        return panels[torch.linspace(0, n_images - 1, shown).round().long()]
    print(f"the figure shows the first {shown} of {n_images} images; {rest}")
    return panels[: shown * per_image]


def run(args):
    check_args(args)
    out = figure_path(args.out)
    checkpoint = checkpoint_path(args.checkpoint)
    device, precision = setup(args.device, args.precision)
    model, ckpt = load_model(checkpoint, device, args.image_size)
    model = model.to(memory_format=torch.channels_last)
    settle(model, args)
    if args.list_classes:
        names = ckpt["config"].get("classes") or []
        print("\n".join(f"{i:3d}  {name}" for i, name in enumerate(names)) or f"{checkpoint} has no classes")
        return
    size = ckpt["config"]["image_size"]
    drawing = load_image(args.init_image, size) if args.init_image else None
    # Folders before sampling, so an unwritable place fails before minutes of work; after the
    # inputs, so a mistyped checkpoint or picture leaves no empty folders behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.save_dir:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    if args.init_image:
        images, panels, fig_args = sketch(model, ckpt, drawing, args, precision)
    else:
        images, panels, fig_args = paint(model, ckpt, args, precision)
    if args.save_dir:
        for i, img in enumerate(images):
            save_image(img, Path(args.save_dir) / f"sample_{args.seed}_{i:04d}.png")
        print(f"saved {len(images)} image{'s' * (len(images) != 1)} of {size}x{size} to {args.save_dir}")
    # Headless machines get a file; a window only opens where matplotlib found a GUI backend.
    import matplotlib.pyplot as plt

    fig = figure(screenful(panels, len(images), args), **fig_args)
    fig.savefig(out, dpi=100)
    print(f"saved the figure to {out}")
    if not args.no_show and matplotlib.get_backend().lower() not in NON_INTERACTIVE:
        plt.show()
    plt.close(fig)


def main(argv=None):
    return run_cli(run, get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
