"""Distill a trained model into a few-step student (lib/distill.py): 20 guided DDIM steps into 4.

    python sd_distill.py models/flowers64-v2-cond.pt runs/flowers64-v2-cond-4step.pt --data-root data
    python sd_inference.py --checkpoint runs/flowers64-v2-cond-4step.pt     # 4 evaluations an image

The student starts as a copy of the teacher and learns, on the training images noised to its
grid times, to make in one DDIM step what the guided teacher makes in --substeps. The output
file holds the student and, until the last step, the state to continue with --resume; every
--save-every steps it is rewritten (atomically), and Ctrl-C saves it and stops (status 130).
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
from lib.diffusion import EpsFromV, drop_labels
from lib.distill import distillation_loss, distilled_of
from lib.files import atomic_save
from lib.normalization import model_stats, to_model_space
from lib.runtime import add_device_args, autocast, setup, tune_for_training
from lib.sample import num_classes

SETTINGS = ("steps", "substeps", "guidance", "batch_size", "max_steps", "lr", "label_dropout", "seed")


def get_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("teacher", help="the trained model (any checkpoint this repo reads)")
    p.add_argument("out", help="the student's checkpoint (and, until it is done, its training state)")
    p.add_argument("--steps", type=int, default=4, help="the student's DDIM steps")
    p.add_argument("--substeps", type=int, default=5, help="teacher DDIM steps per student step")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"class-conditional teacher: its guidance scale, which the student learns to paint at "
        f"(default {GUIDANCE}; a student as teacher keeps its own)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps; the LR falls linearly to 0")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam's at the first step")
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="class-conditional: the share of images taught without a class (the teacher unguided)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50, help="steps between saves of the state")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT (its settings)")
    add_model_data_args(p)
    add_device_args(p, "auto: bf16 where the device computes it natively, else fp32")
    return p


def check_args(args):
    check_at_least(args, steps=1, substeps=2, batch_size=1, max_steps=1, save_every=1)
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0.0 <= args.label_dropout < 1.0:
        raise UserError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")


def resume_state(args):
    """--resume: the saved run's state, its settings put back into args."""
    ckpt = read_checkpoint(args.out)
    if "train" not in ckpt or "distill" not in ckpt["train"]:
        raise UserError(f"{args.out} holds no distillation state to resume (is the run finished?)")
    state = ckpt["train"]["distill"]
    for key in SETTINGS:
        setattr(args, key, state["settings"][key])
    if state["teacher"] != args.teacher:
        print(f"note: the run was started from {state['teacher']}; continuing with {args.teacher}")
    return ckpt, state


def distilled(args, teacher, cfg):
    """The student's config entry, and the guidance scale to run the teacher at. A student may
    teach in turn (TRACT's next phase): its guidance is in its weights, and the new student's steps
    must fall on its grid."""
    before = distilled_of(teacher)
    if before is None:
        guidance = (GUIDANCE if args.guidance is None else args.guidance) if cfg.get("num_classes") else 1.0
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


def save(args, ckpt, info, student, step, optimizer, generator):
    net = student.net if isinstance(student, EpsFromV) else student
    cfg = dict(ckpt["config"], distilled=info)
    train = None
    if step < args.max_steps:
        settings = {key: getattr(args, key) for key in SETTINGS}
        train = dict(
            distill=dict(
                settings=settings,
                teacher=args.teacher,
                step=step,
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
            )
        )
    norm = ckpt["norm"]
    atomic_save(make_checkpoint(cfg, norm["mean"], norm["std"], net.state_dict(), train), args.out)


def run(args):
    check_args(args)
    resumed, state = resume_state(args) if args.resume else (None, None)
    if not args.resume:
        replaceable(args.teacher, args.out)
    device, precision = setup(args.device, args.precision)
    tune_for_training(device)
    teacher, ckpt = load_model(args.teacher, device)
    info, guidance = distilled(args, teacher, ckpt["config"])
    student = copy.deepcopy(teacher)
    if resumed is not None:
        inner = student.net if isinstance(student, EpsFromV) else student
        inner.load_state_dict(resumed["ema"])
    # The student keeps the teacher's BatchNorm statistics (eval mode) while it learns, so it
    # trains exactly as it will sample, image by image, whatever the batch.
    student.eval().requires_grad_(True)
    teacher.requires_grad_(False)
    images, labels = images_for_model(ckpt["config"], args.teacher, **data_args(args))
    mean, std = model_stats(ckpt)
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    g = torch.Generator(device).manual_seed(args.seed)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        step = state["step"]
    classes = num_classes(teacher)
    stop = StopRequest()
    stop.arm()
    bar = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, desc="distill")
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
