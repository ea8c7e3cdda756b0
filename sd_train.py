"""Train the diffusion model on Flowers102 or a folder of your own pictures.

    python sd_train.py                                   # the original: sd128, 500 epochs (needs a GPU)
    python sd_train.py --preset flowers64 --data-root ../shared/data --flip
    python sd_train.py --resume output_sd/last.pt        # continue an interrupted run

Every epoch writes last.pt (and best.pt on a new best loss), a CSV row and the loss curve; every
--sample-every epochs an 8-image grid. Ctrl-C / SIGTERM finish the current step, write last.pt
and exit (status 130 / 143: stopped, not finished); --resume continues exactly where it stopped.
"""

import argparse
import csv
import math
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from lib import HelpFormatter, UserError, check_at_least, distributed, run_cli
from lib.checkpoint import atomic_save, lock_run_folder, make_checkpoint, read_checkpoint
from lib.data import (
    FLOWERS_MEAN,
    FLOWERS_STD,
    DecodedBatches,
    JpegBatches,
    compute_stats,
    epoch_order,
    load_images,
    to_model_space,
)
from lib.metrics import KidProbe
from lib.runtime import PRECISIONS, literal_precision, setup
from lib.sample import generate, initial_noise
from lib.training import Training
from lib.unet import PRESETS, build_unet, count_parameters, model_config

CSV_FIELDS = ["epoch", "loss", "lr", "seconds", "images_per_s", "kid"]
ONE_SHOT = ("resume", "overwrite", "dry_run")  # flags that --resume does not take from the saved run


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--preset", default="sd128", choices=sorted(PRESETS), help="network and image size (lib/unet.py)"
    )
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    # data
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let torchvision download Flowers102 into --data-root",
    )
    p.add_argument(
        "--image-dir", default=None, help="train on the images in this folder (recursively) instead"
    )
    p.add_argument("--limit", type=int, default=None, help="use a fixed subset of N images")
    p.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips"
    )
    p.add_argument("--num-workers", type=int, default=4, help="processes that decode the images")
    p.add_argument("--cache-dir", default=None, help="keep the decoded images in a file here for later runs")
    # optimisation: the original's recipe
    p.add_argument("--epochs", type=int, default=500, help="passes over the images")
    p.add_argument(
        "--batch-size", type=int, default=64, help="per process: the global batch is this x the process count"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    p.add_argument(
        "--ema-decay", type=float, default=0.999, help="of the weight average that is sampled and shipped"
    )
    p.add_argument(
        "--lr-patience", type=int, default=20, help="ReduceLROnPlateau: epochs without improvement"
    )
    p.add_argument("--lr-factor", type=float, default=0.5, help="ReduceLROnPlateau: LR multiplier")
    p.add_argument("--min-lr", type=float, default=1e-6, help="ReduceLROnPlateau: the LR's floor")
    p.add_argument(
        "--early-stop", type=int, default=100, help="stop after this many epochs without a new best loss"
    )
    # outputs
    p.add_argument("--out-dir", default="output_sd", help="checkpoints, log, curves and sample grids")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow replacing the checkpoints of another (or a further advanced) run in --out-dir",
    )
    p.add_argument(
        "--sample-every",
        type=int,
        default=10,
        help="write a sample grid every N epochs (and at 1 and the last)",
    )
    p.add_argument("--num-samples", type=int, default=8, help="images in each sample grid")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps of the sample grids")
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every N epochs, a KID (efficientnet-lite0) of EMA samples; 0: never",
    )
    p.add_argument("--eval-samples", type=int, default=500, help="samples of each KID")
    p.add_argument("--eval-steps", type=int, default=5, help="DDIM steps of the KID samples")
    p.add_argument("--best-by", default="loss", choices=["loss", "kid"], help="what makes best.pt the best")
    # runtime
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is a GPU"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), else fp16 (old GPUs) / fp32",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the network (pays off for sd128 on GPUs; not on CPUs or for flowers64)",
    )
    p.add_argument(
        "--literal",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the original's slow path, to measure against: JPEGs decoded every epoch by --num-workers "
        "processes, NCHW layout, the literal network formulation, autocast + GradScaler as the original",
    )
    p.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="under torchrun: BatchNorm statistics over all processes' shards",
    )
    p.add_argument("--seed", type=int, default=0, help="of the weights, times, noise, flips and data order")
    p.add_argument(
        "--resume", default=None, help="last.pt (or best.pt) of a run: continue it; flags given now override"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the configuration and parameter count, then exit"
    )
    return p


