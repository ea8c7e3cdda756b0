"""Few-step students (lib/distill.py, sd_distill.py). For Gaussian data the teacher's noise
predictor is a closed form and its DDIM map affine, so the distillation target can be checked
exactly (a student that predicts it samples the teacher's images in a fifth of the steps), and a
student of the same affine family must learn that map from the loss alone."""

import pytest
import torch
from PIL import Image
from test_checkpoint import tiny_checkpoint
from test_samplers import S0, M, ideal_model
from torchvision.utils import save_image

import sd_distill
from conftest import TINY, StopAfter
from lib.checkpoint import load_model, make_checkpoint, read_checkpoint
from lib.classes import GUIDANCE
from lib.cli import UserError
from lib.diffusion import SIGNAL_RATES, Guided, ddim_sample, diffusion_schedule
from lib.distill import distillation_loss, sampling_settings, student_strength, teacher_x0
from lib.files import atomic_save
from lib.normalization import model_stats
from lib.sample import generate, initial_noise
from lib.samplers import t_of_sigma
from lib.unet import build_unet
from sd_distill import main

STEPS, SUBSTEPS = 4, 5


class Teacher:
    """The ideal noise predictor of N(M + offset[label], S0^2) data: class-conditional where
    offsets are given, the last label being "no class" (offset 0)."""

    num_classes = 2

    def __init__(self, offsets=None):
        self.offsets, self.signal_rates = offsets, SIGNAL_RATES

    def __call__(self, x_t, noise_var, labels=None):
        if labels is None:
            return ideal_model(x_t, noise_var)
        n2 = noise_var.to(x_t.dtype)[:, None, None, None]
        s, mean = torch.sqrt(1 - n2), M + self.offsets[labels][:, None, None, None]
        return torch.sqrt(n2) * (x_t - s * mean) / (s**2 * S0**2 + n2)


class PerfectStudent:
    """Predicts, at each grid time, exactly the target of teacher_x0 (as noise)."""

    def __init__(self, teacher):
        self.teacher, self.signal_rates = teacher, SIGNAL_RATES

    def __call__(self, x_t, noise_var):
        noise_rate = noise_var.sqrt()[:, None, None, None]
        signal_rate = torch.sqrt(1 - noise_rate**2)
        t = t_of_sigma(noise_rate / signal_rate).to(x_t.dtype)
        x0 = teacher_x0(self.teacher, x_t, t, STEPS, SUBSTEPS)
        return (x_t - signal_rate * x0) / noise_rate


def noise(seed=0):
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("k", [4, 3, 1])  # plain sampling, and sketches from grid times 0.75, 0.25
def test_a_student_that_hits_the_target_paints_the_teachers_images(k):
    teacher, t_start = Teacher(), k / STEPS
    x = noise() if k == STEPS else diffusion_schedule(torch.tensor(t_start), SIGNAL_RATES)[0].item() * noise()
    expected = ddim_sample(teacher, x, steps=k * SUBSTEPS, t_start=t_start)
    got = ddim_sample(PerfectStudent(teacher), x, steps=k, t_start=t_start)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    # ... which DDIM with the teacher's own network does not at so few steps
    assert (ddim_sample(teacher, x, steps=k, t_start=t_start) - expected).abs().max() > 1e-3


