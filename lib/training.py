"""One optimisation step of the diffusion model, with everything it touches: the network, its
EMA copy, Adam and the loss scaler. sd_train.py runs it in its loop; the benchmark times it."""

import copy
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

from lib.diffusion import drop_labels, training_loss
from lib.runtime import autocast
from lib.unet import build_unet


@torch.no_grad()
def ema_update(ema_params, params, ema_buffers, buffers, decay):
    """EMA of the weights; BatchNorm statistics are copied, not averaged (as the original does)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    torch._foreach_copy_(ema_buffers, buffers)


def ema_decay_at(step, decay, warmup=False, power=0.0):
    """The EMA's decay at optimisation step `step` (0-based). The original copies the weights at the
    first update, then averages with `decay`, so for ~1/(1 - decay) steps the average still holds
    the random initial weights. With warmup the decay grows as min(decay, (1 + n) / (10 + n)) (the
    num_updates rule of TensorFlow's ExponentialMovingAverage): an average over about the last
    tenth of the steps so far, until it reaches `decay`.

    power > 0 replaces both by EDM2's power-function EMA (Karras et al. 2024, eq. 3): decay
    (1 - 1/t)^(power + 1) at update t = step + 1, which weighs update k by
    (k^(power+1) - (k-1)^(power+1)) / t^(power+1), about k^power: an average whose width stays
    a fixed share of the run however long it trains (power 6.94: sigma_rel 0.10)."""
    if power > 0:
        return (step / (step + 1)) ** (power + 1)
    if warmup:
        return min(decay, (1 + step) / (10 + step))
    return decay if step else 0.0


class Training:
    """What one optimisation step touches (network, EMA copy, Adam, grad scaler) and the step.

    Fast path: channels_last tensors (the layout oneDNN and cuDNN convolutions prefer), the fused
    network formulation, no-op loss scaling switched off, fused Adam (one kernel for all
    parameters, not a few per tensor), optional torch.compile. literal=True is the original's:
    NCHW, literal network, a GradScaler always. `objective`: training_loss's options (loss,
    min_snr_gamma); optimizer "adam" (the original's) or "adamw" with decoupled weight decay
    (Loshchilov & Hutter 2019).
    """

    def __init__(
        self,
        cfg,
        device,
        precision,
        lr,
        literal=False,
        compile=False,
        distributed=False,
        sync_bn=False,
        optimizer="adam",
        weight_decay=0.0,
        objective=None,
    ):
        self.device, self.precision, self.objective = device, precision, objective or {}
        self.memory_format = torch.contiguous_format if literal else torch.channels_last
        self.model = build_unet(cfg, literal=literal).to(device, memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if sync_bn:  # batch statistics over the global batch instead of each process's shard
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        fused = device.type in ("cuda", "cpu") and not literal
        if optimizer == "adamw":
            self.opt = torch.optim.AdamW(
                self.model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused
            )
        else:
            self.opt = torch.optim.Adam(
                self.model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused
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

    def step(self, x0, generator, ema_decay, labels=None, label_dropout=0.0):
        """One Adam step on the noise-prediction loss of x0 (B, 3, S, S) -> the loss (detached).
        labels (B,): a class-conditional network's classes, each replaced by "no class" with
        probability label_dropout (Ho & Salimans 2022), so the same network learns both.

        Under loss scaling a step whose loss overflowed is skipped by the scaler; its forward pass
        has already moved BatchNorm's running statistics, which are then put back (a NaN there
        would reach the EMA copy and stay), without waiting for the device."""
        buffers = self._ema_pairs[3] if self.scaler.is_enabled() else []
        before = [b.clone() for b in buffers]
        if labels is not None:
            labels = drop_labels(labels, label_dropout, generator, self.model.num_classes)
        with autocast(self.device, self.precision):
            x0 = x0.contiguous(memory_format=self.memory_format)
            loss = training_loss(self.step_model, x0, generator, labels=labels, **self.objective)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        if buffers:
            finite = torch.isfinite(loss.detach())
            torch._foreach_copy_(
                buffers, [torch.where(finite, b, old) for b, old in zip(buffers, before, strict=True)]
            )
        ema_update(*self._ema_pairs, ema_decay)
        return loss.detach()
