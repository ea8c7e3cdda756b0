"""Train the diffusion model on Flowers102 or a folder of your own pictures.

    python sd_train.py                                   # the original: sd128, 500 epochs (needs a GPU)
    python sd_train.py --preset flowers64 --data-root data --download --flip
    python sd_train.py --resume output_sd/last.pt        # continue an interrupted run

Every epoch writes last.pt (and best.pt on a new best loss), a CSV row and the loss curve; every
--sample-every epochs an 8-image grid. Ctrl-C / SIGTERM finish the current step, write last.pt
and exit (status 130 / 143: stopped, not finished); --resume continues exactly where it stopped.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from lib import distributed
from lib.checkpoint import load_model, read_checkpoint
from lib.cli import ArgumentParser, StopRequest, UserError, check_at_least, run_cli
from lib.data import image_labels
from lib.diffusion import PREDICTIONS, SIGNAL_RATES
from lib.run_folder import check_out_dir, lock_run_folder
from lib.runtime import add_device_args, literal_precision, setup, tune_for_training
from lib.samplers import MIN_EVALUATIONS, SAMPLERS
from lib.schedule import budget_spent, trained_minutes
from lib.trainer import TrainingRun
from lib.unet import (
    ACTIVATIONS,
    NETWORK_OPTIONS,
    PRESETS,
    build_unet,
    check_signal_rates,
    count_parameters,
    model_config,
)

ONE_SHOT = ("resume", "overwrite", "dry_run")  # flags that --resume does not take from the saved run
# Saved absolute: a resume may run elsewhere.
PATHS = ("out_dir", "data_root", "image_dir", "cache_dir", "init_from")

# What --recipe sets: each entry is also a flag of its own, which overrides it when given.
RECIPES = {
    # The original repo's: Adam at 3e-4 with ReduceLROnPlateau, L1 on the noise, an EMA
    # of 0.999 from the first step, its published per-channel statistics, no flips.
    "original": dict(
        lr=3e-4,
        optimizer="adam",
        weight_decay=0.0,
        warmup_steps=0,
        lr_schedule="plateau",
        ema_decay=0.999,
        ema_warmup=False,
        ema_power=0.0,
        ema_bn_stats="live",
        loss="l1",
        min_snr_gamma=0.0,
        prediction="eps",
        norm_stats="original",
        flip=False,
    ),
    # More flowers per CPU-hour: what the equal-time study (docs/recipes.md) kept.
    "improved": dict(
        lr=1e-3,
        optimizer="adamw",
        weight_decay=1e-4,
        warmup_steps=100,
        lr_schedule="wsd",
        ema_decay=0.995,
        ema_warmup=True,
        ema_power=0.0,
        ema_bn_stats="live",
        loss="l2",
        min_snr_gamma=5.0,
        prediction="eps",
        norm_stats="data",
        flip=True,
    ),
}


def recipe_help(key, text):
    """A recipe flag's help, with what each recipe sets it to."""
    values = ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items())
    return f"{text} (by --recipe: {values})"


