"""Class labels: where they come from for training, and how people name them at inference."""

import difflib
from pathlib import Path

import torch

from lib.cli import UserError

# The classifier-free guidance scale that sd_inference, sd_eval and the training-time grids and
# KID probe use for a class-conditional model unless told otherwise: the guidance sweep in docs/sampling.md.
GUIDANCE = 2.0


def folder_labels(root, paths):
    """ImageFolder's rule: each image's class is its immediate subfolder under root, the classes
    sorted by name -> (labels (N,) int64, class names)."""
    root = Path(root)
    parents = [Path(p).relative_to(root).parts[:-1] for p in paths]
    if any(not parts for parts in parents):
        raise UserError(
            f"classes need one subfolder per class under {root} (images directly in it have none)"
        )
    names = sorted({parts[0] for parts in parents})
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[parts[0]] for parts in parents]), names


def parse_classes(spec, names):
    """--class "sunflower,3" -> [class indices]: a name (any case) first, else a 0-based index."""
    if not names:
        raise UserError(
            "--class needs a class-conditional model (trained with --class-cond); this one is not"
        )
    lower = {name.lower(): i for i, name in enumerate(names)}
    chosen = []
    for item in (part.strip() for part in spec.split(",")):
        if item.lower() in lower:
            chosen.append(lower[item.lower()])
        elif item.isdigit() and int(item) < len(names):
            chosen.append(int(item))
        else:
            near = difflib.get_close_matches(item.lower(), list(lower), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(names[lower[n]]) for n in near)}?" if near else ""
            raise UserError(
                f"--class {item!r} is not one of the model's {len(names)} classes{hint} (--list-classes)"
            )
    return chosen


def spread(classes, n):
    """n labels cycling through the chosen classes: the figure shows each in turn."""
    classes = list(classes)
    return torch.tensor([classes[i % len(classes)] for i in range(n)])


def drawn_classes(num_classes, n, seed):
    """n classes drawn uniformly with a seed: what sd_inference paints without --class."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(num_classes, (n,), generator=g).tolist()


def classes_across(n, num_classes):
    """n labels spread evenly over all the classes (the training-time sample grids)."""
    return torch.arange(n) * num_classes // n


def classes_like(labels, n, seed=0):
    """n labels drawn from the real images' own (a seeded draw, without replacement while they
    last). Samples scored against real images need the real class frequencies (Flowers102 has
    40 to 258 images a class): KID and FID would count any other mix as lost quality."""
    g = torch.Generator().manual_seed(seed)
    draws = [labels[torch.randperm(len(labels), generator=g)] for _ in range(-(-n // len(labels)))]
    return torch.cat(draws)[:n]
