"""A run's length in optimisation steps and its learning rate at each step.

The LR is a function of the step and the run's length, never of the clock: two runs of the same
flags and seed take the same steps with the same LRs on any machine, however busy. --max-steps
gives the length directly. --max-minutes M turns into steps once: the run times its first steps
(BUDGET_WINDOW), fixes its length at the step where M minutes of training steps would run out at
that rate, and keeps the measurement in its checkpoint, so that a resume (or a rerun from that
checkpoint) comes to the same length. Until then the step-based part of a decay sees progress 0.
"""

import math

# The rate behind --max-minutes is timed from the end of the session's first step (which pays
# one-off costs: allocations, kernel choice, torch.compile) over this many seconds of steps, or
# this share of the budget where that is shorter, and at least MIN_TIMED_STEPS steps.
BUDGET_WINDOW_SECONDS = 60.0
BUDGET_WINDOW_SHARE = 0.05
MIN_TIMED_STEPS = 2


def lr_factor(schedule, step, warmup_steps=0, decay_steps=1, progress=0.0, cooldown=0.2):
    """The LR multiplier at step `step` (0-based): a linear warmup over warmup_steps, times
    "constant" 1, "rsqrt" min(1, sqrt(decay_steps / step)) (the inverse-square-root decay of
    EDM2, Karras et al. 2024), "cosine" 0.5 (1 + cos(pi progress)), or "wsd" 1 until the last
    `cooldown` share of the run, then linearly to 0 (warmup-stable-decay, Hägele et al. 2024:
    a run can be extended while the LR is constant). progress in [0, 1] is the fraction of the
    run done. ("plateau" is the original's epoch-wise ReduceLROnPlateau: 1 here, after the
    warmup.)"""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "rsqrt":
        factor *= min(1.0, math.sqrt(decay_steps / max(step, 1)))
    elif schedule == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    elif schedule == "wsd":
        factor *= min(1.0, max(1.0 - progress, 0.0) / cooldown)
    return factor


def progress_at(step, epochs_done, epochs, total_steps=None):
    """The fraction of the run done before step `step`: of --epochs (epochs_done may be
    fractional: images seen / images per epoch) or of total_steps, whichever budget is nearer
    its end."""
    by_steps = step / total_steps if total_steps else 0.0
    return max(epochs_done / epochs, by_steps)


def total_steps(max_steps, max_minutes, rate):
    """The run's length in steps as far as it is known: --max-steps; or what --max-minutes comes
    to at the timed rate `rate` (a dict from fix_rate, or None before it is timed); else None."""
    if max_steps:
        return max_steps
    if max_minutes and rate:
        more = round((max_minutes * 60 - rate["seconds"]) / rate["seconds_per_step"])
        return max(rate["step"] + more, 1)
    return None


def trained_minutes(state):
    """Minutes of training steps so far (data loading, checkpoints, grids and KIDs not counted),
    from a run's progress counters."""
    return (sum(row["seconds"] for row in state["log"]) + state["epoch_seconds"]) / 60


def budget_spent(state, max_steps, max_minutes):
    """Has a run with these progress counters (a checkpoint's "train") used up its step budget?
    One whose rate was never timed (written before budgets were kept in steps) goes by minutes."""
    total = total_steps(max_steps, max_minutes, state.get("budget_rate"))
    if total is not None:
        return state["global_step"] >= total
    return bool(max_minutes) and trained_minutes(state) >= max_minutes


def window_done(max_minutes, timed_steps, timed_seconds):
    """Has the session timed enough steps (after its first) to fix --max-minutes' length?"""
    window = min(BUDGET_WINDOW_SECONDS, BUDGET_WINDOW_SHARE * max_minutes * 60)
    return timed_steps >= MIN_TIMED_STEPS and timed_seconds >= window


def fix_rate(step, trained_seconds, timed_steps, timed_seconds):
    """The measurement a checkpoint keeps: at global step `step`, after `trained_seconds` of
    training steps in all, the session's timed steps took `timed_seconds`."""
    return dict(step=step, seconds=trained_seconds, seconds_per_step=timed_seconds / timed_steps)