def get_parser():
    """Every flag and its default: together, the original's recipe and setup."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--preset", default="sd128", choices=sorted(PRESETS), help="network and image size (lib/unet.py)"
    )
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    add_network_args(p.add_argument_group("network (the preset's unless given; docs/recipes.md)"))
    add_data_args(p.add_argument_group("data"))
    add_budget_args(p.add_argument_group("how long to train (the first budget reached ends the run)"))
    add_recipe_args(p.add_argument_group("optimisation (--recipe sets those marked so; a flag overrides it)"))
    add_output_args(p.add_argument_group("outputs"))
    run = p.add_argument_group("runtime")
    precision_help = (
        "auto: bf16 on GPUs and on CPUs with native bf16 (AMX/AVX512-BF16), else fp16 (old GPUs) / fp32"
    )
    add_device_args(run, precision_help)
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the network (pays off for sd128 on GPUs; not on CPUs or for flowers64)",
    )
    run.add_argument(
        "--literal",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the original's slow path, to measure against: JPEGs decoded every epoch by --num-workers "
        "processes, NCHW layout, the literal network formulation, autocast + GradScaler as the original",
    )
    run.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="under torchrun: BatchNorm statistics over all processes' shards",
    )
    run.add_argument("--seed", type=int, default=0, help="of the weights, times, noise, flips and data order")
    run.add_argument(
        "--resume", default=None, help="last.pt (or best.pt) of a run: continue it; flags given now override"
    )
    run.add_argument(
        "--init-from",
        default=None,
        help="a new run from this checkpoint's EMA weights and fresh optimizer state: its network, "
        "prediction and classes (--preset unused); --image-size may change (fine-tune 64 px to 128)",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="print the configuration and parameter count, then exit"
    )
    return p


def add_data_args(p):
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="let torchvision download Flowers102 into --data-root",
    )
    p.add_argument("--image-dir", default=None, help="train on the images in this folder (recursively)")
    p.add_argument("--limit", type=int, default=None, help="use a fixed subset of N images")
    p.add_argument(
        "--class-cond",
        action="store_true",
        help="class-conditional: Flowers102's 102 classes, or one subfolder of --image-dir per class",
    )
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="with --class-cond: the share of images trained without their class (for guidance)",
    )
    p.add_argument(
        "--flip", action=argparse.BooleanOptionalAction, help=recipe_help("flip", "random horizontal flips")
    )
    p.add_argument(
        "--norm-stats",
        choices=["original", "data"],
        help=recipe_help("norm_stats", "normalize with the original's per-channel statistics or the data's"),
    )
    p.add_argument(
        "--input-scale",
        type=float,
        default=None,
        help="multiply the normalized images by this (Chen 2023): below 1 the same noise level hides "
        "more, as larger images need; 0.5 for twice the side (Hoogeboom et al. 2023). Default 1, or "
        "the --init-from checkpoint's; kept in the checkpoint's config",
    )
    p.add_argument(
        "--signal-rates",
        type=float,
        nargs=2,
        default=None,
        metavar=("AT_0", "AT_1"),
        help="the noise schedule's ends: the signal rate at t=0 (the least noise trained, where "
        "the ODE samplers end) and at t=1. Default the original's 0.95 0.02, or the --init-from "
        "checkpoint's (a fine-tune may move them); kept in the checkpoint's config",
    )
    p.add_argument("--num-workers", type=int, default=4, help="processes that decode the images")
    p.add_argument("--cache-dir", default=None, help="keep the decoded images in a file here for later runs")


def add_budget_args(p):
    p.add_argument("--epochs", type=int, default=500, help="passes over the images")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimisation steps (the LR's decay runs to it); the same on any machine",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="about this many minutes of training steps: turned into --max-steps once, from the rate of "
        "the first steps, and kept in the checkpoint (lib/schedule.py)",
    )


def add_recipe_args(p):
    p.add_argument("--recipe", default="original", choices=sorted(RECIPES), help="the defaults below")
    p.add_argument(
        "--batch-size", type=int, default=64, help="per process: the global batch is this x the process count"
    )
    p.add_argument("--lr", type=float, help=recipe_help("lr", "learning rate"))
    p.add_argument(
        "--optimizer",
        choices=["adam", "adamw"],
        help=recipe_help("optimizer", "adamw: decoupled weight decay"),
    )
    p.add_argument("--weight-decay", type=float, help=recipe_help("weight_decay", "of the optimizer"))
    p.add_argument("--warmup-steps", type=int, help=recipe_help("warmup_steps", "linear LR warmup"))
    p.add_argument(
        "--lr-schedule",
        choices=["plateau", "constant", "rsqrt", "cosine", "wsd"],
        help=recipe_help(
            "lr_schedule",
            "plateau: ReduceLROnPlateau; rsqrt: 1/sqrt decay; cosine: to the end; "
            "wsd: constant, then linearly to 0 in the cooldown",
        ),
    )
    p.add_argument("--lr-decay-steps", type=int, default=2000, help="rsqrt: steps before the LR decays")
    p.add_argument(
        "--lr-cooldown", type=float, default=0.2, help="wsd: the last share of the run in which the LR falls"
    )
    p.add_argument("--lr-patience", type=int, default=20, help="plateau: epochs without improvement")
    p.add_argument("--lr-factor", type=float, default=0.5, help="plateau: LR multiplier")
    p.add_argument("--min-lr", type=float, default=1e-6, help="plateau: the LR's floor")
    p.add_argument("--ema-decay", type=float, help=recipe_help("ema_decay", "of the sampled weight average"))
    p.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        help=recipe_help("ema_warmup", "decay min(ema-decay, (1+n)/(10+n)) at step n"),
    )
    p.add_argument(
        "--ema-power",
        type=float,
        help=recipe_help("ema_power", "EDM2's power EMA with this exponent instead of the two above; 0: off"),
    )
    bn_help = "the averaged weights' BatchNorm statistics: the live network's, or their own (as SWA)"
    p.add_argument("--ema-bn-stats", choices=["live", "own"], help=recipe_help("ema_bn_stats", bn_help))
    p.add_argument("--loss", choices=["l1", "l2"], help=recipe_help("loss", "error of the prediction"))
    p.add_argument(
        "--prediction",
        choices=PREDICTIONS,
        help=recipe_help("prediction", "the network's target: the noise, or v = s eps - n x0"),
    )
    p.add_argument(
        "--min-snr-gamma", type=float, help=recipe_help("min_snr_gamma", "Min-SNR weighting; 0: off")
    )
    p.add_argument(
        "--early-stop", type=int, default=100, help="stop after this many epochs without a new best loss"
    )


def add_network_args(p):
    both = argparse.BooleanOptionalAction
    p.add_argument(
        "--widths",
        type=int_list,
        help="channels of each level, then of the bottleneck, comma-separated (flowers64: 32,64,96,128)",
    )
    p.add_argument("--block-depth", type=int, help="residual blocks per level")
    p.add_argument(
        "--adaptive-norm",
        action=both,
        help="the noise level and class scale and shift every block's normalized input",
    )
    p.add_argument("--attention", action=both, help="self-attention in the bottleneck")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), help="of the residual blocks")
    p.add_argument("--zero-init", action=both, help="the output conv starts at zero")


def int_list(text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_output_args(p):
    p.add_argument("--out-dir", default="output_sd", help="checkpoints, log, curves and sample grids")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow replacing the checkpoints of another (or a further advanced) run in --out-dir",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=1,
        help="write last.pt (and best.pt, the best of the epochs written) every N epochs and at the end; "
        "more than 1 where an epoch takes seconds (a GPU) and a checkpoint a second to write",
    )
    p.add_argument(
        "--sample-every", type=int, default=10, help="a sample grid every N epochs (and at 1 and the last)"
    )
    p.add_argument("--num-samples", type=int, default=8, help="images in each sample grid")
    p.add_argument("--sample-steps", type=int, default=20, help="network evaluations of the sample grids")
    p.add_argument(
        "--sampler",
        default="ddim",
        choices=SAMPLERS,
        help="of the sample grids and the KID probe (ddim: the original's; docs/sampling.md)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="a KID [efficientnet-lite0] of EMA samples every N epochs; 0: never",
    )
    p.add_argument("--eval-samples", type=int, default=500, help="samples of each KID")
    p.add_argument("--eval-steps", type=int, default=5, help="network evaluations of the KID samples")
    p.add_argument("--best-by", default="loss", choices=["loss", "kid"], help="what makes best.pt the best")


def resolve_args(argv):
    """Parse flags. With --resume, the run's saved flags are the base and explicit flags override."""
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.resume and args.init_from:
        raise UserError("--resume continues a run and --init-from starts a new one: give one of them")
    if not args.resume:
        return apply_recipe(absolute_paths(args)), None
    ckpt = read_checkpoint(args.resume)
    if "train" not in ckpt:
        raise UserError(
            f"{args.resume} holds weights only, no training state to resume "
            "(resume from a last.pt or best.pt that sd_train.py wrote)"
        )
    for action in parser._actions:  # parse again without defaults: what did the user type?
        action.default = argparse.SUPPRESS
    explicit = vars(parser.parse_args(argv))
    # Settings of the run carry over; one-shot instructions (which file to resume, permission to
    # overwrite, a dry run) apply to the command that gave them only.
    saved = {k: v for k, v in ckpt["train"]["args"].items() if k not in ONE_SHOT}
    merged = {**vars(args), **saved, **explicit}
    # A budget given now replaces the saved one of the other kind (both given: check_args refuses).
    for given, other in (("max_steps", "max_minutes"), ("max_minutes", "max_steps")):
        if given in explicit and other not in explicit:
            merged[other] = None
    if "out_dir" not in explicit:  # a resumed run writes beside its checkpoint, run from wherever
        merged["out_dir"] = str(Path(args.resume).parent)
    check_resumable(args.resume, ckpt, explicit, merged)
    ckpt["explicit"] = set(explicit)  # the flags typed now (an explicit --lr resets the LR on restore)
    return apply_recipe(absolute_paths(argparse.Namespace(**merged))), ckpt


