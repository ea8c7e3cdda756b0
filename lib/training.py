"""One optimisation step of the diffusion model, with everything it touches: the network, its
EMA copy, Adam and the loss scaler. sd_train.py runs it in its loop; the benchmark times it."""

import copy
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

from lib.diffusion import training_loss
from lib.runtime import autocast
from lib.unet import build_unet


@torch.no_grad()
def ema_update(ema_params, params, ema_buffers, buffers, decay):
    """EMA of the weights; BatchNorm statistics are copied, not averaged (as the original does)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    torch._foreach_copy_(ema_buffers, buffers)


class Training:
    """What one optimisation step touches (network, EMA copy, Adam, grad scaler) and the step.

    Fast path: channels_last tensors (the layout oneDNN and cuDNN convolutions prefer), the fused
    network formulation, no-op loss scaling switched off, fused Adam (one kernel for all
    parameters, not a few per tensor), optional torch.compile. literal=True is the original's:
    NCHW, literal network, a GradScaler always.
    """

    def __init__(
        self, cfg, device, precision, lr, literal=False, compile=False, distributed=False, sync_bn=False
    ):
        self.device, self.precision = device, precision
        self.memory_format = torch.contiguous_format if literal else torch.channels_last
        self.model = build_unet(cfg, literal=literal).to(device, memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if sync_bn:  # batch statistics over the global batch instead of each process's shard
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=lr, fused=device.type in ("cuda", "cpu") and not literal
        )
        # Loss scaling only matters for fp16 (bf16 has fp32's exponent range); the original always scales.
        self.scaler = torch.amp.GradScaler(device.type, enabled=literal or precision == "fp16")
        self._ema_pairs = (
            list(self.ema.parameters()),
            list(self.model.parameters()),
            list(self.ema.buffers()),
            list(self.model.buffers()),
        )
        self.step_model = self.model
        if distributed:  # gradients averaged over processes; BatchNorm buffers follow rank 0's
            # Some 1x1 kernels get gradients in another (equally dense) stride order than their
            # channels_last weights; DDP then copies those few KB and warns. Harmless: silence it.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.step_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if compile:
            self.step_model = torch.compile(self.step_model)

    def step(self, x0, generator, ema_decay):
        """One Adam step on the noise-prediction loss of x0 (B, 3, S, S) -> the loss (detached)."""
        with autocast(self.device, self.precision):
            loss = training_loss(self.step_model, x0.contiguous(memory_format=self.memory_format), generator)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        ema_update(*self._ema_pairs, ema_decay)
        return loss.detach()
