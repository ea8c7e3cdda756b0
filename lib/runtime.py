"""Device, precision and thread choices shared by the scripts, so they run unchanged on CPU or GPU."""

import contextlib
import ctypes
import ctypes.util
import os
import sys

import torch

from lib.cli import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")


def add_device_args(parser, precision_help):
    """The --device and --precision flags, the same in every script."""
    parser.add_argument(
        "--device", default="auto", choices=DEVICES, help="auto: cuda, else mps (Apple GPUs), else cpu"
    )
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help=precision_help)


def pick_device(name="auto"):
    """auto: an NVIDIA GPU, else an Apple GPU (MPS), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "--device mps was asked for, but PyTorch sees no Apple GPU (MPS needs Apple silicon and "
            "macOS 12.3 or later; try --device cpu)"
        )
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; choose {', '.join(DEVICES)}")
    return torch.device(name)


def cpu_has_native_bf16():
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), on any OS: PyTorch's
    own CPU feature checks. Elsewhere bf16 autocast is emulated and slower than fp32, so it must
    not be the default."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_precision(name, device):
    """-> 'fp32' | 'bf16' | 'fp16'. auto: bf16 on GPUs that support it (no loss scaling needed),
    fp16 on older GPUs, bf16 on CPUs with native bf16, fp32 on other CPUs and on Apple GPUs
    (fp32 runs on every Mac that MPS does; bf16 needs macOS 14, fp16 loss scaling)."""
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    if device.type == "mps" and name == "bf16" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError("--precision bf16 on an Apple GPU needs macOS 14 or later: use fp16 or fp32")
    if name != "auto":
        return name
    if device.type == "cuda":
        # Native bf16 from Ampere on; older GPUs (V100, T4) would only emulate it, slowly.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "mps":
        return "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def literal_precision(device):
    """The original's precision: autocast's default dtype on the device (fp16 on CUDA and MPS,
    bf16 on a CPU)."""
    return "bf16" if device.type == "cpu" else "fp16"


def sum_dtype(device):
    """The dtype in which to add up many fp32 values on `device`: fp64 (exact for fp32 inputs),
    except on Apple GPUs, which have no fp64."""
    return torch.float32 if device.type == "mps" else torch.float64


def autocast(device, precision):
    """Mixed-precision context: weights stay fp32, matmuls/convs run in the low precision."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def ieee_fp32():
    """Inside: fp32 matmuls and convolutions in IEEE precision on GPUs too (no TF32), for numbers
    that must not depend on the hardware (metrics)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def set_threads():
    """Use the cores this process may run on (affinity aware), shared among the processes that
    torchrun started on this machine, so that they do not oversubscribe the cores."""
    if hasattr(os, "sched_getaffinity"):
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // per_node))


def keep_freed_memory():
    """glibc hands every freed block over 128 KB back to the OS and page-faults it in again on
    the next allocation: tens of MB of activations, every step. Raising the mmap and trim
    thresholds (glibc's mallopt) keeps it in the heap for reuse."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: glibc's maximum, 32 MB
        libc.mallopt(-1, 2**30)  # M_TRIM_THRESHOLD: shrink the heap only past 1 GB of free memory
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep the allocator's defaults
        pass


def setup(device_name="auto", precision_name="auto"):
    """Resolve device and precision; threads and TF32 for this process."""
    device = pick_device(device_name)
    precision = pick_precision(precision_name, device)
    set_threads()
    if device.type == "cuda":
        # The ops autocast leaves in fp32 may use TF32 (10-bit mantissa) tensor cores; --precision
        # fp32 means IEEE fp32, the same numbers as on a CPU. These are the flags that inductor
        # reads: after torch's newer per-backend `fp32_precision` settings, torch.compile's
        # max-autotune stops with "mix of the legacy and new APIs" (torch 2.11).
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    return device, precision


def tune_for_training(device):
    """Speed settings that pay off in training only and change the process: glibc keeps freed
    activation memory (CPU); cuDNN times its kernels for the fixed shapes (CUDA), which picks
    them by timing, so a GPU's results may differ from run to run. Inference and evaluation
    leave both alone, so that the same seed gives the same images."""
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
