"""Learning-rate schedules of mmret's LightningModules (multipliers for `torch.optim.lr_scheduler.LambdaLR`)."""

from __future__ import annotations

import math

from mmret.errors import UsageError


def warmup_length(warmup_steps: int | float, total_steps: int) -> int:
    """Warmup steps of a run of `total_steps`: an int is a step count (at most `total_steps`), a float in
    [0, 1) a fraction of the run, so that a recipe fits a few hundred pairs as well as millions."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)) or warmup_steps < 0:
        raise UsageError(
            f"model.warmup_steps is {warmup_steps!r}; expected a step count or a fraction in [0, 1)"
        )
    if isinstance(warmup_steps, float):
        if warmup_steps >= 1:
            if not warmup_steps.is_integer():
                raise UsageError(
                    f"model.warmup_steps is {warmup_steps}; expected a step count or a fraction in [0, 1)"
                )
            return min(int(warmup_steps), total_steps)
        return min(total_steps, round(warmup_steps * total_steps))
    return min(warmup_steps, total_steps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from ~0 to 1 over `warmup_steps`, then cosine down to `min_ratio` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float, decay_fraction: float
) -> float:
    """LR multiplier: linear warmup over `warmup_steps`, then 1 until the last `decay_fraction` of
    `total_steps`, which decay linearly to `min_ratio` (warmup-stable-decay, "WSD": the peak rate holds for
    most of training instead of falling from the start)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
