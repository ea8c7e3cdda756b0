"""Few-step students: a trained model's DDIM sampler distilled into fewer steps, guidance included.

A student is a copy of the teacher's network, tuned so that one DDIM step of it lands where
`substeps` DDIM steps of the (guided) teacher land: Salimans & Ho 2022's progressive distillation,
taken from the teacher's S * substeps steps to S in one stage, as TRACT does (Berthelot et al.
2023), with classifier-free guidance distilled into the class-conditional prediction (Meng et al.
2023). So the student samples with plain DDIM at S steps, one network evaluation each, and no
second (unconditional) evaluation for guidance.

Its steps sit on the grid t = 1, 1 - 1/S, ..., 1/S, the teacher's DDIM grid taken every
`substeps`-th time; the last one returns its x0 estimate, as DDIM does. A student therefore runs
from t = 1, or from a grid time (sketch to image at strength k/S, k steps), and nowhere else.
The checkpoint says so in its config: "distilled" = {"steps", "teacher_steps", "guidance"}.
"""

import torch
import torch.nn.functional as F

from lib.classes import GUIDANCE
from lib.cli import UserError
from lib.diffusion import Guided, denoise, diffusion_schedule, signal_rates_of, unwrapped


def distilled_of(model):
    """The student's {"steps", "teacher_steps", "guidance"}, through its wrappers; None for a
    model that is not a student."""
    net = unwrapped(model, "distilled")
    return None if net is None else net.distilled


def student_strength(strength, steps):
    """The grid time nearest to a sketch strength (at least 1/steps): where a student can start."""
    return max(1, round(strength * steps)) / steps


def teacher_x0(teacher, x_t, t, steps, substeps):
    """The x0 estimate that a single DDIM step from t (per image, on the student's grid) must
    make to land where the teacher's `substeps` DDIM steps from t land: at t - 1/steps,
    x0~ = (x' - (n'/n) x_t) / (s' - (n'/n) s) (Salimans & Ho 2022, Algorithm 2), and from
    the last grid time (t = 1/steps) the teacher's own last x0 estimate, as its DDIM returns.
    x_t: (B,C,H,W); t: (B,1,1,1) -> (B,C,H,W)."""
    rates, h = signal_rates_of(teacher), 1.0 / (steps * substeps)
    x, x0 = x_t, None
    for j in range(substeps):
        noise_rate, signal_rate = diffusion_schedule(t - j * h, rates)
        eps, x0 = denoise(teacher, x, noise_rate, signal_rate)
        next_noise_rate, next_signal_rate = diffusion_schedule((t - (j + 1) * h).clamp(min=0), rates)
        x = next_signal_rate * x0 + next_noise_rate * eps
    noise_rate, signal_rate = diffusion_schedule(t, rates)
    next_noise_rate, next_signal_rate = diffusion_schedule((t - 1.0 / steps).clamp(min=0), rates)
    ratio = next_noise_rate / noise_rate
    x0_tilde = (x - ratio * x_t) / (next_signal_rate - ratio * signal_rate)
    last = t < 1.5 / steps  # the student's last step returns its x0 estimate
    return torch.where(last, x0, x0_tilde)


def distillation_loss(student, teacher, x0, steps, substeps, generator=None, labels=None, guidance=1.0):
    """Mean squared error between the student's x0 estimate and teacher_x0's, at a grid time
    drawn per image, on x0 noised with the schedule (x0 in the model space). Every grid time
    weighs the same: Salimans & Ho's truncated-SNR weight, max(SNR, 1), is 1 at every grid time
    but the last on the original's schedule for S <= 4 (SNR 1.9 at t = 1/4), and the last step's
    x0 is the picture itself. labels (B,): the classes for a class-conditional pair, the teacher
    guided by `guidance` ("no class" leaves it unguided). -> scalar (fp32)."""
    b = x0.shape[0]
    i = torch.randint(0, steps, (b, 1, 1, 1), device=x0.device, generator=generator)
    t = 1 - i.to(x0.dtype) / steps
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    noise_rate, signal_rate = diffusion_schedule(t, signal_rates_of(teacher))
    x_t = signal_rate * x0 + noise_rate * eps
    if labels is not None:
        null = unwrapped(teacher, "num_classes").num_classes
        teacher, student = Guided(teacher, labels, guidance, null), Guided(student, labels, 1.0, null)
    with torch.no_grad():
        target = teacher_x0(teacher, x_t, t, steps, substeps)
    _, x0_hat = denoise(student, x_t, noise_rate, signal_rate)
    return F.mse_loss(x0_hat.float(), target.float())


def sampling_settings(model, sampler, steps, guidance, strength=None, eta=0.0):
    """The steps, guidance and sketch strength to sample `model` with, from the flags (None: not
    given): a teacher's are the flags' (20 evaluations and GUIDANCE by default); a student's are
    its own steps, guidance 1 (its guidance is in its weights; 0, no class, stays 0: it learned
    that too) and the grid time nearest the strength. Settings a student cannot honour are
    refused (UserError) -> (steps, guidance, strength)."""
    info = distilled_of(model)
    if info is None:
        return 20 if steps is None else steps, GUIDANCE if guidance is None else guidance, strength
    if sampler != "ddim" or eta != 0:
        raise UserError("a distilled student samples with deterministic ddim only (it learned those steps)")
    if steps not in (None, info["steps"]):
        raise UserError(f"this student was distilled for {info['steps']} steps, not --steps {steps}")
    if guidance not in (None, 0):
        raise UserError(
            f"this student paints at its own guidance ({info['guidance']:g}): drop --guidance (0: no class)"
        )
    guidance = 1.0 if guidance is None else 0.0
    return info["steps"], guidance, None if strength is None else student_strength(strength, info["steps"])


def refuse_student(model, path, why):
    """A UserError for a script that cannot sample a student as it was taught."""
    if distilled_of(model) is not None:
        raise UserError(f"{path} is a distilled student: {why}")
