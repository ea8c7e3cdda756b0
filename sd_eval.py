"""Score sample quality: KID and FID of generated flowers against the real Flowers102 images.

    python sd_eval.py --checkpoint models/flowers64-v2-cond.pt --num-samples 1000 --data-root data
    python sd_eval.py --checkpoint models/flowers64-v2-cond.pt --floor   # and what real images score
    python sd_eval.py --samples-dir my_samples/                       # score a folder of images
    python sd_eval.py --checkpoint cond.pt --class-fidelity           # a class-conditional model

The real images are prepared exactly as for training (resize, center crop to the model's size).
Lower is better for both; read them against the floor (--floor): two sets of real images of the
same size score the floor, not zero (FID is biased upwards at small N; KID is unbiased, ~0).
A class-conditional model's samples take the real images' classes (a seeded draw), guided by --guidance.
"""

import sys
import time

import torch
from PIL import Image

from lib.checkpoint import load_model
from lib.classes import GUIDANCE, classes_like
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import ImageFiles, check_all_read, image_labels, load_images
from lib.distill import distilled_of, sampling_settings
from lib.metrics import (
    EXTRACTORS,
    ClassProbe,
    build_extractor,
    extract_features,
    fid,
    kid,
    reference_features,
    to_uint8,
)
from lib.normalization import model_stats
from lib.runtime import add_device_args, setup
from lib.sample import generate, initial_noise
from lib.samplers import add_sampler_args, check_sampler_args


def get_parser():
    p = ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_argument_group("what to score (one of)")
    src.add_argument("--checkpoint", default=None, help="generate samples from this checkpoint")
    src.add_argument("--samples-dir", default=None, help="score the images in this folder instead")
    p.add_argument("--num-samples", type=int, default=1000, help="samples generated and scored")
    add_sampler_args(p)
    p.add_argument("--seed", type=int, default=0, help="of the sample noise and the KID subsets")
    cond = p.add_argument_group("class-conditional models (sd_train.py --class-cond)")
    cond.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale of the samples (default {GUIDANCE}; 0: unconditional)",
    )
    cond.add_argument(
        "--class-fidelity",
        action="store_true",
        help="also read the samples' classes with a linear probe of the feature space, fitted on the "
        "real train and val images, against its accuracy on the real test images",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default: the checkpoint's, or the --samples-dir images' own (all square, one size); "
        "64 with --floor alone",
    )
    p.add_argument("--floor", action="store_true", help="also score N held-out real images against the rest")
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download Flowers102 into --data-root"
    )
    p.add_argument("--image-dir", default=None, help="real images from this folder instead of Flowers102")
    p.add_argument(
        "--extractor",
        default="efficientnet-lite0",
        choices=EXTRACTORS,
        help="feature space: efficientnet-lite0 (offline) or inception (the FID standard)",
    )
    p.add_argument(
        "--inception-weights", default=None, help="file with the FID Inception weights (no download)"
    )
    p.add_argument("--cache-dir", default="cache", help="real-image features are cached here")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: random subsets averaged")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID: images per subset (at most all)")
    add_device_args(p, "for sampling")
    p.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    p.add_argument("--num-workers", type=int, default=2, help="processes that decode the real images")
    return p


FEW = 100  # images per side below which the scores are mostly noise


def score(name, real, fake, args):
    """One output line per metric, naming the feature extractor and the sample sizes."""
    if min(len(real), len(fake)) < 3:
        raise UserError(
            f"{name}: KID and FID need at least 3 images on each side, got {len(fake)} vs {len(real)} real"
        )
    if min(len(real), len(fake)) < FEW:
        print(
            f"note: {name}: under {FEW} images a side, KID and FID are rough (FID most: it estimates a "
            f"{real.shape[1]}-d covariance); compare runs at the same counts",
            file=sys.stderr,
        )
    k_mean, k_err = kid(real, fake, args.kid_subsets, args.kid_subset_size, seed=args.seed)
    f = fid(real, fake)
    print(
        f"{name}: KID [{args.extractor}] {k_mean:.5f} ± {k_err:.5f}   FID [{args.extractor}] {f:.3f}   "
        f"({len(fake)} vs {len(real)} real)"
    )
    return k_mean, f


def explain_scores(num_fake, dims):
    """What the numbers on the score lines can and cannot say, printed once."""
    print(
        f"KID's ± is one standard error of the score over the draw of its {num_fake} images (another --seed)."
    )
    if num_fake <= dims:
        print(
            f"FID: {num_fake} images cannot fill a {dims}-d covariance (rank < {num_fake}): FID is biased "
            "upwards and carries no error; compare it only at equal image counts"
        )


def check_args(args):
    if args.checkpoint and args.samples_dir:
        raise UserError("--checkpoint and --samples-dir are two things to score: choose one")
    if args.checkpoint is None and args.samples_dir is None and not args.floor:
        raise UserError("give --checkpoint or --samples-dir (or --floor alone)")
    check_at_least(args, num_samples=3, batch_size=1, kid_subsets=1, kid_subset_size=3)
    check_at_least(args, num_workers=0, image_size=1)
    check_sampler_args(args)
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0, got {args.guidance}")
    if (args.class_fidelity or args.guidance is not None) and not args.checkpoint:
        raise UserError("--guidance and --class-fidelity need --checkpoint: samples whose classes are known")


