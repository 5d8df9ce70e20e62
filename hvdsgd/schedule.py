"""Learning-rate schedules as a multiplier of the peak rate, per optimizer update.

The peak rate is the base rate times the world size (Goyal et al. 2017, as in Horovod's
examples); ``warmup_epochs`` ramps linearly from the base rate to the peak.

- ``warm``: linear warm-up, then cosine decay to 0
- ``cosine``: cosine decay from the peak, no warm-up
- ``step``: warm-up, then x0.1 at 50% and again at 75% of training
- ``constant``: warm-up, then the peak
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def multiplier(
    name: str, total_steps: int, warmup_steps: int, start: float
) -> Callable[[int], float]:
    """Step -> factor of the peak learning rate; ``start`` is the factor at step 0 of warm-up."""
    total = max(1, total_steps)
    warm = 0 if name == "cosine" else min(warmup_steps, total)

    def factor(step: int) -> float:
        if step < warm:
            return start + (1.0 - start) * step / warm
        t = (step - warm) / max(1, total - warm)
        if name in ("warm", "cosine"):
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if name == "step":
            return 0.1 ** ((t >= 0.5) + (t >= 0.75))
        return 1.0

    return factor


def build(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int,
    world_scale: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over an optimizer whose lr is already the peak (base x world_scale)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, multiplier(name, total_steps, warmup_steps, 1.0 / world_scale)
    )