def check_resumable(path, ckpt, explicit, merged):
    """One-line errors for a resume that cannot go on as asked."""
    state, saved = ckpt["train"], ckpt["train"]["args"]
    fixed = dict(
        preset=saved["preset"],
        image_size=ckpt["config"]["image_size"],
        recipe=saved.get("recipe", "original"),
        prediction=ckpt["config"].get("prediction", "eps"),
        class_cond="num_classes" in ckpt["config"],
        input_scale=ckpt["config"].get("input_scale", 1.0),
        signal_rates=list(ckpt["config"].get("signal_rates", SIGNAL_RATES)),
        widths=ckpt["config"]["widths"],
        block_depth=ckpt["config"]["block_depth"],
        **{k: ckpt["config"].get(k, v) for k, v in NETWORK_OPTIONS.items()},
    )
    for name, used in fixed.items():
        if name in explicit and explicit[name] != used:
            raise UserError(f"--{name.replace('_', '-')} cannot change on --resume (the run used {used})")
    if merged["epochs"] <= state["epoch"]:
        raise UserError(
            f"{path} is at the end of epoch {state['epoch']} already: "
            f"pass --epochs N with N > {state['epoch']} to train on"
        )
    if budget_spent(state, merged.get("max_steps"), merged.get("max_minutes")):
        flag = "--max-steps" if merged.get("max_steps") else "--max-minutes"
        raise UserError(
            f"{path} has trained {state['global_step']} steps ({trained_minutes(state):.1f} minutes) "
            f"already, its budget: pass a larger {flag} to train on"
        )
    if state["bad_epochs"] >= merged["early_stop"]:
        raise UserError(
            f"{path} stopped early (no new best loss for {state['bad_epochs']} epochs): "
            "pass a larger --early-stop to train on"
        )


