"""Training images: Flowers102 or a folder of the user's pictures, decoded once into a uint8 tensor.

Decoding JPEGs every epoch (the original's loader) costs more CPU than a small model's training
step, so images are decoded, resized and center-cropped once and held as one (N, 3, S, S) uint8
tensor (100 MB for all of Flowers102 at 64 px). Batches are drawn by index; flips and the
normalization run on tensors, on whatever device trains.
"""

import contextlib
import hashlib
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
import torchvision.transforms as Tv1
import torchvision.transforms.v2 as T
from PIL import Image, ImageOps
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision.datasets import Flowers102

from lib.classes import folder_labels
from lib.cli import UserError
from lib.files import atomic_save, read_cache

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
FLOWERS_LAYOUT = (
    "<root>/flowers-102/jpg/image_00001.jpg ..., <root>/flowers-102/imagelabels.mat, "
    "<root>/flowers-102/setid.mat"
)


def to_rgb(img):
    """Any PIL mode -> RGB, upright as displayed (EXIF orientation, e.g. phone photos); transparent
    parts become white (a drawing's background), not black; 16-bit grey scaled, not clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit PNGs: 0..65535 -> 0..255
        img = img.convert("I").point(lambda v: v / 257).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("RGB")


def resize_crop(size):
    """PIL image -> (3, size, size) uint8: shorter side to `size`, then the central square."""
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.PILToTensor()])


class ImageFiles(Dataset):
    """The images under a folder, recursively. Yields (uint8 tensor or None if unreadable, path)."""

    def __init__(self, folder, transform):
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder")
        self.paths = sorted(
            p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.paths:
            raise UserError(f"the folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as img:
                return self.transform(to_rgb(img)), str(self.paths[i])
        except Exception as e:  # any decoder failure: a truncated file, a text file named .jpg, ...
            return None, f"{self.paths[i]} ({type(e).__name__}: {e})"


def load_image(path, size):
    """One picture of any size or mode -> (1, 3, size, size) uint8 (e.g. a drawing for SDEdit)."""
    try:
        with Image.open(path) as img:
            return resize_crop(size)(to_rgb(img))[None]
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except Exception as e:
        raise UserError(f"cannot read {path} as an image ({type(e).__name__})") from None


def flowers102(root, transform, download=False):
    """All of Flowers102 (train + val + test = 8189 images) through torchvision."""
    try:
        splits = [
            Flowers102(root, split=s, transform=transform, download=download)
            for s in ("train", "val", "test")
        ]
    except RuntimeError as e:
        if "not found" not in str(e).lower():
            raise
        raise UserError(
            f"Flowers102 not found under --data-root {root}: expected {FLOWERS_LAYOUT} "
            "(add --download to fetch it, or point --data-root at it)"
        ) from None
    except OSError as e:  # URLError and friends: no network, proxy, disk full
        raise UserError(
            f"could not download Flowers102 into {root} ({e}); download it by hand into {FLOWERS_LAYOUT}"
        ) from None
    return ConcatDataset(splits)


def fixed_subset(dataset, limit, seed=0):
    """The same `limit` images on every call (a seeded draw, sorted, so every class can appear)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, sorted(idx.tolist()))


def _readable(items):
    """For the collate_fns: keep the decoded images of a batch, warn about the unreadable ones."""
    for img, origin in items:
        if img is None:
            print(f"warning: skipping unreadable image: {origin}", file=sys.stderr)
    return [img for img, _ in items if img is not None]


def _stack_readable(items):
    """collate_fn that stacks in the worker (one shared-memory batch, as the default collate)."""
    images = _readable(items)
    return torch.stack(images) if images else None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals(worker_id):
    """worker_init_fn of the loaders. Ctrl-C and SIGTERM reach every process of the group
    (a terminal, systemd, Slurm): a worker that died of one would end the run with "worker exited
    unexpectedly" while the main process finishes its step and saves. The workers ignore them and
    the main process ends them when it stops (a worker also exits when it finds its parent gone).
    They were forked with both blocked (start_workers); ignoring discards any that arrived since."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Ctrl-C and SIGTERM held back (delivered on exit) while the block runs; Windows has no masks."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_workers(loader):
    """iter(loader), which forks the workers, with Ctrl-C and SIGTERM blocked meanwhile: a forked
    worker inherits the parent's Python handler, and one signalled before its worker_init_fn ran
    would run the trainer's stop handler itself. The parent gets any such signal once unblocked."""
    with stop_signals_blocked():
        return iter(loader)


