"""Shared test helpers. Tests run on the CPU; those that need Flowers102 read it from
$FLOWERS_ROOT (a folder holding flowers-102/), else from data/ (where --download puts it), else
from ../shared/data beside the repo (the CI machine's copy), and skip without it."""

import os
from pathlib import Path

import pytest
import torch

from lib.normalization import FLOWERS_MEAN, FLOWERS_STD, to_model_space
from lib.training import Training

ROOT = Path(__file__).resolve().parents[1]
# The shipped unconditional model (the original's recipe): the notebook's, and the tests' real one.
ORIGINAL_RECIPE = ROOT / "models" / "flowers64-original-recipe.pt"
_ROOTS = [ROOT / "data", ROOT.parent / "shared" / "data"]
DATA_ROOT = Path(
    os.environ.get("FLOWERS_ROOT") or next((p for p in _ROOTS if (p / "flowers-102").is_dir()), _ROOTS[0])
)
# A network small enough to train for a few hundred steps inside a test (32x32, 2 levels).
TINY = dict(image_size=32, widths=[16, 32, 64], embedding_dim=16, block_depth=1)


def run_args(data_root, out_dir, *extra, batch_size=16):
    """sd_train.py flags for a seconds-long run: 64 real flowers at 32 px, 2-image grids."""
    return [
        "--preset",
        "flowers64",
        "--image-size",
        "32",
        "--data-root",
        str(data_root),
        "--limit",
        "64",
        "--batch-size",
        str(batch_size),
        "--num-workers",
        "0",
        "--flip",
        "--sample-every",
        "100",
        "--num-samples",
        "2",
        "--sample-steps",
        "2",
        "--out-dir",
        str(out_dir),
        *extra,
    ]


class StopAfter:
    """Stands in for Ctrl-C: `requested` turns true at the n-th time the loop asks."""

    def __init__(self, n):
        self.n, self.asked = n, 0

    def arm(self):
        pass

    def restore(self):
        pass

    @property
    def requested(self):
        self.asked += 1
        return self.asked >= self.n


@pytest.fixture
def data_root():
    if not (DATA_ROOT / "flowers-102" / "imagelabels.mat").is_file():
        pytest.skip(
            f"Flowers102 is not at {DATA_ROOT} (set FLOWERS_ROOT to the folder that holds flowers-102/)"
        )
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _few_threads():
    # The scripts' setup() sets the process's thread count; give the next test the original one.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def loss_curve(images, literal, precision, steps=200, batch=32, cfg=TINY):
    """Per-step losses of `steps` Adam steps (lr 1e-3) on a fixed stream of real flower batches."""
    torch.manual_seed(0)
    run = Training(cfg, torch.device("cpu"), precision, 1e-3, literal=literal)
    noise_gen, data_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=data_gen)
        x0 = to_model_space(images[idx], FLOWERS_MEAN, FLOWERS_STD)
        losses.append(run.step(x0, noise_gen, 0.999).item())
    return torch.tensor(losses)


def randomize_zeros(model):
    """Give the zero-initialized tensors (modulations, attention output, output conv) random
    values, so that what they feed is tested too."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)


def assert_same_state(path_a, path_b):
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for k in a["train"]["model"]:
        assert torch.equal(a["train"]["model"][k], b["train"]["model"][k]), k
    for sa, sb in zip(
        a["train"]["optimizer"]["state"].values(), b["train"]["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    for k in ("epoch", "global_step", "best_loss", "bad_epochs"):
        assert a["train"][k] == b["train"][k], k
    assert [r["loss"] for r in a["train"]["log"]] == [r["loss"] for r in b["train"]["log"]]