def resolve_args(argv):
    """Parse flags. With --resume, the run's saved flags are the base and explicit flags override."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        return args, None
    ckpt = read_checkpoint(args.resume)
    if "train" not in ckpt:
        raise UserError(
            f"{args.resume} holds weights only, no training state to resume "
            "(resume from a last.pt or best.pt that sd_train.py wrote)"
        )
    for action in parser._actions:  # parse again without defaults: what did the user type?
        action.default = argparse.SUPPRESS
    explicit = vars(parser.parse_args(argv))
    for fixed, used in (
        ("preset", ckpt["train"]["args"]["preset"]),
        ("image_size", ckpt["config"]["image_size"]),
    ):
        if fixed in explicit and explicit[fixed] != used:
            raise UserError(f"--{fixed.replace('_', '-')} cannot change on --resume (the run used {used})")
    done = ckpt["train"]["epoch"]
    if explicit.get("epochs", ckpt["train"]["args"]["epochs"]) <= done:
        raise UserError(
            f"{args.resume} is at the end of epoch {done} already: pass --epochs N with N > {done} to train on"
        )
    # Settings of the run carry over; one-shot instructions (which file to resume, permission to
    # overwrite, a dry run) apply to the command that gave them only.
    saved = {k: v for k, v in ckpt["train"]["args"].items() if k not in ONE_SHOT}
    merged = {**vars(args), **saved, **explicit}
    if ckpt["train"]["bad_epochs"] >= merged["early_stop"]:
        raise UserError(
            f"{args.resume} stopped early (no new best loss for {ckpt['train']['bad_epochs']} epochs): "
            "pass a larger --early-stop to train on"
        )
    ckpt["explicit"] = set(explicit)  # the flags typed now (restore() lets an explicit --lr reset the LR)
    return argparse.Namespace(**merged), ckpt


class StopRequest:
    """Ctrl-C / SIGTERM. Before the first step (loading data): stop at once, nothing to save. Once
    training (arm()): the first finishes the step, saves, exits; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = self.armed = False
        self.signum = None  # the first stop signal, for the exit status (128 + it, as the shell's)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def arm(self):
        self.armed = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum
        if not self.armed or (self.requested and signum == signal.SIGINT):
            if hasattr(signal, "SIGCHLD"):
                # A SIGTERM to the whole group also kills the image-decoding workers, and PyTorch's
                # loader would report their deaths as an error over this stop: not its concern now.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step, saving last.pt")