def apply_recipe(args):
    """Flags not given take their values from --recipe."""
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def absolute_paths(args):
    """The folder flags as absolute paths (~ expanded), which is how the checkpoint keeps them.
    Paths that older checkpoints saved relative are read from the current folder, as before."""
    for key in PATHS:
        if getattr(args, key):
            setattr(args, key, os.path.abspath(os.path.expanduser(getattr(args, key))))
    return args


def check_args(args, ctx, device):
    """One-line errors for values no run can use."""
    check_at_least(args, epochs=1, batch_size=1, save_every=1, sample_every=1, num_samples=1, sample_steps=1)
    check_at_least(args, num_workers=0, early_stop=1, lr_patience=0, min_lr=0.0)
    check_at_least(args, eval_every=0, eval_samples=3, eval_steps=1)
    if not 0.0 < args.label_dropout < 1.0:  # guidance and class-free samples need the "no class" vector
        raise UserError(f"--label-dropout must be in (0, 1), got {args.label_dropout}")
    if args.class_cond and args.literal:
        raise UserError("--class-cond trains on the fast path only: drop --literal")
    need = MIN_EVALUATIONS[args.sampler]
    if min(args.sample_steps, args.eval_steps) < need:
        raise UserError(f"--sample-steps and --eval-steps must be >= {need} for --sampler {args.sampler}")
    check_at_least(args, weight_decay=0.0, warmup_steps=0, lr_decay_steps=1, min_snr_gamma=0.0, ema_power=0.0)
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.input_scale is not None and not (math.isfinite(args.input_scale) and args.input_scale > 0):
        raise UserError(f"--input-scale must be a finite number > 0, got {args.input_scale}")
    if args.signal_rates is not None:
        try:
            check_signal_rates(args.signal_rates)
        except ValueError as e:
            raise UserError(f"--signal-rates: {e}") from None
    if not 0.0 < args.lr_cooldown <= 1.0:
        raise UserError(f"--lr-cooldown must be in (0, 1], got {args.lr_cooldown}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UserError(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.max_steps and args.max_minutes:
        raise UserError("--max-steps and --max-minutes are two budgets for one run: give one of them")
    if not (0.0 <= args.ema_decay < 1.0 and 0.0 < args.lr_factor < 1.0):
        raise UserError(
            f"--ema-decay must be in [0, 1) and --lr-factor in (0, 1), got {args.ema_decay}, {args.lr_factor}"
        )
    if args.best_by == "kid" and args.eval_every < 1:
        raise UserError("--best-by kid needs --eval-every N")
    if args.sync_bn and ctx.active and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU processes)")