def real_classes(classes, num_real, data_root, image_dir=None, download=False):
    """The real images' labels and splits (lib.data.image_labels), which must be of the classes
    the model knows -> (labels (N,), splits (N,))."""
    labels, names, splits = image_labels(data_root, image_dir, download)
    if names != classes:
        raise UserError(f"the model was trained on other classes than the real images' {len(names)}")
    check_all_read(range(num_real), labels)
    return labels, splits


def sample(model, ckpt, args, precision, settings, real_labels=None):
    """--num-samples images from the checkpoint's EMA network at settings = (steps, guidance) ->
    uint8 (N, 3, S, S) and, for a class-conditional model, their classes (drawn like
    real_labels) or None."""
    t0 = time.perf_counter()
    noise = initial_noise(args.num_samples, ckpt["config"]["image_size"], args.seed)
    mean, std = model_stats(ckpt)
    steps, guidance = settings
    labels = None if real_labels is None else classes_like(real_labels, args.num_samples, args.seed)
    images = generate(
        model,
        noise,
        mean,
        std,
        steps=steps,
        eta=args.eta,
        seed=args.seed,
        precision=precision,
        batch_size=args.batch_size,
        sampler=args.sampler,
        labels=labels,
        guidance=guidance,
    )
    seconds = time.perf_counter() - t0
    how = f"{args.sampler}, {steps} evaluations" + (f", eta {args.eta}" if args.eta else "")
    if labels is not None:
        student = distilled_of(model)
        guided = f"guidance {guidance:g}"
        if student and guidance:
            guided = f"guidance {student['guidance']:g} distilled in"
        how += f", classes as the real images', {guided}"
    print(f"generated {len(images)} samples ({how}) in {seconds:.0f}s")
    return to_uint8(images), labels


def class_fidelity(probe, fake_features, fake_labels, extractor):
    """Print the samples' class top-1 and top-5 under the probe, against the real test images'."""
    top1, top5 = probe.ceiling
    name = f"class probe [{extractor}, L2 {probe.penalty:g}, fitted on {probe.num_fitted} real images]"
    print(f"{name}: real test images top-1 {top1:.3f}, top-5 {top5:.3f}")
    s1, s5 = probe.accuracy(fake_features, fake_labels)
    print(f"samples: top-1 {s1:.3f}, top-5 {s5:.3f} ({s1 / max(top1, 1e-9):.2f}x the real top-1)")


def samples_size(folder):
    """The side of the square images in a --samples-dir, which must all share it."""
    sizes = set()
    for path in ImageFiles(folder, None).paths:
        try:
            with Image.open(path) as img:
                sizes.add(img.size)
        except Exception as e:
            raise UserError(f"cannot read {path} as an image ({type(e).__name__})") from None
    if len(sizes) > 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
        raise UserError(
            f"--samples-dir {folder}: the images are not all square and of one size ({shown}); "
            "pass --image-size N to score them resized and cropped to N px"
        )
    return next(iter(sizes))[0]


def load_real(size, args, device):
    """-> (the --extractor network, the real images' features, cached)."""
    real = load_images(
        size,
        args.data_root,
        args.image_dir,
        args.download,
        num_workers=args.num_workers,
        cache_dir=args.cache_dir,
    )
    extractor = build_extractor(args.extractor, args.inception_weights)
    return extractor, reference_features(extractor, real, args.cache_dir, device)


def run(args):
    check_args(args)
    device, precision = setup(args.device, args.precision)
    t0 = time.perf_counter()
    model = ckpt = fake = settings = None
    if args.checkpoint:
        model, ckpt = load_model(args.checkpoint, device, args.image_size)
        if not ckpt["config"].get("num_classes") and (args.guidance is not None or args.class_fidelity):
            raise UserError(f"{args.checkpoint} is not class-conditional (sd_train.py --class-cond)")
        # the steps and guidance to sample at (a student's own), refused before the features
        settings = sampling_settings(model, args.sampler, args.steps, args.guidance, eta=args.eta)[:2]
        model = model.to(memory_format=torch.channels_last)
        size = ckpt["config"]["image_size"]
    elif args.samples_dir:
        size = args.image_size or samples_size(args.samples_dir)
        fake = load_images(size, image_dir=args.samples_dir)
    else:
        size = args.image_size or 64
    extractor, real_features = load_real(size, args, device)
    seconds = time.perf_counter() - t0
    print(f"real: {len(real_features)} images at {size} px, features [{args.extractor}] in {seconds:.0f}s")
    real_labels = splits = fake_labels = None
    if ckpt is not None and ckpt["config"].get("num_classes"):
        real_labels, splits = real_classes(
            ckpt["config"]["classes"], len(real_features), args.data_root, args.image_dir, args.download
        )
    if model is not None:
        fake, fake_labels = sample(model, ckpt, args, precision, settings, real_labels)
    if fake is not None:
        fake_features = extract_features(extractor, fake, device=device)
        score("samples", real_features, fake_features, args)
        explain_scores(len(fake), real_features.shape[1])
    if args.class_fidelity:
        probe = ClassProbe(real_features, real_labels, splits, ckpt["config"]["num_classes"])
        class_fidelity(probe, fake_features, fake_labels, args.extractor)
    if args.floor:
        n = min(args.num_samples if fake is None else len(fake), len(real_features) // 2)
        perm = torch.randperm(len(real_features), generator=torch.Generator().manual_seed(args.seed))
        score("floor (real vs real)", real_features[perm[n:]], real_features[perm[:n]], args)
    print(f"total {time.perf_counter() - t0:.0f}s")


def main(argv=None):
    return run_cli(run, get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
