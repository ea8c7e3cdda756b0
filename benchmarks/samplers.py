"""Quality against network evaluations: every sampler at every evaluation count, one model, the
same noise, one table (KID and FID [efficientnet-lite0], seconds of sampling on this machine).

    python benchmarks/samplers.py --data-root data \
        --samplers ddim dpm++2m heun --evaluations 5 10 20 50

Prints a Markdown table (docs/sampling.md has the last one). --spacing compares the time grids of the
second-order samplers (DDIM keeps its own, uniform in t). A class-conditional model samples the
real images' classes (a seeded draw) at --guidance, as sd_eval.py does; a guided evaluation is one
network call on a batch of two.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.checkpoint import load_model
from lib.classes import GUIDANCE, classes_like
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import load_images
from lib.distill import refuse_student
from lib.metrics import EfficientNetLite0, extract_features, fid, kid, reference_features, to_uint8
from lib.normalization import model_stats
from lib.runtime import add_device_args, setup
from lib.sample import generate, initial_noise
from lib.samplers import DEFAULT_SPACING, MIN_EVALUATIONS, SAMPLERS, SPACINGS
from sd_eval import real_classes
from sd_inference import DEFAULT_CHECKPOINT, checkpoint_path


def score(model, ckpt, sampler, evaluations, real_features, extractor, args, precision, device, labels):
    """-> (KID, FID, seconds of sampling) of --num-samples images (of these classes, or None)."""
    noise = initial_noise(args.num_samples, ckpt["config"]["image_size"], args.seed)
    t0 = time.perf_counter()
    images = generate(
        model,
        noise,
        *model_stats(ckpt),
        steps=evaluations,
        seed=args.seed,
        precision=precision,
        batch_size=args.batch_size,
        sampler=sampler,
        spacing=args.spacing,
        labels=labels,
        guidance=args.guidance,
    )
    seconds = time.perf_counter() - t0
    fake = extract_features(extractor, to_uint8(images), device=device)
    return kid(real_features, fake, seed=args.seed)[0], fid(real_features, fake), seconds


def run(args):
    check_at_least(args, num_samples=2, batch_size=1)
    if args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    for s in args.samplers:
        if s not in SAMPLERS:
            raise UserError(f"unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
        if min(args.evaluations) < MIN_EVALUATIONS[s]:
            raise UserError(f"{s} needs at least {MIN_EVALUATIONS[s]} evaluations")
    device, precision = setup(args.device, args.precision)
    args.checkpoint = checkpoint_path(args.checkpoint)
    model, ckpt = load_model(args.checkpoint, device)
    refuse_student(
        model,
        args.checkpoint,
        "it samples at its own ddim steps only",
    )
    size = ckpt["config"]["image_size"]
    real = load_images(size, args.data_root, num_workers=2, cache_dir=args.cache_dir)
    extractor = EfficientNetLite0()
    real_features = reference_features(extractor, real, args.cache_dir, device)
    labels, how = None, ""
    if ckpt["config"].get("num_classes"):
        real_labels = real_classes(ckpt["config"]["classes"], len(real), args.data_root)[0]
        labels = classes_like(real_labels, args.num_samples, args.seed)
        how = f", classes as the real images', guidance {args.guidance:g}"
    grid = args.spacing or DEFAULT_SPACING
    print(f"{args.checkpoint}, {args.num_samples} samples vs {len(real)} real at {size} px; grid {grid}{how}")
    print("| sampler | evaluations | KID | FID | seconds |\n| --- | ---: | ---: | ---: | ---: |", flush=True)
    for sampler in args.samplers:
        for n in args.evaluations:
            k, f, sec = score(
                model, ckpt, sampler, n, real_features, extractor, args, precision, device, labels
            )
            print(f"| {sampler} | {n} | {k:.4f} | {f:.1f} | {sec:.0f} |", flush=True)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint", default=None, help=f"the model to sample; default: models/{DEFAULT_CHECKPOINT.name}"
    )
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), help="which samplers")
    p.add_argument("--evaluations", nargs="+", type=int, default=[5, 10, 20, 50], help="network evaluations")
    p.add_argument("--spacing", default=None, choices=SPACINGS, help="time grid of dpm++2m and heun")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="of a class-conditional model")
    p.add_argument("--num-samples", type=int, default=1000, help="samples of each score")
    p.add_argument("--seed", type=int, default=0, help="of the noise and the KID subsets")
    p.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    p.add_argument("--cache-dir", default="cache", help="decoded images and real features")
    add_device_args(p, "for sampling")
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
