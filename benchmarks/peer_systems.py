"""The two peers of benchmarks/peers.py as their users would train them: each its network, noise
schedule, loss, optimizer, LR schedule, EMA and 20-step DDIM sampler, from its own package and
with its defaults, behind one small interface (train_step, sample). Their packages are optional
(requirements-peers.txt) and imported only here, when a peer is built.

- diffusers: the unconditional training example (examples/unconditional_image_generation/
  train_unconditional.py in the diffusers repository): UNet2DModel in the example's block
  layout (attention one level above the bottom), DDPMScheduler (1000 steps, linear betas,
  epsilon), MSE, AdamW 1e-4 (betas 0.95/0.999, weight decay 1e-6), 500 warmup steps then
  cosine to 0 over the run, gradient norm clipped at 1, EMAModel (max decay 0.9999, warmup with
  inv_gamma 1 and power 3/4), batch 16, centre crops and flips (the example README's Flowers102
  command: --resolution 64 --center_crop --random_flip); sampled by DDIMPipeline (eta 0).
- denoising-diffusion-pytorch: Unet(dim, dim_mults=(1, 2, 4, 8)), GaussianDiffusion's defaults
  (1000 steps, sigmoid schedule, v objective) and Trainer's (Adam 1e-4 with betas 0.9/0.99,
  gradient norm clipped at 1, ema_pytorch.EMA with beta 0.995 every 10 steps, batch 16); sampled
  by GaussianDiffusion with sampling_timesteps=20 (DDIM, eta 0).
"""

import copy
import importlib.util

import torch
import torch.nn.functional as F

from lib.runtime import autocast

CPU = torch.device("cpu")

# What benchmarks/peers.py changes from each peer's defaults, as its table and records say.
SHARED = [
    "the images decoded once (resized and centre-cropped as its loader does) and fed from memory",
    "bf16 autocast where the CPU has it (else fp32), channels_last tensors",
    "trained by benchmarks/peers.py's loop for a fixed number of steps (the minutes at the timed rate)",
]
PEER_DEPARTURES = {
    "diffusers": [
        "UNet2DModel CPU-sized: a level per --diffusers-widths entry (default 4; the example: 6, "
        "128 to 512 wide), attention one level above the bottom as in the example (at 16x16 for "
        "64 px; the example's: 4x4)",
        *SHARED,
    ],
    "ddpm-pytorch": [
        "Unet(dim=--ddpm-dim), CPU-sized; Trainer's FID and sample grids during training off",
        *SHARED,
    ],
}
PACKAGES = {"diffusers": ["diffusers"], "ddpm-pytorch": ["denoising_diffusion_pytorch", "ema_pytorch"]}


def missing_packages(names):
    """The packages the named peers need that are not installed, as one string ('' if none)."""
    needed = {pkg for name in names for pkg in PACKAGES[name]}
    return ", ".join(sorted(pkg for pkg in needed if importlib.util.find_spec(pkg) is None))


class Diffusers:
    batch_size = 16

    @staticmethod
    def options(args):
        return dict(widths=[int(w) for w in args.diffusers_widths.split(",")])

    def __init__(self, widths, total_steps, image_size, sampling_steps, seed):
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        levels = len(widths)
        self.net = UNet2DModel(
            sample_size=image_size,
            in_channels=3,
            out_channels=3,
            layers_per_block=2,
            block_out_channels=widths,
            down_block_types=("DownBlock2D",) * (levels - 2) + ("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * (levels - 2),
        ).to(memory_format=torch.channels_last)
        self.schedule = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"
        )
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8
        )
        self.lr = get_scheduler("cosine", self.opt, num_warmup_steps=500, num_training_steps=total_steps)
        self.ema = EMAModel(
            self.net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75
        )
        self.sampling_steps = sampling_steps

    def train_step(self, x0, precision):
        """One step on a batch x0 in [-1, 1] -> the loss."""
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.schedule.config.num_train_timesteps, (len(x0),))
        with autocast(CPU, precision):
            pred = self.net(self.schedule.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.lr.step()
        self.ema.step(self.net.parameters())
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def sample(self, n, seed, precision):
        from diffusers import DDIMPipeline, DDIMScheduler

        net = copy.deepcopy(self.net)
        self.ema.copy_to(net.parameters())
        pipe = DDIMPipeline(unet=net.eval(), scheduler=DDIMScheduler.from_config(self.schedule.config))
        pipe.set_progress_bar_config(disable=True)
        with autocast(CPU, precision):
            out = pipe(
                batch_size=n,
                generator=torch.Generator().manual_seed(seed),
                num_inference_steps=self.sampling_steps,
                eta=0.0,
                output_type="np",
            ).images
        return torch.from_numpy(out).permute(0, 3, 1, 2).float()


class DenoisingDiffusionPytorch:
    batch_size = 16

    @staticmethod
    def options(args):
        return dict(dim=args.ddpm_dim)

    def __init__(self, dim, total_steps, image_size, sampling_steps, seed):
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        torch.manual_seed(seed)
        unet = Unet(dim=dim, dim_mults=(1, 2, 4, 8))
        self.net = GaussianDiffusion(unet, image_size=image_size, sampling_timesteps=sampling_steps)
        self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-4, betas=(0.9, 0.99))
        self.ema = EMA(self.net, beta=0.995, update_every=10)

    def train_step(self, x0, precision):
        """One step on a batch x0 in [-1, 1] (the package takes [0, 1]) -> the loss. Its noise and
        times come from torch's global generator (it takes none), seeded at construction."""
        with autocast(CPU, precision):
            loss = self.net((x0 + 1) / 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update()
        return loss.item()

    @torch.no_grad()
    def sample(self, n, seed, precision):
        torch.manual_seed(seed)
        with autocast(CPU, precision):
            out = self.ema.ema_model.eval().sample(batch_size=n)
        return out.float().clamp(0, 1)


PEERS = {"diffusers": Diffusers, "ddpm-pytorch": DenoisingDiffusionPytorch}