class AffineStudent(torch.nn.Module):
    """eps = a_i x_t + b_i at grid time i: the family the teacher's DDIM map lies in."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.zeros(STEPS)), torch.nn.Parameter(torch.zeros(STEPS))
        self.signal_rates = SIGNAL_RATES
        grid = 1 - torch.arange(STEPS) / STEPS
        self.grid_vars = diffusion_schedule(grid, SIGNAL_RATES)[0] ** 2

    def forward(self, x_t, noise_var):
        i = (noise_var[:, None] - self.grid_vars.to(noise_var)).abs().argmin(1)
        return self.a[i][:, None, None, None] * x_t + self.b[i][:, None, None, None]


def test_the_loss_alone_teaches_a_student_the_teachers_map():
    torch.manual_seed(0)
    teacher, student, g = Teacher(), AffineStudent(), torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(student.parameters(), lr=0.03)
    losses = []
    for _ in range(400):
        x0 = M + S0 * torch.randn(64, 3, 4, 4, generator=g)
        loss = distillation_loss(student, teacher, x0, STEPS, SUBSTEPS, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])
    x = noise().float()
    with torch.no_grad():
        student_error = (ddim_sample(student, x, STEPS) - ddim_sample(teacher, x, 20)).abs().max()
    teacher_error = (ddim_sample(teacher, x, STEPS) - ddim_sample(teacher, x, 20)).abs().max()
    assert student_error < 0.02 * teacher_error, (student_error, teacher_error)


def test_the_student_learns_the_guided_teacher_from_the_class_alone():
    """The loss of a student that predicts the guided teacher's target from the class is zero;
    guidance 1 (the plain conditional teacher) would be another target."""
    teacher = Teacher(offsets=torch.tensor([0.8, -0.6, 0.0]))
    scale, null = 3.0, Teacher.num_classes

    class GuidedPerfect(PerfectStudent):
        def __call__(self, x_t, noise_var, labels):
            return PerfectStudent(Guided(self.teacher, labels, scale, null))(x_t, noise_var)

    g = torch.Generator().manual_seed(0)
    x0 = M + S0 * torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # 2: no class, where guidance changes nothing
    student = GuidedPerfect(teacher)
    assert distillation_loss(student, teacher, x0, STEPS, SUBSTEPS, g, labels, scale) < 1e-20
    assert distillation_loss(student, teacher, x0, STEPS, SUBSTEPS, g, labels, 1.0) > 1e-4


def test_a_sketch_starts_from_a_grid_time():
    strengths = (0.1, 0.3, 0.6, 0.62, 0.9, 1.0)
    assert [student_strength(s, 4) for s in strengths] == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]


def student_checkpoint(path, steps=4, classes=0):
    cfg = dict(TINY, distilled=dict(steps=steps, teacher_steps=5 * steps, guidance=2.0))
    if classes:
        cfg |= dict(num_classes=classes, classes=[str(i) for i in range(classes)])
    torch.manual_seed(1)  # weights apart from tiny_checkpoint's (seed 0)
    net = build_unet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised layers too
    atomic_save(make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, net.state_dict()), path)
    return cfg


def test_a_student_samples_only_as_it_was_taught(tmp_path):
    student_checkpoint(tmp_path / "s.pt")
    model, ckpt = load_model(tmp_path / "s.pt")
    assert ckpt["format"] == "flowers-ddim/3"  # older readers refuse it rather than sample 4 steps of 20
    assert sampling_settings(model, "ddim", None, None) == (4, 1.0, None)
    assert sampling_settings(model, "ddim", 4, None, strength=0.6) == (4, 1.0, 0.5)
    for sampler, steps, guidance, said in [
        ("dpm++2m", None, None, "deterministic ddim only"),
        ("ddim", 20, None, "distilled for 4 steps, not --steps 20"),
        ("ddim", None, 2.0, "drop --guidance"),
    ]:
        with pytest.raises(UserError, match=said):
            sampling_settings(model, sampler, steps, guidance)
    with pytest.raises(UserError, match="deterministic ddim only"):
        sampling_settings(model, "ddim", None, None, eta=1.0)
    assert sampling_settings(model, "ddim", None, 0)[1] == 0  # no class: it learned that path too
    tiny_checkpoint(tmp_path / "t.pt")
    teacher, _ = load_model(tmp_path / "t.pt")
    assert sampling_settings(teacher, "heun", None, 3.0, 0.6) == (20, 3.0, 0.6)
    assert sampling_settings(teacher, "ddim", 7, None) == (7, GUIDANCE, None)


def pictures(folder, n=24):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        img = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
        Image.fromarray(img.numpy()).save(folder / f"{i}.png")
    return folder


def test_the_command_distills_saves_and_resumes_exactly(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "t.pt")
    common = ["--image-dir", str(pictures(tmp_path / "p")), "--cache-dir", str(tmp_path / "c")]
    common += ["--batch-size", "4", "--max-steps", "4", "--save-every", "2", "--steps", "2"]
    assert main([str(tmp_path / "t.pt"), str(tmp_path / "full.pt"), *common]) == 0
    full = read_checkpoint(tmp_path / "full.pt")
    assert "train" not in full
    assert full["config"]["distilled"] == dict(steps=2, teacher_steps=10, guidance=1.0)  # unconditional
    teacher = read_checkpoint(tmp_path / "t.pt")
    assert any(not torch.equal(full["ema"][k], v) for k, v in teacher["ema"].items())

    # stopped after 2 steps (as Ctrl-C or the end of a session leaves it), then resumed
    monkeypatch.setattr(sd_distill, "StopRequest", lambda: StopAfter(2))
    argv = [str(tmp_path / "t.pt"), str(tmp_path / "half.pt"), *common]
    assert main(argv) == 130
    assert read_checkpoint(tmp_path / "half.pt")["train"]["distill"]["step"] == 2
    monkeypatch.undo()
    assert main([*argv, "--resume", "--max-steps", "8"]) == 2  # a resumed run keeps its settings
    data = common[:4]  # the settings come from the file; the data flags are the command's
    assert main([str(tmp_path / "t.pt"), str(tmp_path / "half.pt"), *data, "--resume"]) == 0
    resumed = read_checkpoint(tmp_path / "half.pt")
    assert "train" not in resumed and resumed["config"] == full["config"]
    for k, v in full["ema"].items():
        assert torch.equal(resumed["ema"][k], v), k

    # the finished student is not resumable; it may teach a student of fewer steps on its grid
    assert main([*argv, "--resume"]) == 2
    student_argv = [str(tmp_path / "full.pt"), str(tmp_path / "one.pt"), *common[:-2]]
    assert main([*student_argv, "--steps", "2"]) == 2  # 2 x 5 substeps is not its 2 steps
    assert main([*student_argv, "--steps", "1", "--substeps", "2", "--guidance", "2"]) == 2
    assert main([*student_argv, "--steps", "1", "--substeps", "2"]) == 0
    one = read_checkpoint(tmp_path / "one.pt")["config"]["distilled"]
    assert one == dict(steps=1, teacher_steps=10, guidance=1.0)  # the first teacher's steps


def test_a_class_conditional_student_learns_at_the_guidance_it_records(tmp_path, capsys):
    cfg = dict(TINY, num_classes=2, classes=["a", "b"])
    torch.manual_seed(0)
    atomic_save(make_checkpoint(cfg, [0.5] * 3, [0.25] * 3, build_unet(cfg).state_dict()), tmp_path / "c.pt")
    (tmp_path / "p").mkdir()
    for name in ("a", "b"):
        pictures(tmp_path / "p" / name, n=6)
    flags = ["--image-dir", str(tmp_path / "p"), "--cache-dir", str(tmp_path / "c"), "--batch-size", "4"]
    flags += ["--max-steps", "2", "--guidance", "3"]
    assert main([str(tmp_path / "c.pt"), str(tmp_path / "s.pt"), *flags]) == 0
    student = read_checkpoint(tmp_path / "s.pt")
    assert student["config"]["distilled"] == dict(steps=4, teacher_steps=20, guidance=3.0)
    assert student["config"]["classes"] == ["a", "b"]
    tiny_checkpoint(tmp_path / "u.pt")
    assert main([str(tmp_path / "u.pt"), str(tmp_path / "x.pt"), *flags]) == 2  # nothing to guide
    assert "unconditional" in capsys.readouterr().err


def test_the_scripts_sample_a_student_at_its_own_settings(tmp_path, capsys):
    import sd_app
    import sd_eval
    import sd_inference

    student_checkpoint(tmp_path / "s.pt", classes=3)
    paint = ["--checkpoint", str(tmp_path / "s.pt"), "--no-show", "--num-images", "2", "--class", "0,1"]
    to_a = ["--out", str(tmp_path / "a.png"), "--save-dir", str(tmp_path / "a")]
    assert sd_inference.main([*paint, *to_a]) == 0
    # what it painted: 4 DDIM steps of the student, guided once (by its weights), not twice
    model, ckpt = load_model(tmp_path / "s.pt")
    noise, labels = initial_noise(2, 32, 0), torch.tensor([0, 1])
    for scale, same in [(1.0, True), (GUIDANCE, False)]:
        images = generate(model, noise, *model_stats(ckpt), steps=4, labels=labels, guidance=scale)
        for i, image in enumerate(images):
            save_image(image, tmp_path / "expected.png")
            painted = (tmp_path / "a" / f"sample_0_{i:04d}.png").read_bytes()
            assert (painted == (tmp_path / "expected.png").read_bytes()) == same, (scale, i)

    drawing = tmp_path / "d.png"
    Image.new("RGB", (40, 40), "red").save(drawing)
    sketch = [*paint, "--init-image", str(drawing), "--strength", "0.6", "--out", str(tmp_path / "c.png")]
    assert sd_inference.main(sketch) == 0
    assert "--strength 0.6 taken as 0.5" in capsys.readouterr().out
    assert sd_inference.main([*paint, "--guidance", "0", "--out", str(tmp_path / "d.png")]) == 0  # no class
    out = ["--no-show", "--out", str(tmp_path / "x.png")]
    for script, flags, said in [
        (sd_inference, ["--steps", "20", *out], "distilled for 4 steps"),
        (sd_inference, ["--guidance", "3", *out], "drop --guidance"),
        (sd_inference, ["--sampler", "heun", *out], "deterministic ddim only"),
        (sd_inference, ["--eta", "1", *out], "deterministic ddim only"),
        (sd_eval, ["--steps", "8"], "distilled for 4 steps"),
        (sd_app, [], "give its teacher as --checkpoint"),
    ]:
        assert script.main(["--checkpoint", str(tmp_path / "s.pt"), *flags]) == 2, flags
        assert said in capsys.readouterr().err
