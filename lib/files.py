"""Files written atomically, and caches read back without trusting them."""

import os
import sys
from pathlib import Path

import torch


def atomic_save(obj, path):
    """torch.save, atomically (atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path, write):
    """write(file) to a temporary file beside `path`, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_cache(path):
    """A tensor this repo saved as a cache -> the tensor; None when the file is absent, or torn or
    foreign (then it is recomputed and replaced: a warning, not a failure)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # whatever a broken file makes torch.load raise
        cached = None
    if isinstance(cached, torch.Tensor):
        return cached
    print(f"warning: {path} is not a readable cache file; computing it again", file=sys.stderr)
    return None
