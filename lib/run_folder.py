"""A training run's folder (--out-dir): never another run's checkpoints overwritten, one run
writing at a time, and the log and curves that sd_train.py keeps there."""

import csv
import os
from pathlib import Path

from lib.checkpoint import read_checkpoint
from lib.cli import UserError

CSV_FIELDS = ["epoch", "loss", "lr", "seconds", "images_per_s", "kid", "kid_err"]


def check_out_dir(args, resumed):
    """Refuse, before any heavy work, to write where it would destroy another run's checkpoints
    (a new run in a used folder, or an older state resumed over a newer last.pt)."""
    out_dir = Path(args.out_dir)
    if args.image_dir and out_dir.resolve().is_relative_to(Path(args.image_dir).resolve()):
        raise UserError(
            f"--out-dir {out_dir} is inside --image-dir {args.image_dir}: the run's sample grids would "
            "become training images; choose an --out-dir outside it"
        )
    last = out_dir / "last.pt"
    if not args.overwrite and last.is_file():
        if resumed is None:
            raise UserError(
                f"{out_dir} holds a run already (last.pt): continue it with --resume {last}, "
                "choose another --out-dir, or pass --overwrite"
            )
        if not last.samefile(args.resume):
            there = read_checkpoint(last).get("train", {})
            if there.get("run_id") != resumed["train"].get("run_id"):
                raise UserError(
                    f"{last} belongs to another run and would be replaced: choose another --out-dir, "
                    "or pass --overwrite"
                )
            newer = there.get("global_step", 0)
            if newer > resumed["train"]["global_step"]:
                raise UserError(
                    f"{last} is further along (step {newer}) than {args.resume} (step "
                    f"{resumed['train']['global_step']}) and would be replaced: choose another "
                    "--out-dir, or pass --overwrite"
                )
    # Made only once the data has loaded (a failed start leaves no empty folder); checked now.
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise UserError(f"cannot write --out-dir {out_dir} ({existing} is not a writable folder)")
    return out_dir


def lock_run_folder(folder):
    """Hold an advisory lock on a training run's folder for as long as the returned file is open
    (the life of the run), so that a second run into the same folder, from another terminal or a
    --resume of a run still going, is refused instead of interleaving its checkpoints with the
    first's. The OS drops the lock when the process ends, however it ends: no stale locks. -> the
    open lock file, or None where there is no flock (Windows) or the file system refuses it."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        f = open(Path(folder) / ".lock", "a+")
    except OSError:  # a folder this process cannot write: the caller's checks say so
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(
            f"another training run (process {holder}) is writing to {folder}: let it finish, stop it, "
            "or choose another --out-dir"
        ) from None
    except OSError:  # e.g. a network file system without locks: train unguarded rather than not at all
        f.close()
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def read_log(out_dir):
    """The rows of a run's training_log.csv (dicts of strings; empty ones for no value), or []."""
    path = Path(out_dir) / "training_log.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_log(out_dir, rows, probe):
    """Rewrite the CSV log, the loss curve and (once there is one) the KID curve; probe says how
    the KID's samples were drawn ("5-evaluation ddim")."""
    with open(out_dir / "training_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (
        ("loss", "training loss (epoch mean)", "loss_curve.png"),
        ("kid", f"KID [efficientnet-lite0], {probe} samples", "kid_curve.png"),
    ):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*points, strict=True), marker="o" if key == "kid" else None)
        ax.set(xlabel="epoch", ylabel=label, title=f"Training {key.upper() if key == 'kid' else key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