def write_log(out_dir, rows, eval_steps):
    """Rewrite the CSV log, the loss curve and (once there is one) the KID curve."""
    with open(out_dir / "training_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (
        ("loss", "L1 loss on the noise (epoch mean)", "loss_curve.png"),
        ("kid", f"KID [efficientnet-lite0], {eval_steps}-step samples", "kid_curve.png"),
    ):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(*zip(*points), marker="o" if key == "kid" else None)
        ax.set(xlabel="epoch", ylabel=label, title=f"Training {key.upper() if key == 'kid' else key}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)


def decoded_images(args, cfg):
    """The training images, decoded once: (N, 3, S, S) uint8 on the CPU."""
    return load_images(
        cfg["image_size"],
        args.data_root,
        args.image_dir,
        args.download,
        args.limit,
        args.num_workers,
        args.cache_dir,
    )


def restore(resumed, run, sched, gen, state, args, ctx):
    """Put a run back where its checkpoint left it (weights, optimizer, schedule, RNG, progress)."""
    t = resumed["train"]
    run.model.load_state_dict(t["model"])
    run.ema.load_state_dict(resumed["ema"])
    # Moments and step counts come back; how Adam runs (fused or not) is this run's choice: a run
    # resumed with --literal switched on or off would otherwise keep the old one (and, fused under
    # loss scaling, crash).
    for saved, now in zip(t["optimizer"]["param_groups"], run.opt.param_groups, strict=True):
        saved.update(fused=now["fused"], foreach=now["foreach"])
    run.opt.load_state_dict(t["optimizer"])
    sched.load_state_dict(t["scheduler"])
    if t["scaler"] and run.scaler.is_enabled():  # empty when the run had no loss scaling (bf16, fp32)
        run.scaler.load_state_dict(t["scaler"])
    if "lr" in resumed["explicit"]:  # an explicit --lr on resume restarts the schedule there
        for group in run.opt.param_groups:
            group["lr"] = args.lr
    # The schedule's own settings come from the flags (the saved ones unless overridden now).
    sched.factor, sched.patience = args.lr_factor, args.lr_patience
    sched.min_lrs = [args.min_lr] * len(sched.min_lrs)
    torch.set_rng_state(t["rng"]["torch"])
    gen_states = t["rng"]["device"]  # one per rank of the run that wrote it
    if len(gen_states) == ctx.world_size and gen_states[ctx.rank].shape == gen.get_state().shape:
        gen.set_state(gen_states[ctx.rank])
    else:  # another process count or device type (CPU and CUDA generator states differ):
        gen.manual_seed(args.seed + ctx.rank + 1_000_003 * t["global_step"])  # fresh, reproducible streams
    state.update({k: t[k] for k in state})


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


def train(args, resumed, stop, ctx=distributed.ALONE):
    """Run (or continue) a training run; returns the Training objects. ctx: this process's place
    under torchrun (rank 0 of 1 when run alone)."""
    log = print if ctx.is_main else (lambda *a, **k: None)  # one voice: rank 0's
    device, precision = setup(ctx.device or args.device, args.precision)
    if args.literal and args.precision == "auto":
        precision = literal_precision(device)
    try:  # a resumed run keeps the network its checkpoint describes
        cfg = resumed["config"] if resumed else model_config(args.preset, args.image_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    torch.manual_seed(args.seed)
    if args.dry_run:
        for k, v in sorted(vars(args).items()):
            log(f"{k}: {v}")
        log(f"device: {device}\nprecision: {precision}\nmodel: {cfg}\nprocesses: {ctx.world_size}")
        log(f"parameters: {count_parameters(build_unet(cfg))}")
        return None
    check_at_least(
        args,
        epochs=1,
        batch_size=1,
        sample_every=1,
        num_samples=1,
        sample_steps=1,
        num_workers=0,
        early_stop=1,
        lr_patience=0,
        min_lr=0.0,
        eval_every=0,
        eval_samples=2,
        eval_steps=1,
    )
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if not (0.0 <= args.ema_decay < 1.0 and 0.0 < args.lr_factor < 1.0):
        raise UserError(
            f"--ema-decay must be in [0, 1) and --lr-factor in (0, 1), got {args.ema_decay}, {args.lr_factor}"
        )
    if args.best_by == "kid" and args.eval_every < 1:
        raise UserError("--best-by kid needs --eval-every N")
    if args.sync_bn and ctx.active and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU processes)")
    # Rank 0 writes: it holds the folder's lock, taken now if the folder exists (before its files
    # are checked and the data loads), else once it is made. Kept in this frame: released when
    # train() ends.
    lock = lock_run_folder(args.out_dir) if ctx.is_main and Path(args.out_dir).is_dir() else None
    out_dir = check_out_dir(args, resumed)
    run = Training(
        cfg,
        device,
        precision,
        args.lr,
        literal=args.literal,
        compile=args.compile,
        distributed=ctx.active,
        sync_bn=args.sync_bn and ctx.active,
    )
    model, ema, opt, scaler = run.model, run.ema, run.opt, run.scaler

    log(
        f"loading images ({'--image-dir ' + args.image_dir if args.image_dir else 'Flowers102 from ' + args.data_root})"
    )
    # The images decoded once: what the fast path trains on. The literal path decodes every epoch
    # and needs them whole only for the statistics of --image-dir or the KID probe's references.
    kid_here = args.eval_every > 0 and ctx.is_main
    images = None
    if not args.literal or (args.image_dir and not resumed) or kid_here:
        images = decoded_images(args, cfg)  # (N, 3, S, S) uint8 on the CPU
    data = (
        JpegBatches(
            cfg["image_size"],
            device,
            args.num_workers,
            data_root=args.data_root,
            image_dir=args.image_dir,
            download=args.download,
            limit=args.limit,
        )
        if args.literal
        else DecodedBatches(images, device)
    )
    if resumed:
        mean, std = resumed["norm"]["mean"], resumed["norm"]["std"]
    elif args.image_dir:  # the user's pictures: their own statistics
        mean, std = compute_stats(images)
    else:
        mean, std = FLOWERS_MEAN, FLOWERS_STD
    n_images = len(data)
    steps_per_epoch = len(distributed.shard(torch.arange(n_images), args.batch_size, ctx))
    if steps_per_epoch == 0:
        raise UserError(
            f"{n_images} image(s) make no batch for {ctx.world_size} processes: use more images or fewer processes"
        )
    log(
        f"{n_images} images of {cfg['image_size']} px, {count_parameters(model):,} parameters, "
        f"{device} {precision}{' literal path' if args.literal else ''}, {ctx.world_size} process(es) x batch "
        f"{args.batch_size}, {steps_per_epoch} steps per epoch"
    )

    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=args.lr_factor, patience=args.lr_patience, min_lr=args.min_lr
    )
    gen = torch.Generator(device).manual_seed(args.seed + ctx.rank)  # times, noise and flips: per rank
    # images_done / epoch_steps: progress in the current epoch, in images (so a run resumed with
    # another process count knows where to continue) and in global steps.
    state = dict(
        epoch=0,
        images_done=0,
        epoch_steps=0,
        epoch_loss_sum=0.0,
        epoch_seconds=0.0,
        global_step=0,
        best_loss=math.inf,
        best_kid=math.inf,
        bad_epochs=0,
        log=[],
    )
    # Which run a checkpoint belongs to, so that resuming never writes over another run's files.
    run_id = resumed["train"].get("run_id") if resumed else uuid.uuid4().hex
    if resumed:
        restore(resumed, run, sched, gen, state, args, ctx)
        log(f"resumed {args.resume}: epoch {state['epoch'] + 1}, {state['images_done']} images into it")

    sample_noise = initial_noise(args.num_samples, cfg["image_size"], args.seed)
    kid_probe = None
    if kid_here:
        log(f"KID probe: features of the {n_images} training images (efficientnet-lite0)")
        kid_probe = KidProbe(
            images,
            mean,
            std,
            args.eval_samples,
            args.eval_steps,
            args.seed + 1,
            precision,
            device,
            args.cache_dir,
        )
    del images  # on a GPU the batches come from the device's copy: free the host's

    def checkpoint(name):
        """Collective (every rank's RNG state is gathered); rank 0 writes."""
        gen_states = [gen.get_state()]
        if ctx.active:
            gen_states = [None] * ctx.world_size
            torch.distributed.all_gather_object(gen_states, gen.get_state().cpu())
        if not ctx.is_main:
            return
        train_state = dict(
            state,
            run_id=run_id,
            args=vars(args),
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            scaler=scaler.state_dict(),
            world_size=ctx.world_size,
            rng={"torch": torch.get_rng_state(), "device": gen_states},
        )
        atomic_save(make_checkpoint(cfg, mean, std, ema.state_dict(), train_state), out_dir / name)

    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and lock is None:
        lock = lock_run_folder(out_dir)
    stop.arm()
    # Under torchrun, asking every rank costs a device sync; every 10 steps keeps the queue full.
    check_every = 10 if ctx.active else 1
    while state["epoch"] < args.epochs:
        epoch = state["epoch"] + 1  # 1-based for people
        order = epoch_order(n_images, state["epoch"], args.seed)
        batches = distributed.shard(order[state["images_done"] :], args.batch_size, ctx)  # this rank's
        global_sizes = [
            len(gb) for gb in order[state["images_done"] :].split(args.batch_size * ctx.world_size)
        ]
        model.train()
        # This rank's, this session. fp64 adds fp32 losses exactly, so a run stopped and resumed
        # mid-epoch (two partial sums) reports the very loss of an uninterrupted one (with one
        # process; the division by the process count below can round each part differently).
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        first = state["epoch_steps"]
        bar = tqdm(
            data.batches(batches),
            initial=first,
            total=first + len(batches),
            disable=not ctx.is_main,
            desc=f"epoch {epoch}/{args.epochs}",
            leave=False,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        steps_done = 0
        for i, images in enumerate(bar):
            x0 = to_model_space(images, mean, std, gen if args.flip else None)
            # Like AveragedModel, the first update copies the weights; later ones average.
            loss_sum += run.step(x0, gen, args.ema_decay if state["global_step"] else 0.0)
            state["global_step"] += 1
            state["epoch_steps"] += 1
            state["images_done"] += global_sizes[i]
            steps_done += 1
            if i % 10 == 0:
                bar.set_postfix(
                    loss=f"{(state['epoch_loss_sum'] + loss_sum.item()) / state['epoch_steps']:.4f}"
                )
            if (i + 1) % check_every == 0 and distributed.any_rank(stop.requested, ctx, device):
                break
        state["epoch_seconds"] += time.perf_counter() - t0
        # Every rank adds the same mean: the ranks' losses averaged, so all take the same decisions.
        state["epoch_loss_sum"] += distributed.all_sum(loss_sum.item(), ctx, device) / ctx.world_size
        bar.close()
        interrupted = distributed.any_rank(stop.requested, ctx, device)
        if interrupted and steps_done < len(batches):
            checkpoint("last.pt")
            log(
                f"stopped in epoch {epoch} after {state['images_done']} images; resume with --resume {out_dir / 'last.pt'}"
            )
            return run

        loss = state["epoch_loss_sum"] / state["epoch_steps"]
        if not math.isfinite(loss):  # the same on every rank (all-reduced): all stop together
            raise UserError(
                f"the loss became {loss} in epoch {epoch}: training diverged. last.pt keeps the state of "
                "the epoch before (nothing saved of this one); try a lower --lr"
            )
        seconds = state["epoch_seconds"]
        lr = opt.param_groups[0]["lr"]  # the one this epoch trained with; the schedule may lower it now
        sched.step(loss)
        # The LR schedule and early stopping follow the loss (as the original); best.pt follows --best-by.
        loss_improved = loss < state["best_loss"]
        state["best_loss"], state["bad_epochs"] = (
            (loss, 0) if loss_improved else (state["best_loss"], state["bad_epochs"] + 1)
        )
        # A stop request skips the KID and the grid: last.pt first, before a scheduler's grace period ends.
        final = epoch == args.epochs or state["bad_epochs"] >= args.early_stop
        kid_value = None  # rank 0 only: the other ranks do not need it for any decision
        if kid_probe is not None and not interrupted and (epoch % args.eval_every == 0 or final):
            kid_value = kid_probe(ema)
        kid_improved = kid_value is not None and kid_value < state["best_kid"]
        if kid_improved:
            state["best_kid"] = kid_value
        improved = kid_improved if args.best_by == "kid" else loss_improved
        improved = distributed.any_rank(improved and ctx.is_main, ctx, device)  # KID is known on rank 0 only
        state["log"].append(
            dict(
                epoch=epoch,
                loss=round(loss, 6),
                lr=lr,
                seconds=round(seconds, 2),
                images_per_s=round(n_images / seconds, 2),
                kid=None if kid_value is None else round(kid_value, 6),
            )
        )
        state.update(epoch=epoch, images_done=0, epoch_steps=0, epoch_loss_sum=0.0, epoch_seconds=0.0)
        log(
            f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{seconds:.1f}s  {n_images / seconds:.1f} img/s{'' if kid_value is None else f'  KID {kid_value:.4f}'}"
            f"{'  *best*' if improved else ''}"
        )
        if ctx.is_main:
            write_log(out_dir, state["log"], args.eval_steps)
        if ctx.is_main and not interrupted and (epoch == 1 or epoch % args.sample_every == 0 or final):
            grid = generate(
                ema, sample_noise, mean, std, steps=args.sample_steps, seed=args.seed, precision=precision
            )
            save_image(grid, out_dir / f"epoch_{epoch}.png", nrow=4)
        checkpoint("last.pt")
        if improved:
            checkpoint("best.pt")
        if state["bad_epochs"] >= args.early_stop:
            log(f"early stop: no new best loss for {args.early_stop} epochs")
            break
        if interrupted and not final:
            log(f"stopped after epoch {epoch}; resume with --resume {out_dir / 'last.pt'}")
            return run
        if interrupted:
            log("stop request in the last epoch: its sample grid and KID were skipped, the run is complete")
    best_kid = "" if kid_probe is None else f", best KID {state['best_kid']:.4f}"
    log(
        f"done: {state['epoch']} epoch{'s' * (state['epoch'] != 1)}, best loss {state['best_loss']:.4f}{best_kid}; checkpoints in {out_dir}"
    )
    return run


def main(argv=None):
    stop = StopRequest()

    def run(argv):
        args, resumed = resolve_args(argv)
        train(args, resumed, stop, distributed.init(args.device))

    try:
        status = run_cli(run, argv)  # Ctrl-C before training or a second one: 130, one line
    finally:
        stop.restore()
        distributed.close()  # on every exit path: done, stopped, error
    # Stopped by a signal (last.pt saved, or nothing to save yet): not a success, so that
    # `sd_train.py ... && export` stops too; 128 + the signal's number, as the shell reports it.
    return 128 + stop.signum if stop.signum and status in (0, 130) else status


if __name__ == "__main__":
    sys.exit(main())
