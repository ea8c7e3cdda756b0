"""Shared test helpers. Tests run on the CPU; those that need Flowers102 use ../shared/data."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
# A network small enough to train for a few hundred steps inside a test (32x32, 2 levels).
TINY = dict(image_size=32, widths=[16, 32, 64], embedding_dim=16, block_depth=1)


@pytest.fixture
def data_root():
    if not (DATA_ROOT / "flowers-102" / "imagelabels.mat").is_file():
        pytest.skip(f"Flowers102 is not at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _few_threads():
    # Keep each test's thread count fixed so results do not depend on what else the machine runs.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
