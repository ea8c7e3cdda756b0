"""The fast path (decoded-once data, channels_last, fused network, no-op scaler off) computes the
same thing as the original's way, which stays selectable (sd_train.py --literal)."""

import torch

from conftest import loss_curve
from lib.data import DecodedBatches, JpegBatches, epoch_order, load_images

CPU = torch.device("cpu")


def test_jpeg_loader_and_decoded_tensor_give_the_same_images_in_the_same_order(data_root):
    decoded = DecodedBatches(load_images(32, data_root, limit=40), CPU)
    jpeg = JpegBatches(32, CPU, num_workers=2, data_root=data_root, limit=40)
    order = epoch_order(40, epoch=0, seed=0).split(16)
    for a, b in zip(decoded.batches(order), jpeg.batches(order), strict=True):
        # Same images, same order; the two resize kernels (PIL's, and torchvision v1's on uint8
        # tensors, the original's) may round a pixel to the neighbouring grey level.
        diff = (a.float() - b * 255).abs()
        assert diff.max() <= 1 + 1e-4 and diff.mean() < 0.1


def test_decoded_batches_index_the_held_images_batch_by_batch():
    images = torch.arange(10 * 3 * 2 * 2, dtype=torch.uint8).view(10, 3, 2, 2)
    index_batches = [torch.tensor([7, 1, 3]), torch.tensor([0, 9]), torch.tensor([4])]  # as shard() gives
    got = list(DecodedBatches(images, CPU).batches(index_batches))
    assert len(got) == 3 and all(torch.equal(g, images[i]) for g, i in zip(got, index_batches, strict=True))
    assert list(DecodedBatches(images, CPU).batches([])) == []  # a resumed epoch with nothing left


def test_decoded_images_cache_round_trip(data_root, tmp_path):
    a = load_images(32, data_root, limit=20, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    assert torch.equal(
        load_images(32, data_root, limit=20, cache_dir=tmp_path), a
    )  # read back, not re-decoded
    load_images(32, data_root, limit=21, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # another subset, another key


def test_fast_path_learns_like_the_literal_path(data_root):
    """Same batches, times and noise: the two paths differ only by rounding order, so over 200
    steps their loss curves may drift apart by no more than bf16 rounding itself moves a curve.
    That yardstick is measured here: the fast path in bf16 against the fast path in fp32
    (observed: curves differ by ~0.004 at most, on losses of 0.27-0.8; the two paths by ~0.002)."""
    images = load_images(32, data_root, limit=640)
    fast = loss_curve(images, literal=False, precision="bf16")
    literal = loss_curve(images, literal=True, precision="bf16")
    fast_fp32 = loss_curve(images, literal=False, precision="fp32")
    bf16_noise = (fast - fast_fp32).abs().max()
    assert 0 < bf16_noise < 0.05
    assert (fast - literal).abs().max() <= 2 * bf16_noise
    assert fast[-20:].mean() < 0.5 * fast[:10].mean()  # and both actually learn
    assert literal[-20:].mean() < 0.5 * literal[:10].mean()


def test_benchmark_names_its_peak_and_refuses_too_few_images(data_root, capsys):
    from benchmarks.benchmark import gpu_peak, main

    assert (
        gpu_peak("NVIDIA H100 PCIe") == 756e12
        and gpu_peak("NVIDIA L40") == 181e12
        and gpu_peak("Quadro") is None
    )
    # 64 x (200 + 2 + 8) images asked of a data set of 8189: one line, before any model is built
    assert main(["--data-root", str(data_root), "--presets", "flowers64", "--steps", "200"]) == 2
    assert "need 13440 images, the data has 8189" in capsys.readouterr().err


def test_benchmark_parts_time_each_variant_in_its_own_precision(data_root, capsys):
    """--parts: a row per variant, each in the precision it names, against the literal row."""
    from benchmarks.benchmark import main

    tiny = "--presets flowers64 --batch 2 --steps 1 --warmup 0 --rounds 1 --sample-images 1 --num-workers 0"
    assert main(["--data-root", str(data_root), *tiny.split(), "--precision", "fp32", "--parts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| flowers64")]
    got = {row[2]: (row[3], row[5]) for row in rows}
    assert set(got) == {"literal", "fast", "literal, fp32", "fast, bf16", "fast, NCHW", "fast, JPEG loader"}
    assert got["literal"] == ("bf16", "1.00") and got["literal, fp32"][0] == got["fast"][0] == "fp32"
    assert got["fast, bf16"][0] == "bf16" and got["fast, NCHW"][0] == got["fast, JPEG loader"][0] == "fp32"


def test_benchmark_counts_every_convolution_of_a_training_step():
    from benchmarks.benchmark import train_flops
    from lib.training import Training
    from lib.unet import model_config

    cfg = model_config("flowers64", image_size=32)
    widths, size, depth = cfg["widths"], cfg["image_size"], cfg["block_depth"]
    # The 3x3 convolutions alone: two per residual block, 2 * depth blocks per level (down and up),
    # depth in the bottleneck; 2 * 9 * C^2 FLOPs per output pixel; backward twice the forward.
    conv3x3 = sum(
        (4 * depth if i < len(widths) - 1 else 2 * depth) * 2 * 9 * c * c * (size // 2**i) ** 2
        for i, c in enumerate(widths)
    )
    # A bf16 run: counted under its autocast, the fused oneDNN convolutions would go uncounted
    run = Training(cfg, CPU, "bf16", 3e-4)
    flops = train_flops(run, cfg, 2, CPU) / 2
    assert 3 * conv3x3 <= flops <= 1.15 * 3 * conv3x3  # the rest: the 1x1 convolutions