def _readable_array(items):
    """collate_fn of decode_all: the batch's readable images stacked as a numpy array, which
    crosses from a worker as plain pickled bytes, not as a shared-memory tensor (see decode_all)."""
    images = _readable(items)
    return torch.stack(images).numpy() if images else None


def decode_all(dataset, num_workers=0):
    """Decode every item once -> (N, 3, S, S) uint8. Unreadable files are skipped with a warning.

    Batches cross as pickled arrays: a shared-memory tensor is fetched from its worker over a
    socket, and a stop during that handshake printed the worker's traceback. The workers ignore
    stop signals (as the --literal loader's do) and the main thread holds them while it receives,
    so a stop normally lands between batches (without workers, once a batch is decoded)."""
    # More decoding processes than cores only adds contention (and torch warns about it).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loader = DataLoader(
        dataset,
        batch_size=64,
        num_workers=min(num_workers, cores),
        collate_fn=_readable_array,
        worker_init_fn=_ignore_stop_signals,
    )
    batches, images = start_workers(loader), []
    while True:
        with stop_signals_blocked():
            batch = next(batches, False)
        if batch is False:
            break
        if batch is not None:
            images.append(torch.from_numpy(batch))
    if not images:
        raise UserError("none of the images could be read")
    return torch.cat(images)


def image_dataset(image_size, data_root="data", image_dir=None, download=False, limit=None, transform=None):
    """The training images as a Dataset of (uint8 (3, S, S) or None, origin): --image-dir if
    given, else Flowers102; a fixed subset with --limit."""
    transform = transform or resize_crop(image_size)
    dataset = ImageFiles(image_dir, transform) if image_dir else flowers102(data_root, transform, download)
    return fixed_subset(dataset, limit)


