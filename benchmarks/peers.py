"""Side by side with what users would pick instead: Hugging Face diffusers' unconditional training
example and lucidrains' denoising-diffusion-pytorch, trained on this machine for the same minutes
of training steps as this project's recipes, one after another, then scored alike.

    pip install -r requirements-peers.txt
    python benchmarks/peers.py --data-root data --minutes 20 --out-dir runs/peers

Every system trains on the same 8189 Flowers102 images at 64 px, decoded once (resized and
centre-cropped as both peers' own loaders do), with bf16 autocast where the CPU has it (else
fp32) and channels_last tensors, for --minutes of training steps: each times its first steps (as
sd_train.py --max-minutes does: a minute, or 5% of the budget) on a copy that is then thrown away,
and trains a fresh one for the steps that many minutes come to, so the LR schedules that need the
run's length (diffusers' cosine) get it. Then each paints --num-samples images with its own
20-step DDIM sampler (diffusers' DDIMPipeline; denoising-diffusion-pytorch's
GaussianDiffusion(sampling_timesteps=20); this project's sd_eval.py), and sd_eval.py scores them
all against the same real images (KID with the samples' ±, FID, the extractor named). A system
already scored in OUT_DIR is not run again; OUT_DIR/peers.md gets the table and --figure the same
seed's first samples of each, side by side.

The peers keep their defaults except where named (PEER_DEPARTURES): their networks are scaled
to CPU size (--diffusers-widths in the example's block layout, --ddpm-dim), and their training
loops are replaced by this one, which feeds the decoded images and stops at the budget.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peer_systems import PEER_DEPARTURES, PEERS, missing_packages
from benchmarks.time_to_quality import SCORE, sd_eval_output
from benchmarks.time_to_quality import train as train_ours
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import load_images
from lib.run_folder import read_log
from lib.runtime import setup, tune_for_training
from lib.schedule import window_done

ROOT = Path(__file__).resolve().parents[1]
OURS = ["original: --recipe original", "best: --preset flowers64-v2 --recipe improved --batch-size 32"]


def parse_system(spec):
    """A peer's name, or 'NAME: sd_train.py flags' for one of this project's runs -> (name, flags
    or None for a peer)."""
    if spec in PEERS:
        return spec, None
    name, sep, flags = spec.partition(":")
    if not sep or not name.strip() or "/" in name or name.strip() in PEERS:
        raise UserError(
            f"--system {spec!r}: one of {', '.join(PEERS)}, or 'NAME: sd_train.py flags' (NAME without '/')"
        )
    return name.strip(), shlex.split(flags)


def batches(images, batch_size, generator):
    """Endless shuffled batches in [-1, 1], flipped at random (both peers' loaders flip)."""
    while True:
        for idx in torch.randperm(len(images), generator=generator).split(batch_size):
            if len(idx) < batch_size:  # drop the last partial batch: every step costs the same
                continue
            x = images[idx].float() / 127.5 - 1.0
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            yield x.contiguous(memory_format=torch.channels_last)


def seconds_per_step(make, images, args, precision):
    """Time a throwaway copy's steps after its first (lib.schedule's window) -> seconds per step."""
    system = make(total_steps=10**6)
    data = batches(images, system.batch_size, torch.Generator().manual_seed(args.seed + 1))
    system.train_step(next(data), precision)
    steps, t0 = 0, time.perf_counter()
    while not window_done(args.minutes, steps, time.perf_counter() - t0):
        system.train_step(next(data), precision)
        steps += 1
    return (time.perf_counter() - t0) / steps


def train_peer(name, images, args, precision):
    """Train a peer for --minutes of steps, then paint --num-samples PNGs -> its record."""
    out = Path(args.out_dir) / name
    options = dict(image_size=images.shape[-1], sampling_steps=args.steps, seed=args.seed)
    options.update(PEERS[name].options(args))

    def make(total_steps):
        return PEERS[name](total_steps=total_steps, **options)

    rate = seconds_per_step(make, images, args, precision)
    total = max(1, round(args.minutes * 60 / rate))
    print(f"{name}: {rate:.2f} s per step timed; {total} steps for {args.minutes:g} minutes", flush=True)
    system = make(total)
    data = batches(images, system.batch_size, torch.Generator().manual_seed(args.seed))
    t0, losses = time.perf_counter(), []
    for step in range(total):
        losses.append(system.train_step(next(data), precision))
        if (step + 1) % 100 == 0 or step + 1 == total:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"{name}: step {step + 1}/{total}  loss {recent:.4f}", flush=True)
    seconds = time.perf_counter() - t0
    write_samples(system, out / "samples", args, precision)
    return dict(
        system=name,
        steps=total,
        batch_size=system.batch_size,
        train_minutes=seconds / 60,
        images_per_s=total * system.batch_size / seconds,
        parameters=sum(p.numel() for p in system.net.parameters()),
        options=options,
    )


