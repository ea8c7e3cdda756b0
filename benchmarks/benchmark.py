"""Speed of the original's way (literal path) against this repo's fast path, in one process.

    python benchmarks/benchmark.py --data-root data

For each preset, in alternating rounds (so drifts in clock speed or load hit both sides alike):
  train   images/s of full optimisation steps on real Flowers102 batches, loader included
          (literal: worker processes decode JPEGs; fast: images decoded once, indexed on device)
  sample  images/s of 20-step DDIM (literal: fp32 NCHW under no_grad, as the original's
          inference script; fast: lib.sample.generate)
  memory  working memory of each phase (resident memory on CPU, allocated on CUDA), measured
          after the timed rounds in a pass of its own
  MFU     (GPU) model FLOPs of a training step (torch.utils.flop_counter) x steps/s / bf16 peak
"""

import ctypes
import ctypes.util
import gc
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import DecodedBatches, JpegBatches, epoch_order, load_images
from lib.diffusion import ddim_sample, training_loss
from lib.normalization import FLOWERS_MEAN, FLOWERS_STD, to_model_space
from lib.runtime import add_device_args, literal_precision, setup, tune_for_training
from lib.sample import generate, initial_noise
from lib.training import Training
from lib.unet import PRESETS, model_config

# Dense 16-bit tensor-core peaks (FLOP/s) from the vendors' data sheets, by a fragment of the
# device name (the longest matching one counts): bf16, or fp16 on V100/T4, which have no bf16.
GPU_PEAK = {
    "H200": 989e12,
    "H100": 989e12,
    "H100 PCIe": 756e12,
    "H200 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}

LOOKAHEAD = 2  # batches each loader worker prepares ahead (DataLoader's prefetch_factor)

LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


class PeakMemory:
    """Working memory of the block: its peak above what was held at the start (models, optimizer
    states and data of both paths stay alive between phases). CUDA: the allocator's peak minus
    its allocation at the start. CPU: the process's RSS (sampled every 2 ms), after freed heap
    memory was handed back to the OS; Linux only (/proc). Elsewhere `peak` is None."""

    def __init__(self, device):
        self.device = device
        self.start = self.peak = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif self.device.type == "cpu" and Path("/proc/self/statm").is_file():
            gc.collect()
            if LIBC is not None:
                LIBC.malloc_trim(0)
            self.start = rss()
            self.peak, self.running = self.start, True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.peak -= self.start


def gpu_peak(name):
    matches = [k for k in GPU_PEAK if k in name]
    return GPU_PEAK[max(matches, key=len)] if matches else None


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def megabytes(n_bytes):
    return "-" if n_bytes is None else f"{n_bytes / 2**20:.0f}"


def time_training(run, data, n_images, batch, steps, warmup, epoch, device):
    """Seconds for `steps` training steps after `warmup` steps of the same batch stream. The
    stream goes on past the timed steps (the images are counted for that): a loader's workers
    keep decoding ahead through all of them, as in the middle of an epoch, instead of falling
    idle for the last ones."""
    order = epoch_order(n_images, epoch, seed=epoch).split(batch)
    gen = torch.Generator(device).manual_seed(epoch)
    for i, images in enumerate(data.batches(order)):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        run.step(to_model_space(images, FLOWERS_MEAN, FLOWERS_STD, gen), gen, 0.999)
    sync(device)
    return time.perf_counter() - t0


def sample_literal(model, noise, steps):
    """The original's inference: fp32, NCHW, autograd off (not inference mode)."""
    with torch.no_grad():
        ddim_sample(model, noise.to(next(model.parameters()).device), steps=steps)


def train_flops(run, cfg, batch, device):
    """FLOPs of one forward + backward pass, counted on the plain network: torch.compile'd code
    first run under the counter's dispatch mode stays at eager speed and memory afterwards. Adam
    and the EMA are elementwise: no FLOPs by this count. Counted in fp32 (FLOPs do not depend on
    the precision): in bf16 on a CPU the blocks' convolutions run as fused oneDNN calls, which the
    counter does not know (lib/cpu_fusion.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    x0 = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)
    with FlopCounterMode(display=False) as counter:
        training_loss(run.model, x0, torch.Generator(device).manual_seed(0)).backward()
    run.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} cores, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name()} ({text})"
    return text


def build_sides(preset, cfg, args, device, precision, steps, n_images):
    """-> {path name: (Training, loader, precision)}: the literal path (JPEG workers) and the fast
    one (decoded images); with --parts also the literal path in fp32 and the fast path with one
    part changed at a time."""
    jpegs = JpegBatches(
        cfg["image_size"],
        device,
        args.num_workers,
        data_root=args.data_root,
        download=args.download,
        limit=n_images,
    )
    if len(jpegs) < n_images:
        raise UserError(
            f"{preset}: {steps} timed + {args.warmup} warm-up steps of {args.batch} (and the loader's "
            f"lookahead) need {n_images} images, the data has {len(jpegs)}: "
            "lower --steps, --warmup or --batch"
        )
    decoded = DecodedBatches(load_images(cfg["image_size"], args.data_root, limit=n_images), device)
    literal = literal_precision(device)
    sides = {
        "literal": (Training(cfg, device, literal, 3e-4, literal=True), jpegs, literal),
        "fast": (Training(cfg, device, precision, 3e-4, compile=args.compile), decoded, precision),
    }
    if args.parts:
        sides["literal, fp32"] = (Training(cfg, device, "fp32", 3e-4, literal=True), jpegs, "fp32")
        other = "fp32" if precision != "fp32" else literal
        sides[f"fast, {other}"] = (Training(cfg, device, other, 3e-4), decoded, other)
        nchw = Training(cfg, device, precision, 3e-4)
        for net in (nchw.model, nchw.ema):
            net.to(memory_format=torch.contiguous_format)
        nchw.memory_format = torch.contiguous_format
        sides["fast, NCHW"] = (nchw, decoded, precision)
        sides["fast, JPEG loader"] = (Training(cfg, device, precision, 3e-4), jpegs, precision)
    return sides


def time_sampling(name, run, noise, precision, device):
    """images/s of 20-step DDIM with the side's EMA network."""
    run.ema.eval()
    t0 = time.perf_counter()
    if name.startswith("literal"):
        sample_literal(run.ema, noise, 20)
    else:
        generate(run.ema, noise, FLOWERS_MEAN, FLOWERS_STD, steps=20, precision=precision)
    sync(device)
    return len(noise) / (time.perf_counter() - t0)


def measure(preset, sides, args, steps, n_images, noise, device):
    """Alternating timed rounds of all sides, then a memory pass -> {side: measurements}."""
    results = {name: dict(train=[], sample=[]) for name in sides}
    for r in range(args.rounds):
        for name, (run, data, precision) in sides.items():
            seconds = time_training(run, data, n_images, args.batch, steps, args.warmup, r, device)
            results[name]["train"].append(args.batch * steps / seconds)
            results[name]["sample"].append(time_sampling(name, run, noise, precision, device))
            print(
                f"  {preset} round {r + 1} {name}: train {results[name]['train'][-1]:.2f} img/s, "
                f"sample {results[name]['sample'][-1]:.2f} img/s",
                file=sys.stderr,
            )
    # Memory in a pass of its own: the CPU's RSS sampling thread would slow the timed rounds.
    for name, (run, data, precision) in sides.items():
        with PeakMemory(device) as mem:
            time_training(run, data, n_images, args.batch, steps, args.warmup, args.rounds, device)
        results[name]["train_mem"] = mem.peak
        with PeakMemory(device) as mem:
            time_sampling(name, run, noise, precision, device)
        results[name]["sample_mem"] = mem.peak
    return results


def bench_preset(preset, args, device, precision):
    """Both paths of one preset (and --parts' variants) -> a table row each (the best round of
    each: least disturbed)."""
    cfg = model_config(preset)
    small = cfg["image_size"] <= 64  # the 64 px presets time in seconds on a CPU
    steps = args.steps or (20 if small or device.type == "cuda" else 4)
    n_images = args.batch * (steps + args.warmup + LOOKAHEAD * args.num_workers)
    sides = build_sides(preset, cfg, args, device, precision, steps, n_images)
    flops_per_image = train_flops(sides["fast"][0], cfg, 2, device) / 2  # FLOPs grow linearly with the batch
    n_sample = args.sample_images or (64 if device.type == "cuda" else 16 if small else 4)
    noise = initial_noise(n_sample, cfg["image_size"], seed=0)
    results = measure(preset, sides, args, steps, n_images, noise, device)
    peak = gpu_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None
    rows = []
    for name, res in results.items():
        train_ips = max(res["train"])
        tflops = flops_per_image * train_ips / 1e12
        rows.append(
            dict(
                preset=preset,
                batch=args.batch,
                path="fast, compiled" if name == "fast" and args.compile else name,
                precision=sides[name][2],
                train=train_ips,
                sample=max(res["sample"]),
                train_mem=megabytes(res["train_mem"]),
                sample_mem=megabytes(res["sample_mem"]),
                tflops=tflops,
                mfu=f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "-",
            )
        )
    return rows


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download Flowers102 into --data-root"
    )
    p.add_argument(
        "--presets",
        nargs="+",
        default=["flowers64", "sd128"],
        choices=sorted(PRESETS),
        help="networks to measure",
    )
    add_device_args(p, "the fast path's precision")
    p.add_argument("--batch", type=int, default=64, help="training batch (64 is the original's)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed training steps a round (default 20; sd128 on CPU 4)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed round")
    p.add_argument(
        "--rounds", type=int, default=2, help="timed rounds per path, interleaved; the best counts"
    )
    p.add_argument(
        "--sample-images",
        type=int,
        default=None,
        help="images sampled a round (default: 64 on a GPU; CPU 16, sd128 4)",
    )
    p.add_argument(
        "--num-workers", type=int, default=4, help="the literal loader's processes (the original: 4)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    p.add_argument(
        "--parts",
        action="store_true",
        help="also time literal in fp32, fast in its other precision, in NCHW, with JPEG workers",
    )
    return run_cli(run, p.parse_args(argv))


def run(args):
    check_at_least(args, batch=1, steps=1, sample_images=1, rounds=1, warmup=0, num_workers=0)
    device, precision = setup(args.device, args.precision)
    tune_for_training(device)
    print(f"machine: {machine(device)}", file=sys.stderr)
    rows = [row for preset in args.presets for row in bench_preset(preset, args, device, precision)]
    mem = "working GPU memory MB" if device.type == "cuda" else "working memory MB"
    print(f"\nMachine: {machine(device)}\n")
    print(
        "| preset | batch | path | precision | train img/s | x | sample img/s (20 steps) | x | "
        f"{mem} train / sample | train TFLOP/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["preset"] == row["preset"] and r["path"] == "literal")
        print(
            f"| {row['preset']} | {row['batch']} | {row['path']} | {row['precision']} | {row['train']:.1f} | "
            f"{row['train'] / base['train']:.2f} | {row['sample']:.1f} | "
            f"{row['sample'] / base['sample']:.2f} | "
            f"{row['train_mem']} / {row['sample_mem']} | {row['tflops']:.2f} | {row['mfu']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
