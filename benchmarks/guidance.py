"""The guidance sweep: a class-conditional model's samples at several classifier-free guidance
scales, from the same noise and with the real images' classes (a seeded draw), scored for quality
(KID, FID [efficientnet-lite0]) and class fidelity (top-1, top-5 of sd_eval.py's linear probe).

    python benchmarks/guidance.py --data-root data \
        --scales 0 1 1.5 2 3 5

Scale 0 is the model without a class (its unconditional samples), 1 the plain conditional model.
Prints a Markdown table (docs/sampling.md has the last one).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lib.checkpoint import load_model
from lib.classes import classes_like
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import load_images
from lib.distill import refuse_student
from lib.metrics import (
    ClassProbe,
    EfficientNetLite0,
    extract_features,
    fid,
    kid,
    reference_features,
    to_uint8,
)
from lib.normalization import model_stats
from lib.runtime import add_device_args, setup
from lib.sample import generate, initial_noise
from lib.samplers import SAMPLERS
from sd_eval import real_classes
from sd_inference import DEFAULT_CHECKPOINT, checkpoint_path


def run(args):
    check_at_least(args, num_samples=2, batch_size=1, steps=1)
    device, precision = setup(args.device, args.precision)
    args.checkpoint = checkpoint_path(args.checkpoint)
    model, ckpt = load_model(args.checkpoint, device)
    refuse_student(model, args.checkpoint, "its guidance is in its weights: a sweep of scales does not apply")
    cfg = ckpt["config"]
    if not cfg.get("num_classes"):
        raise UserError(f"{args.checkpoint} is not class-conditional (sd_train.py --class-cond)")
    real = load_images(cfg["image_size"], args.data_root, num_workers=2, cache_dir=args.cache_dir)
    extractor = EfficientNetLite0()
    real_features = reference_features(extractor, real, args.cache_dir, device)
    labels, splits = real_classes(cfg["classes"], len(real), args.data_root)
    probe = ClassProbe(real_features, labels, splits, cfg["num_classes"])
    sample_labels = classes_like(labels, args.num_samples, args.seed)
    noise = initial_noise(args.num_samples, cfg["image_size"], args.seed)
    print(
        f"{args.checkpoint}: {args.num_samples} samples ({args.sampler}, {args.steps} evaluations) vs "
        f"{len(real)} real; probe on real test images: top-1 {probe.ceiling[0]:.3f}, "
        f"top-5 {probe.ceiling[1]:.3f}"
    )
    print("| guidance | KID | FID | class top-1 | top-5 | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for scale in args.scales:
        t0 = time.perf_counter()
        images = generate(
            model,
            noise,
            *model_stats(ckpt),
            steps=args.steps,
            seed=args.seed,
            precision=precision,
            batch_size=args.batch_size,
            sampler=args.sampler,
            labels=sample_labels,
            guidance=scale,
        )
        seconds = time.perf_counter() - t0
        fake = extract_features(extractor, to_uint8(images), device=device)
        top1, top5 = probe.accuracy(fake, sample_labels)
        k, f = kid(real_features, fake, seed=args.seed)[0], fid(real_features, fake)
        print(f"| {scale:g} | {k:.4f} | {f:.1f} | {top1:.3f} | {top5:.3f} | {seconds:.0f} |", flush=True)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"a class-conditional model; default: models/{DEFAULT_CHECKPOINT.name}",
    )
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument("--scales", nargs="+", type=float, default=[0, 1, 1.5, 2, 3, 5], help="guidance scales")
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="the sampler")
    p.add_argument("--steps", type=int, default=20, help="network evaluations per sample")
    p.add_argument("--num-samples", type=int, default=1000, help="samples of each score, classes in turn")
    p.add_argument("--seed", type=int, default=0, help="of the noise and the KID subsets")
    p.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    p.add_argument("--cache-dir", default="cache", help="decoded images and real features")
    add_device_args(p, "for sampling")
    return run_cli(run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