def write_samples(system, folder, args, precision):
    """--num-samples images of a peer's EMA network as PNGs, in batches of 100, seeded by --seed."""
    from torchvision.utils import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # an earlier, unscored attempt's: sd_eval.py scores the whole folder
        old.unlink()
    t0 = time.perf_counter()
    for start in range(0, args.num_samples, 100):
        n = min(100, args.num_samples - start)
        images = system.sample(n, seed=args.seed + start, precision=precision)  # (n, 3, S, S) in [0, 1]
        for i, image in enumerate(images):
            save_image(image, folder / f"{start + i:05d}.png")
    print(f"{folder}: {args.num_samples} samples in {time.perf_counter() - t0:.0f}s", flush=True)


def train_our_run(name, flags, args):
    """One of this project's runs through sd_train.py --max-minutes (no KID probe inside the
    budget) -> its record; its samples come from sd_eval.py --checkpoint."""
    ns = argparse.Namespace(
        out_dir=args.out_dir,
        minutes=args.minutes,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        eval_every=10**6,  # no probe or grid within the budget: only the training steps count
    )
    train_ours(name, [*flags, *data_flags(args), "--seed", str(args.seed), "--device", "cpu"], ns)
    from lib.checkpoint import read_checkpoint

    state = read_checkpoint(Path(args.out_dir) / name / "last.pt")["train"]
    # the logged epochs, and the epoch the budget ended in (its seconds are in the state only)
    seconds = sum(float(row["seconds"]) for row in read_log(Path(args.out_dir) / name))
    seconds += state["epoch_seconds"] if state.get("images_done") else 0.0
    return dict(
        system=name,
        flags=shlex.join(flags),
        steps=state["global_step"],
        batch_size=state["args"]["batch_size"],
        train_minutes=seconds / 60,
        images_per_s=state["global_step"] * state["args"]["batch_size"] / seconds,
    )


def data_flags(args):
    """The real images, for sd_train.py and sd_eval.py."""
    flags = ["--image-size", str(args.image_size)]
    return [*flags, *(["--image-dir", args.image_dir] if args.image_dir else ["--data-root", args.data_root])]


def score(record, args):
    """Score a system's samples with sd_eval.py (its output passed on); the record gains kid,
    kid_err and fid."""
    folder = Path(args.out_dir) / record["system"]
    common = [*data_flags(args), "--cache-dir", args.cache_dir, "--seed", str(args.seed)]
    if "flags" in record:  # ours: sd_eval.py samples the checkpoint itself, DDIM 20 by default
        argv = ["--checkpoint", str(folder / "last.pt"), "--num-samples", str(args.num_samples)]
        argv += ["--steps", str(args.steps), "--device", "cpu"]
    else:
        argv = ["--samples-dir", str(folder / "samples")]
    record.update(parse_scores(sd_eval_output(record["system"], [*argv, *common])))


def parse_scores(text):
    """sd_eval.py's output -> dict(kid, kid_err, fid, extractor)."""
    found = SCORE.search(text)
    if found is None:
        raise UserError("sd_eval.py printed no 'samples: KID ...' line")
    kid, kid_err, fid = map(float, found.groups())
    extractor = text[found.start() :].split("[", 1)[1].split("]", 1)[0]
    return dict(kid=kid, kid_err=kid_err, fid=fid, extractor=extractor)