def train(args, resumed, stop, ctx=distributed.ALONE):
    """Run (or continue) a training run; returns its lib.training.Training (network, EMA, ...).
    ctx: this process's place under torchrun (rank 0 of 1 when run alone)."""
    device, precision = setup(ctx.device or args.device, args.precision)
    if args.literal and args.precision == "auto":
        precision = literal_precision(device)
    init = None
    if args.init_from and not resumed:  # checked whole (weights against config) before any data loads
        init = load_model(args.init_from, image_size=args.image_size)[1]
        init.pop("train", None)  # a last.pt's optimizer state is not needed
    cfg = resumed["config"] if resumed else new_config(args, init)  # a resumed run keeps its network
    torch.manual_seed(args.seed)
    if args.dry_run:
        return dry_run(args, cfg, device, precision, ctx)
    check_args(args, ctx, device)
    tune_for_training(device)
    # Rank 0 writes: it holds the folder's lock, taken now if the folder exists (before its files
    # are checked and the data loads), else once it is made. Released when train() returns.
    lock = lock_run_folder(args.out_dir) if ctx.is_main and Path(args.out_dir).is_dir() else None
    out_dir = check_out_dir(args, resumed)
    run = TrainingRun(args, cfg, resumed, ctx, device, precision, out_dir, init)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and lock is None:
        lock = lock_run_folder(out_dir)
    stop.arm()
    while run.state["epoch"] < args.epochs:
        epoch = run.state["epoch"] + 1  # 1-based for people
        reached_end = run.train_epoch(stop)
        run.check_diverged(reached_end)  # before anything of the epoch is saved
        interrupted = distributed.any_rank(stop.requested, ctx, device)
        why = run.halt_reason(interrupted)  # a stop request, the time budget, or "" to go on
        if why and not reached_end:
            run.save("last.pt", own_bn=not interrupted)
            run.log(f"{why} in epoch {epoch} after {run.state['images_done']} images; {run.resume_hint()}")
            return run.training
        run.end_epoch(interrupted)
        if run.early_stopped():
            run.log(f"early stop: no new best loss for {args.early_stop} epochs")
            break
        if why and epoch < args.epochs:
            run.log(f"{why} after epoch {epoch}; {run.resume_hint()}")
            return run.training
        if interrupted:
            run.log(
                "stop request in the last epoch: its sample grid and KID were skipped, the run is complete"
            )
    run.log_done()
    return run.training


def new_config(args, init):
    """A new run's network config: the preset's, or that of the --init-from checkpoint `init`,
    whose prediction and classes the run then keeps (args updated to say so)."""
    try:
        if init is None:
            options = {k: getattr(args, k) for k in NETWORK_OPTIONS}
            cfg = model_config(args.preset, args.image_size, args.widths, args.block_depth, **options)
        else:  # load_model has checked the config and the --image-size override
            cfg = dict(init["config"])
            cfg.pop("distilled", None)  # trained on the diffusion loss, a student paints at any steps again
            for key, default in dict(NETWORK_OPTIONS, widths=None, block_depth=None).items():
                if getattr(args, key) not in (None, cfg.get(key, default)):
                    flag = "--" + key.replace("_", "-")
                    raise UserError(f"{flag}: --init-from {args.init_from} has {cfg.get(key, default)}")
            if args.class_cond and not cfg.get("num_classes"):
                raise UserError(f"--class-cond: {args.init_from} is an unconditional model")
            args.prediction, args.class_cond = cfg.get("prediction", "eps"), bool(cfg.get("num_classes"))
            args.preset = None  # the network is the checkpoint's
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.prediction != "eps":  # what the output means travels with the network
        cfg["prediction"] = args.prediction
    # The model's space travels with the weights: absolute, so that two fine-tunes never compound.
    if args.input_scale is not None:
        cfg.pop("input_scale", None)
        if args.input_scale != 1.0:
            cfg["input_scale"] = args.input_scale
    if args.signal_rates is not None:  # the schedule's ends travel with the weights, as the scale does
        cfg.pop("signal_rates", None)
        if tuple(args.signal_rates) != SIGNAL_RATES:
            cfg["signal_rates"] = list(args.signal_rates)
    if args.class_cond:  # the names only: nothing decoded yet
        names = image_labels(args.data_root, args.image_dir, args.download)[1]
        if init and names != cfg["classes"]:
            theirs, ours = ", ".join(cfg["classes"][:3]), ", ".join(names[:3])
            raise UserError(
                f"the classes of {args.init_from} ({cfg['num_classes']}: {theirs}, ...) "
                f"are not this data's ({len(names)}: {ours}, ...)"
            )
        cfg["classes"], cfg["num_classes"] = names, len(names)
    return cfg


def dry_run(args, cfg, device, precision, ctx):
    """--dry-run: the resolved configuration and the parameter count, nothing trained."""
    if ctx.is_main:
        for k, v in sorted(vars(args).items()):
            print(f"{k}: {v}")
        print(f"device: {device}\nprecision: {precision}\nmodel: {cfg}\nprocesses: {ctx.world_size}")
        print(f"parameters: {count_parameters(build_unet(cfg))}")


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
