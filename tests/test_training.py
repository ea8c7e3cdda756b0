"""The optimisation step's EMA copy, against its closed form."""

import torch

from conftest import TINY
from lib.training import Training, ema_update


def test_ema_update_follows_its_closed_form():
    """With the weights held at p, n updates of decay d take the average from e0 to
    p + d^n (e0 - p); BatchNorm's buffers are copied, not averaged."""
    torch.manual_seed(0)
    p, e0 = [torch.randn(5, 3), torch.randn(7)], [torch.randn(5, 3), torch.randn(7)]
    buffers, ema_buffers = [torch.randn(4)], [torch.zeros(4)]
    ema, d = [t.clone() for t in e0], 0.9
    for _ in range(5):
        ema_update(ema, p, ema_buffers, buffers, d)
    for e, start, target in zip(ema, e0, p, strict=True):
        torch.testing.assert_close(e, target + d**5 * (start - target))
    assert torch.equal(ema_buffers[0], buffers[0])


def test_training_step_copies_first_then_averages():
    torch.manual_seed(0)
    run = Training(TINY, torch.device("cpu"), "fp32", 1e-2)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 32, 32)
    run.step(x0, g, 0.0)  # the first update copies the weights (as AveragedModel does)
    for e, p in zip(run.ema.state_dict().values(), run.model.state_dict().values(), strict=True):
        assert torch.equal(e, p)
    before = [e.clone() for e in run.ema.parameters()]
    run.step(x0, g, 0.9)
    for e, b, p in zip(run.ema.parameters(), before, run.model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)
        assert not torch.equal(e, p)  # the live weights moved on, the average followed a tenth
    for e, p in zip(run.ema.buffers(), run.model.buffers(), strict=True):  # running statistics copied
        assert torch.equal(e, p)
