"""Where a training step's time goes, for each system of benchmarks/peers.py, on this machine.

    python benchmarks/peer_profile.py

Each system takes a few warm-up steps on random images, then --steps timed steps and as many
under torch.profiler. Each op's own time goes to the first category whose fragment its name holds;
the FLOPs of a step are counted by torch.utils.flop_counter (in fp32: in bf16 on a CPU this
project's fused convolutions are invisible to it).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peer_systems import PEERS, missing_packages
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.runtime import setup, tune_for_training
from lib.training import Training
from lib.unet import model_config
from sd_train import RECIPES

CATEGORIES = (  # (name, fragments of aten op names); the first match wins, the rest is "other"
    ("convolution", ("conv",)),
    ("attention, linear", ("mm", "softmax", "attention", "linear")),
    ("normalization", ("norm",)),
    ("optimizer, EMA", ("adam", "foreach", "lerp")),
)
# This project's two systems in the benchmark: (preset, batch, recipe of sd_train.py).
OURS = {"original": ("flowers64", 64, "original"), "best": ("flowers64-v2", 32, "improved")}


def build(name, precision, image_size, generator):
    """-> (step function taking a batch in [-1, 1], batch size)."""
    if name in PEERS:
        options = dict(widths=[32, 64, 96, 128]) if name == "diffusers" else dict(dim=24)
        system = PEERS[name](total_steps=10**6, image_size=image_size, sampling_steps=20, seed=0, **options)
        return (lambda x: system.train_step(x, precision)), system.batch_size
    preset, batch, recipe = OURS[name]
    r = RECIPES[recipe]
    cfg = dict(model_config(preset), image_size=image_size)
    objective = dict(loss=r["loss"], min_snr_gamma=r["min_snr_gamma"], prediction=r["prediction"])
    run = Training(cfg, torch.device("cpu"), precision, r["lr"], optimizer=r["optimizer"],
                   weight_decay=r["weight_decay"], objective=objective)  # fmt: skip
    return (lambda x: run.step(x, generator, 0.995)), batch


def category(op):
    return next((name for name, parts in CATEGORIES if any(p in op for p in parts)), "other")


def profile(name, args, precision):
    """One system -> its row: batch, images/s, GFLOP per image, and ms per image by category."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    generator = torch.Generator().manual_seed(0)
    step, batch = build(name, precision, args.image_size, generator)
    x = torch.rand(batch, 3, args.image_size, args.image_size, generator=generator) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(args.warmup):
        step(x)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(x)
    seconds = (time.perf_counter() - t0) / args.steps
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step(x)
    ms = {}
    for event in prof.key_averages():
        key = category(event.key.lower())
        ms[key] = ms.get(key, 0.0) + event.self_cpu_time_total / 1e3 / args.steps / batch
    fp32_step, _ = build(name, "fp32", args.image_size, generator)
    with FlopCounterMode(display=False) as counter:
        fp32_step(x)
    return dict(
        system=name,
        batch=batch,
        images_per_s=batch / seconds,
        gflop=counter.get_total_flops() / batch / 1e9,
        ms=ms,
    )


def run(args):
    check_at_least(args, steps=1, warmup=0)
    missing = missing_packages([name for name in args.systems if name in PEERS])
    if missing:
        raise UserError(
            f"the peers' packages are not installed ({missing}): pip install -r requirements-peers.txt"
        )
    device, precision = setup("cpu")
    tune_for_training(device)
    rows = []
    for name in args.systems:
        rows.append(profile(name, args, precision))
        print(f"{name}: {rows[-1]['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    names = [c for c, _ in CATEGORIES] + ["other"]
    print(f"\n{precision}, {torch.get_num_threads()} threads, {args.image_size} px; ms per training image:\n")
    print("| system | batch | images/s | GFLOP/image | GFLOP/s | " + " | ".join(names) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(names))
    for r in rows:
        cells = " | ".join(f"{r['ms'].get(c, 0.0):.1f}" for c in names)
        speed = f"{r['images_per_s']:.1f} | {r['gflop']:.2f} | {r['gflop'] * r['images_per_s']:.0f}"
        print(f"| {r['system']} | {r['batch']} | {speed} | {cells} |")


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    choices = [*PEERS, *OURS]
    p.add_argument("--systems", nargs="+", default=choices, choices=choices, help="which to profile")
    p.add_argument("--steps", type=int, default=5, help="timed steps, and as many profiled")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--image-size", type=int, default=64, help="pixels a side")
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
