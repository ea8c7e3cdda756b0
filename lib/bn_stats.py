"""BatchNorm statistics for the averaged weights.

Training keeps an EMA of the weights but copies BatchNorm's running statistics from the live
network (as the original does), so the averaged network samples with statistics that other
weights produced. A pass over training batches with the averaged weights, in train mode, with the
statistics reset and averaged equally over the batches, gives it its own: the fix SWA applies to
its averaged weights (Izmailov et al. 2018, sec. 3.2; torch.optim.swa_utils.update_bn). The
batches are fed as in training: clean images noised at t ~ U(0, 1), and for a class-conditional
network the images' classes, with the training's share dropped to "no class".

    python -m lib.bn_stats models/flowers64-v2-cond.pt runs/bn/flowers64-v2-cond.pt --data-root data
"""

import sys

import torch
from torch.optim.swa_utils import update_bn

from lib.checkpoint import load_model, make_checkpoint, replaceable
from lib.cli import ArgumentParser, UserError, check_at_least, run_cli
from lib.data import add_model_data_args, data_args, images_for_model
from lib.diffusion import EpsFromV, drop_labels, training_loss
from lib.files import atomic_save
from lib.normalization import model_stats, to_model_space
from lib.sample import num_classes


class Noised(torch.nn.Module):
    """The network fed as training feeds it (its classes dropped, then lib.diffusion's
    training_loss noising): a batch {"x0": uint8 images, "labels": classes or None} in."""

    def __init__(self, net, mean, std, generator, label_dropout=0.1):
        super().__init__()
        self.net, self.mean, self.std = net, mean, std
        self.generator, self.label_dropout = generator, label_dropout

    def forward(self, batch):
        device = self.generator.device
        x0, labels = to_model_space(batch["x0"].to(device), self.mean, self.std), batch["labels"]
        if labels is not None:
            labels = drop_labels(labels.to(device), self.label_dropout, self.generator, num_classes(self.net))
        return training_loss(self.net, x0, self.generator, labels=labels)  # the loss is not needed


@torch.no_grad()
def recompute_bn_stats(
    net, mean, std, images, labels=None, batches=50, batch_size=64, seed=0, label_dropout=0.1
):
    """Set net's BatchNorm running statistics to its own on random training batches: each
    layer's mean and (unbiased) variance averaged equally over the batches. uint8 images
    (N, 3, S, S); labels (N,) for a class-conditional net. At most `batches` full batches, fewer
    where the images run out first (a partial batch would weigh as much as a full one) -> the
    batches used. The weights are left as they are; net comes back in eval mode."""
    batches = min(batches, len(images) // batch_size)
    if batches < 1:
        raise ValueError(f"{len(images)} images are fewer than one batch of {batch_size}")
    device = next(net.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    picked = torch.randperm(len(images), generator=g, device=device).cpu()[: batches * batch_size]
    picked = picked.split(batch_size)
    loader = [dict(x0=images[i], labels=None if labels is None else labels[i]) for i in picked]
    update_bn(loader, Noised(net, mean, std, g, label_dropout))
    net.eval()
    return batches


def get_parser():
    p = ArgumentParser(prog="python -m lib.bn_stats", description=__doc__.split("\n")[0])
    p.add_argument("src", help="a checkpoint (any this repo reads)")
    p.add_argument("dst", help="the new checkpoint: src's config, normalization and EMA weights")
    p.add_argument("--batches", type=int, default=50, help="training batches averaged over")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="of the batches, their noise and times")
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help="class-conditional: the share of images fed without their class (the run's --label-dropout)",
    )
    add_model_data_args(p)
    return p


def run(args):
    check_at_least(args, batches=1, batch_size=2)
    if not 0.0 <= args.label_dropout < 1.0:
        raise UserError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    replaceable(args.src, args.dst)
    model, ckpt = load_model(args.src)
    net = model.net if isinstance(model, EpsFromV) else model
    images, labels = images_for_model(ckpt["config"], args.src, **data_args(args))
    mean, std = model_stats(ckpt)
    try:
        used = recompute_bn_stats(
            model, mean, std, images, labels, args.batches, args.batch_size, args.seed, args.label_dropout
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    norm = ckpt["norm"]
    atomic_save(make_checkpoint(ckpt["config"], norm["mean"], norm["std"], net.state_dict()), args.dst)
    print(f"wrote {args.dst}: BatchNorm statistics from {used} batches of {args.batch_size}")


def main(argv=None):
    return run_cli(run, get_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