def table(records, args):
    """The results as a markdown table."""
    extractor = next((r["extractor"] for r in records if "extractor" in r), "efficientnet-lite0")
    rows = [
        f"Each system trained for {args.minutes:g} minutes of training steps, one after another on this "
        f"machine; {args.num_samples} samples of its own {args.steps}-step DDIM sampler each, "
        f"{args.image_size} px.\n",
        f"| system | steps x batch | training images/s | KID [{extractor}] | FID [{extractor}] |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in records:
        kid = f"{r['kid']:.4f} ± {r['kid_err']:.4f}" if "kid" in r else ""
        fid = f"{r['fid']:.1f}" if "fid" in r else ""
        name = r["system"] + (f" (`{r['flags']}`)" if r.get("flags") else "")
        steps = f"{r['steps']} x {r['batch_size']}"
        rows.append(f"| {name} | {steps} | {r['images_per_s']:.1f} | {kid} | {fid} |")
    return "\n".join(rows) + "\n"


def first_samples(record, args, n=8):
    """The first n of a system's scored samples, as (n, 3, S, S) in [0, 1]."""
    folder = Path(args.out_dir) / record["system"]
    if "flags" not in record:
        return load_images(args.image_size, image_dir=folder / "samples")[:n].float() / 255
    from lib.checkpoint import load_model
    from lib.normalization import model_stats
    from lib.sample import generate, initial_noise

    model, ckpt = load_model(folder / "last.pt")
    noise = initial_noise(n, ckpt["config"]["image_size"], args.seed)  # sd_eval.py's first n
    return generate(model, noise, *model_stats(ckpt), steps=args.steps, seed=args.seed)


def draw(records, args):
    """One row of first samples per system, named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(len(records), 1, figsize=(9, 1.35 * len(records)), squeeze=False)
    for ax, record in zip(axes[:, 0], records, strict=True):
        grid = make_grid(first_samples(record, args), nrow=8, padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        kid = f", KID {record['kid']:.3f}" if "kid" in record else ""
        ax.set_title(f"{record['system']}{kid}", fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=100)
    print(f"saved {args.figure}")


def settings(args):
    """What a scored system's numbers depend on besides its own flags: a record made with other
    settings is not reused."""
    keys = ("minutes", "num_samples", "steps", "seed", "image_size", "image_dir", "data_root")
    return {k: getattr(args, k) for k in (*keys, "diffusers_widths", "ddpm_dim")}


def run(args):
    check_at_least(args, num_samples=1, steps=1)
    if args.image_size % 8:  # both peers' U-Nets halve it three times
        raise UserError(f"--image-size must be a multiple of 8, got {args.image_size}")
    widths = args.diffusers_widths.split(",")
    if len(widths) < 2 or not all(w.isdigit() and int(w) % 32 == 0 and int(w) > 0 for w in widths):
        raise UserError(
            f"--diffusers-widths: two or more multiples of 32 (its GroupNorm), got {args.diffusers_widths}"
        )
    if not args.minutes > 0:
        raise UserError(f"--minutes must be > 0, got {args.minutes}")
    systems = [parse_system(spec) for spec in args.system or [*PEERS, *OURS]]
    missing = missing_packages([name for name, flags in systems if flags is None])
    if missing:
        raise UserError(
            f"the peers' packages are not installed ({missing}): pip install -r requirements-peers.txt"
        )
    device, precision = setup("cpu")
    tune_for_training(device)  # as sd_train.py does for this project's runs
    images = None
    records = []
    for name, flags in systems:
        path = Path(args.out_dir) / name / "record.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("settings") != settings(args):
                raise UserError(
                    f"{path} was scored with other settings ({record.get('settings')}): "
                    "use another --out-dir, or delete that folder to run it again"
                )
            records.append(record)
            print(f"{name}: scored already ({path})")
            continue
        if flags is None:
            if images is None:
                images = load_images(
                    args.image_size, args.data_root, args.image_dir, num_workers=2, cache_dir=args.cache_dir
                )
            record = train_peer(name, images, args, precision)
        else:
            record = train_our_run(name, flags, args)
        score(record, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        record.update(settings=settings(args), departures=PEER_DEPARTURES.get(name, []))
        path.write_text(json.dumps(record, indent=1))
        records.append(record)
    text = table(records, args)
    (Path(args.out_dir) / "peers.md").write_text(text)
    print("\n" + text)
    draw(records, args)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--system",
        action="append",
        help=f"a peer ({', '.join(PEERS)}) or 'NAME: sd_train.py flags' (repeat; default: both peers, then "
        + " and ".join(repr(s) for s in OURS)
        + ")",
    )
    p.add_argument("--minutes", type=float, default=20.0, help="minutes of training steps per system")
    p.add_argument("--num-samples", type=int, default=1000, help="samples scored per system")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of every system's sampler")
    p.add_argument("--seed", type=int, default=0, help="of the weights, the data order, the samples")
    p.add_argument("--diffusers-widths", default="32,64,96,128", help="UNet2DModel's block_out_channels")
    p.add_argument("--ddpm-dim", type=int, default=24, help="denoising-diffusion-pytorch's Unet(dim=...)")
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument("--image-dir", help="train and score on the pictures in this folder instead")
    p.add_argument("--image-size", type=int, default=64, help="pixels a side, for every system")
    p.add_argument("--out-dir", default="runs/peers", help="one folder per system inside")
    p.add_argument("--cache-dir", default="cache", help="decoded images and features, shared by the systems")
    p.add_argument("--figure", default="docs/peers.png", help="where the side-by-side figure goes")
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
