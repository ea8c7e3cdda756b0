"""Lay the epoch grids of a training run side by side, in one row (docs/progress.png and its kin).

    python docs/make_progress.py runs/flowers64 --epochs 1 10 50 100 170 --out docs/progress.png

sd_train.py writes epoch_N.png (8 samples from the same fixed noise) at epoch 1, every
--sample-every epochs and at the end, so the panels differ only by how long the model trained.
"""

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.cli import ArgumentParser, UserError, run_cli


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="the --out-dir of a training run")
    p.add_argument("--epochs", type=int, nargs="+", required=True)
    p.add_argument("--out", default=None, help="default: progress.png in run_dir")
    return run_cli(run, p.parse_args(argv))


def run(args):
    out = Path(args.out or Path(args.run_dir) / "progress.png")
    out = out if out.suffix else out.with_suffix(".png")  # the name matplotlib really writes
    paths = [Path(args.run_dir) / f"epoch_{e}.png" for e in args.epochs]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"no such grid: {', '.join(missing)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(paths), figsize=(2.9 * len(paths), 1.9), squeeze=False)
    for ax, epoch, path in zip(axes[0], args.epochs, paths, strict=True):
        try:
            ax.imshow(Image.open(path).convert("RGB"))
        except Exception as e:  # any decoder failure: a truncated or foreign file
            raise UserError(f"cannot read {path} as an image ({type(e).__name__})") from None
        ax.set_title(f"epoch {epoch}", fontsize=11)
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=100)
    except ValueError as e:  # matplotlib: an unknown format
        raise UserError(f"--out {out}: {e}") from None
    print(f"saved {out}")


if __name__ == "__main__":
    sys.exit(main())
