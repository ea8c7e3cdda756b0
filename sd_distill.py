"""Distill a trained model into a few-step student (lib/distill.py): 20 guided DDIM steps into 4.

    python sd_distill.py models/flowers64-v2-cond.pt runs/flowers64-v2-cond-4step.pt --data-root data
    python sd_inference.py --checkpoint runs/flowers64-v2-cond-4step.pt     # 4 evaluations an image

The student starts as a copy of the teacher and learns, on the training images noised to its
grid times, to make in one DDIM step what the guided teacher makes in --substeps. The output
file holds the student and, until the last step, the state to continue: the same command with
--resume goes on exactly where it stopped (the settings are the file's: a flag may repeat them but
not change them). Every --save-every steps it is rewritten (atomically), and Ctrl-C saves it and
stops (status 130).
"""

import copy
import math
import sys

import torch
from tqdm import tqdm

from lib.checkpoint import load_model, make_checkpoint, read_checkpoint, replaceable
from lib.classes import GUIDANCE
from lib.cli import ArgumentParser, StopRequest, UserError, check_at_least, run_cli
from lib.data import add_model_data_args, data_args, images_for_model
from lib.diffusion import drop_labels, unwrapped
from lib.distill import distillation_loss, distilled_of
from lib.files import atomic_save
from lib.normalization import model_stats, to_model_space
from lib.runtime import add_device_args, autocast, setup, tune_for_training
from lib.sample import num_classes

# Each setting's default; a run keeps its settings, so a --resume takes only those it was given.
DEFAULTS = dict(
    steps=4, substeps=5, guidance=None, batch_size=16, max_steps=600, lr=1e-4, label_dropout=0.1, seed=0
)


def get_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("teacher", help="the trained model (any checkpoint this repo reads)")
    p.add_argument("out", help="the student's checkpoint (and, until it is done, its training state)")
    p.add_argument("--steps", type=int, help=f"the student's DDIM steps (default {DEFAULTS['steps']})")
    p.add_argument(
        "--substeps", type=int, help=f"teacher DDIM steps per student step (default {DEFAULTS['substeps']})"
    )
    p.add_argument(
        "--guidance",
        type=float,
        help=f"class-conditional teacher: its guidance scale, which the student learns to paint at "
        f"(default {GUIDANCE}; a student as teacher keeps its own)",
    )
    p.add_argument("--batch-size", type=int, help=f"images a step (default {DEFAULTS['batch_size']})")
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"optimizer steps; the LR falls linearly to 0 (default {DEFAULTS['max_steps']})",
    )
    p.add_argument("--lr", type=float, help=f"Adam's at the first step (default {DEFAULTS['lr']:g})")
    p.add_argument(
        "--label-dropout",
        type=float,
        help=f"class-conditional: the share taught without a class (default {DEFAULTS['label_dropout']})",
    )
    p.add_argument(
        "--seed", type=int, help=f"of the images, times and noise drawn (default {DEFAULTS['seed']})"
    )
    p.add_argument("--save-every", type=int, default=50, help="steps between saves of the state")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT, at its settings")
    add_model_data_args(p)
    add_device_args(p, "auto: bf16 where the device computes it natively, else fp32")
    return p


def check_args(args):
    check_at_least(args, steps=1, substeps=2, batch_size=1, max_steps=1, save_every=1)
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.label_dropout is not None and not 0.0 <= args.label_dropout < 1.0:
        raise UserError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")


def settle(args):
    """The run's settings into args: the saved run's (--resume), which a flag may repeat but not
    change, or the flags' with DEFAULTS. -> (the saved checkpoint, its state), or (None, None)."""
    if not args.resume:
        for key, default in DEFAULTS.items():
            setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
        return None, None
    ckpt = read_checkpoint(args.out)
    if "train" not in ckpt or "distill" not in ckpt["train"]:
        raise UserError(f"{args.out} holds no distillation state to resume (is the run finished?)")
    state = ckpt["train"]["distill"]
    for key, saved in state["settings"].items():
        given = getattr(args, key)
        if given is not None and given != saved:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {given}: the run in {args.out} has {saved}, and a resumed run keeps it")
        setattr(args, key, saved)
    return ckpt, state