def load_images(
    image_size, data_root="data", image_dir=None, download=False, limit=None, num_workers=0, cache_dir=None
):
    """-> (N, 3, image_size, image_size) uint8: the training images, decoded once.

    With cache_dir, the decoded tensor is kept in a file named by what determines it (every
    source file's path, size and mtime; image size, crop, subset), so later runs skip decoding
    (minutes for the full-size Flowers102 on a laptop) and changed data is never read stale.
    """
    dataset = image_dataset(image_size, data_root, image_dir, download, limit)
    if cache_dir is None:
        return decode_all(dataset, num_workers)
    paths = (
        ImageFiles(image_dir, None).paths
        if image_dir
        else sorted((Path(data_root) / "flowers-102").rglob("*"))
    )
    files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()]
    key = hashlib.sha1(f"{files}|{image_size}|center-crop|limit={limit}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{'images' if image_dir else 'flowers102'}-{image_size}px-{key}.pt"
    if (cached := read_cache(path)) is not None:
        return cached
    images = decode_all(dataset, num_workers)
    atomic_save(images, path)
    return images


TRAIN, VAL, TEST = 0, 1, 2


def image_labels(data_root="data", image_dir=None, download=False):
    """Each image's class in load_images' order, nothing decoded -> (labels (N,) int64, class
    names, splits (N,) of TRAIN/VAL/TEST). Flowers102: torchvision's 0-based labels and names, its
    own splits. --image-dir: the subfolders, sorted (ImageFolder's rule); images split 2:1:1 by
    their position, for the class probe of sd_eval.py."""
    if image_dir:
        labels, names = folder_labels(image_dir, ImageFiles(image_dir, None).paths)
        return (
            labels,
            names,
            torch.tensor([TRAIN, TRAIN, VAL, TEST]).repeat(len(labels) // 4 + 1)[: len(labels)],
        )
    splits = flowers102(data_root, None, download).datasets
    labels = torch.tensor([y for split in splits for y in split._labels])
    which = torch.cat([torch.full((len(split),), i) for i, split in enumerate(splits)])
    return labels, splits[0].classes, which


def load_labelled_images(image_size, data_root="data", image_dir=None, download=False, limit=None, **kw):
    """load_images() and each image's class -> (images, labels (N,) int64, class names)."""
    labels, names, _ = image_labels(data_root, image_dir, download)
    if limit is not None and limit < len(labels):
        labels = labels[fixed_subset(range(len(labels)), limit).indices]
    images = load_images(image_size, data_root, image_dir, download, limit, **kw)
    check_all_read(images, labels)
    return images, labels, names


def images_for_model(config, name, data_root="data", image_dir=None, download=False, cache_dir=None):
    """The training images at a model's size, decoded once, and for a class-conditional model
    their classes, checked against the classes it was trained on (config["classes"]) -> (images,
    labels or None). name: the model's file, for the error."""
    size, source = config["image_size"], dict(data_root=data_root, image_dir=image_dir, download=download)
    if not config.get("num_classes"):
        return load_images(size, cache_dir=cache_dir, **source), None
    images, labels, names = load_labelled_images(size, cache_dir=cache_dir, **source)
    if names != config["classes"]:  # a label would index another class, or none
        theirs, ours = ", ".join(config["classes"][:3]), ", ".join(names[:3])
        raise UserError(
            f"the classes of {name} ({config['num_classes']}: {theirs}, ...) are not "
            f"this data's ({len(names)}: {ours}, ...)"
        )
    return images, labels


def add_model_data_args(p):
    """Where a script that tunes a trained model finds its training images."""
    p.add_argument("--data-root", default="data", help="folder that holds flowers-102/")
    p.add_argument("--image-dir", default=None, help="the training images from this folder instead")
    p.add_argument("--download", action="store_true", help="let torchvision download Flowers102")
    p.add_argument("--cache-dir", default="cache", help="decoded images are cached here")


def data_args(args):
    """add_model_data_args' flags as images_for_model's keywords."""
    names = ("data_root", "image_dir", "download", "cache_dir")
    return {name: getattr(args, name) for name in names}


def check_all_read(images, labels):
    if len(images) != len(labels):
        raise UserError(
            f"only {len(images)} of the {len(labels)} labelled images could be read, so images and "
            "classes no longer line up: remove the unreadable files"
        )


class DecodedBatches:
    """Batches drawn by index from images decoded once, held on the training device (fast path).
    With labels (N,) (class-conditional training) each batch comes with its labels."""

    def __init__(self, images, device, labels=None):
        self.images = images.to(device)
        self.labels = None if labels is None else labels.to(device)

    def __len__(self):
        return self.images.shape[0]

    def batches(self, index_batches):
        # One host-to-device copy of the indices per epoch. A copy per step blocks the host until
        # the GPU has drained its queue, so the GPU then idles while the next step is launched.
        if not len(index_batches):
            return
        sizes = [len(idx) for idx in index_batches]
        for idx in torch.cat(list(index_batches)).to(self.images.device).split(sizes):
            # (B, 3, S, S) uint8, or with labels that and (B,) int64
            yield self.images[idx] if self.labels is None else (self.images[idx], self.labels[idx])


class JpegBatches:
    """The original's loader: worker processes decode, resize, crop and convert every image to
    float every epoch, with the original's transforms (torchvision's v1 ones). As many workers as
    asked, like the original's 4 on any machine: on a small one they compete with the training
    step for the cores, and that is part of what is measured. Kept to measure against
    (sd_train.py --literal, benchmarks/); the same images in the same order as DecodedBatches, up
    to one grey level of resize rounding."""

    def __init__(self, image_size, device, num_workers=4, **source):
        to_float = Tv1.Compose(
            [
                Tv1.PILToTensor(),
                Tv1.Resize(image_size),
                Tv1.CenterCrop(image_size),
                Tv1.ConvertImageDtype(torch.float32),
            ]
        )
        self.dataset = image_dataset(image_size, transform=to_float, **source)
        self.device, self.num_workers = device, num_workers
        warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores

    def __len__(self):
        return len(self.dataset)

    def batches(self, index_batches):
        loader = DataLoader(
            self.dataset,
            num_workers=self.num_workers,
            collate_fn=_stack_readable,
            batch_sampler=[idx.tolist() for idx in index_batches],
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals,
        )
        for images in start_workers(loader):
            if images is not None:  # None only if every file of the batch was unreadable
                yield images.to(
                    self.device, non_blocking=self.device.type == "cuda"
                )  # (B, 3, S, S) float in [0, 1]


def epoch_order(num_images, epoch, seed):
    """A fresh permutation per epoch, reproducible from (seed, epoch) alone, so a resumed run
    replays the same order without storing it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_images, generator=g)
