"""Device and precision choices, and the process-wide settings each script makes."""

import pytest
import torch

import sd_inference
from lib import distributed, runtime
from lib.cli import UserError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend which GPUs PyTorch sees: gpus(cuda=..., mps=...)."""

    def see(cuda=False, mps=False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return see


def test_auto_picks_cuda_then_an_apple_gpu_then_the_cpu(gpus):
    gpus(cuda=True, mps=True)
    assert runtime.pick_device("auto").type == "cuda"
    gpus(cuda=False, mps=True)
    assert runtime.pick_device("auto").type == "mps"
    assert runtime.pick_device("mps").type == "mps"
    gpus(cuda=False, mps=False)
    assert runtime.pick_device("auto").type == "cpu"


def test_a_device_that_is_not_there_or_unknown_is_one_clear_error(gpus, capsys):
    gpus(cuda=False, mps=False)
    with pytest.raises(UserError, match="no Apple GPU"):
        runtime.pick_device("mps")
    with pytest.raises(UserError, match="no CUDA GPU"):
        runtime.pick_device("cuda")
    with pytest.raises(UserError, match="unknown device 'tpu'"):
        runtime.pick_device("tpu")
    with pytest.raises(SystemExit) as stop:  # the scripts' --device takes the known names only
        sd_inference.main(["--device", "tpu", "--no-show"])
    assert stop.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_apple_gpus_train_in_fp32_and_sum_in_fp32():
    mps = torch.device("mps")  # a device object needs no GPU
    assert runtime.pick_precision("auto", mps) == "fp32"  # bf16 needs macOS 14, fp16 loss scaling
    assert runtime.literal_precision(mps) == "fp16"  # autocast's default there, as the original
    assert runtime.sum_dtype(mps) == torch.float32  # MPS has no fp64
    assert runtime.sum_dtype(torch.device("cpu")) == torch.float64
    assert runtime.sum_dtype(torch.device("cuda")) == torch.float64


def test_torchrun_on_an_apple_gpu_is_refused(gpus, monkeypatch):
    gpus(cuda=False, mps=True)
    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():  # as torchrun sets them
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="Apple GPU trains one"):
        distributed.init("auto")


def test_native_bf16_comes_from_pytorchs_cpu_checks_on_any_os(monkeypatch):
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert runtime.cpu_has_native_bf16() is native
        assert runtime.pick_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_pytorchs_answer_agrees_with_the_linux_cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo (not Linux): nothing to compare with")
    assert torch.cpu._is_avx512_bf16_supported() == ("avx512_bf16" in flags)
    if torch.cpu._is_amx_tile_supported():
        assert "amx_tile" in flags


def test_inference_leaves_the_process_alone_and_training_tunes_it(monkeypatch):
    """glibc's malloc thresholds and cuDNN's autotuning are training settings: setup(), which
    every script calls, makes neither; tune_for_training() makes the one for its device."""
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append("malloc"))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime.setup("cpu")
    assert calls == [] and not torch.backends.cudnn.benchmark
    runtime.tune_for_training(torch.device("cpu"))
    assert calls == ["malloc"] and not torch.backends.cudnn.benchmark
    runtime.tune_for_training(torch.device("cuda"))
    assert calls == ["malloc"] and torch.backends.cudnn.benchmark