def distilled(args, teacher, cfg):
    """The student's config entry, and the guidance scale to run the teacher at. A student may
    teach in turn (TRACT's next phase): its guidance is in its weights, and the new student's steps
    must fall on its grid; teacher_steps stays the DDIM steps of the first teacher."""
    before = distilled_of(teacher)
    if before is None:
        if not cfg.get("num_classes"):
            if args.guidance is not None:
                raise UserError(f"--guidance: {args.teacher} is unconditional (nothing to guide)")
            return dict(steps=args.steps, teacher_steps=args.steps * args.substeps, guidance=1.0), 1.0
        guidance = GUIDANCE if args.guidance is None else args.guidance
        return dict(steps=args.steps, teacher_steps=args.steps * args.substeps, guidance=guidance), guidance
    if args.guidance is not None:
        raise UserError(
            f"{args.teacher} is a student: it teaches at its own guidance ({before['guidance']:g})"
        )
    if args.steps * args.substeps != before["steps"]:
        raise UserError(
            f"{args.teacher} takes {before['steps']} steps: --steps x --substeps must make them, "
            f"got {args.steps} x {args.substeps}"
        )
    return dict(before, steps=args.steps), 1.0


def network(model):
    """The U-Net inside a noise-predictor wrapper (EpsFromV), whose weights the file holds."""
    return unwrapped(model, "signal_rates")


def save(args, ckpt, info, student, step, optimizer, generator):
    """The student into OUT, with the state to continue until its last step (atomic)."""
    cfg = dict(ckpt["config"], distilled=info)
    train = None
    if step < args.max_steps:
        state = dict(settings={key: getattr(args, key) for key in DEFAULTS}, teacher=args.teacher, step=step)
        state |= dict(optimizer=optimizer.state_dict(), generator=generator.get_state())
        train = dict(distill=dict(state, device=generator.device.type))
    norm = ckpt["norm"]
    atomic_save(
        make_checkpoint(cfg, norm["mean"], norm["std"], network(student).state_dict(), train), args.out
    )


def start(args, device):
    """-> (teacher, its checkpoint, the student, its config entry, the teacher's guidance, Adam,
    the generator, the first step): new, or as --resume left them."""
    saved, state = settle(args)
    if saved is None:
        replaceable(args.teacher, args.out)
    teacher, ckpt = load_model(args.teacher, device)
    info, guidance = distilled(args, teacher, ckpt["config"])
    student = copy.deepcopy(teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    g = torch.Generator(device).manual_seed(args.seed)
    if saved is None:
        return teacher, ckpt, student, info, guidance, optimizer, g, 0
    if dict(saved["config"], distilled=None) != dict(ckpt["config"], distilled=None):  # the same network
        raise UserError(
            f"{args.teacher} is not the teacher of {args.out} (the run started from {state['teacher']})"
        )
    if state["device"] != device.type:
        raise UserError(f"the run in {args.out} ran on {state['device']}: resume it there (--device)")
    network(student).load_state_dict(saved["ema"])
    optimizer.load_state_dict(state["optimizer"])
    g.set_state(state["generator"])
    return teacher, ckpt, student, info, guidance, optimizer, g, state["step"]


def run(args):
    check_args(args)
    device, precision = setup(args.device, args.precision)
    tune_for_training(device)
    teacher, ckpt, student, info, guidance, optimizer, g, first = start(args, device)
    # The student keeps the teacher's BatchNorm statistics (eval mode) while it learns, so it
    # trains exactly as it will sample, image by image, whatever the batch.
    student.eval().requires_grad_(True)
    teacher.requires_grad_(False)
    images, labels = images_for_model(ckpt["config"], args.teacher, **data_args(args))
    mean, std = model_stats(ckpt)
    classes = num_classes(teacher)
    stop = StopRequest()
    stop.arm()
    bar = tqdm(range(first, args.max_steps), initial=first, total=args.max_steps, desc="distill")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1 - step / args.max_steps)
        picked = torch.randint(0, len(images), (args.batch_size,), generator=g, device=device).cpu()
        x0 = to_model_space(images[picked].to(device), mean, std)
        batch_labels = None
        if classes:
            batch_labels = drop_labels(labels[picked].to(device), args.label_dropout, g, classes)
        with autocast(device, precision):
            loss = distillation_loss(
                student, teacher, x0, args.steps, args.substeps, g, batch_labels, guidance
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done, stopping = step + 1, stop.requested
        if done == args.max_steps or done % args.save_every == 0 or stopping:
            save(args, ckpt, info, student, done, optimizer, g)
        if stopping:
            stop.restore()
            raise KeyboardInterrupt
    stop.restore()
    print(f"wrote {args.out}: a {args.steps}-step student of {args.teacher} after {args.max_steps} steps")


def main(argv=None):
    return run_cli(run, get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
