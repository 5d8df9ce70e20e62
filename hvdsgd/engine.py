"""The training step and evaluation, shared by every strategy.

A strategy owns how a gradient becomes an update; it hands the engine an ``Updater``:

- ``backward(loss)``: backward pass of one micro-batch (scaled for fp16 AMP if needed);
- ``update()``: turn the accumulated gradients into a parameter update and clear them.

Everything else (autocast, accumulation, metrics, the NaN guard) lives here once.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F

from .metrics import Tally


@dataclass
class Progress:
    """Where a run stands: what it goes on from (after an elastic reset, rank 0's is
    broadcast to every rank)."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps done in the current epoch
    done: int = 0  # samples of the current epoch trained, over all ranks
    partial: Any = None  # the current epoch's training metrics up to the last commit
    samples: int = 0  # training samples of the finished epochs (padding excluded)
    seconds: float = 0.0  # their training time
    epoch_start: float = field(default_factory=time.time)  # wall clock at the epoch's start
    began: float = field(default_factory=time.time)  # wall clock at the run's start
    world: int = 1  # ranks since the last (re)start
    started: bool = False  # --resume read and --out prepared
    resets: list = field(default_factory=list)  # one record per reset, for the summary


class Updater(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...
    def update(self) -> None: ...


def make_optimizer(cfg, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The local optimizer (SGD with momentum, or AdamW) at learning rate ``lr``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def autocast(device: torch.device, amp: str):
    """The autocast context for ``--amp`` (off, bf16 or fp16) on ``device``."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed(value: int, device: torch.device) -> None:
    """Seed the CPU generator, and ``device``'s when it is a GPU: ``torch.manual_seed`` for
    the per-epoch reseed. On a CUDA build ``torch.manual_seed`` also queues a lazy seeding of
    every GPU with a captured stack trace, not negligible next to a small model's HOGWILD epoch.
    """
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)


def grouped(batches: Iterable, n: int) -> Iterator[list]:
    """Consecutive groups of ``n`` micro-batches (the last group may be shorter)."""
    group = []
    for b in batches:
        group.append(b)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def train_step(
    model: torch.nn.Module,
    micro_batches: list,
    updater: Updater,
    device: torch.device,
    amp: str,
    tally: Tally,
) -> None:
    """Forward and backward over ``micro_batches``, then one update."""
    n = sum(len(y) for _, y in micro_batches)
    for x, y in micro_batches:
        tally.add(*forward_backward(model, x, y, n, updater, device, amp), y)
    updater.update()


def forward_backward(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n: int,
    updater: Updater,
    device: torch.device,
    amp: str,
):
    """One micro-batch of a step of ``n`` samples: forward, then backward of its loss weighted
    by its share of the step (the mean over the step); returns ``(loss, logits)``."""
    with autocast(device, amp):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    updater.backward(loss if len(y) == n else loss * (len(y) / n))
    return loss, logits


def train_epoch(
    model,
    batches,
    updater: Updater,
    device,
    amp: str,
    accum_steps: int,
    tally: Tally,
    progress=None,
    max_steps: int | None = None,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """One pass over ``batches`` in steps of ``accum_steps`` micro-batches; returns steps.
    ``after_step(n)``, if given, follows every step of ``n`` samples (elastic commits)."""
    model.train()
    steps = 0
    for group in grouped(batches, accum_steps):
        train_step(model, group, updater, device, amp, tally)
        steps += 1
        if progress is not None:
            progress.update(len(group))
        if after_step is not None:
            after_step(sum(len(y) for _, y in group))
        if max_steps is not None and steps >= max_steps:
            break
    return steps


DRY_RUN_STEPS = 2  # --dry-run: optimizer steps per epoch (one epoch)


def steps_per_epoch(
    samples: int, parts: int, batch_size: int, accum_steps: int, dry_run: bool = False
) -> int:
    """Optimizer steps of one epoch over ``samples`` cut into ``parts`` equal shards (ranks or
    workers; a shard is padded up to ``ceil(samples / parts)``): its batches over
    ``accum_steps``, and at most ``DRY_RUN_STEPS`` under ``dry_run``."""
    batches = math.ceil(math.ceil(samples / parts) / batch_size)
    steps = math.ceil(batches / accum_steps)
    return min(steps, DRY_RUN_STEPS) if dry_run else steps


def begin_epoch(
    batches, device: torch.device, base_seed: int, epoch: int, who: int = 0, skip: int = 0
) -> None:
    """What every strategy does before an epoch's first step: reseed the RNG (dropout and
    the like) from (``base_seed``, ``epoch``, ``who``: the rank or worker), so that resuming
    needs no saved generator, and set the sampler's epoch (its shuffle). ``skip``: samples of
    the epoch already trained (an elastic run going on from the middle of it)."""
    seed(base_seed + 1000 * epoch + who, device)
    batches.sampler.set_epoch(epoch)
    if skip:
        batches.sampler.done = skip


def run_epoch(
    model,
    batches,
    updater: Updater,
    device: torch.device,
    cfg,
    epoch: int,
    tally: Tally,
    *,
    base_seed: int,
    who: int = 0,
    skip: int = 0,
    progress: Callable[[int], Any] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> int:
    """One epoch as every strategy trains it: ``begin_epoch``, then ``train_epoch`` with
    ``cfg``'s AMP and accumulation (``DRY_RUN_STEPS`` steps under ``--dry-run``); returns the
    steps taken. ``progress(batches)``, if given, makes the epoch's progress bar (or None)."""
    begin_epoch(batches, device, base_seed, epoch, who, skip)
    bar = progress(len(batches)) if progress is not None else None
    try:
        return train_epoch(
            model,
            batches,
            updater,
            device,
            cfg.amp,
            cfg.accum_steps,
            tally,
            bar,
            max_steps=DRY_RUN_STEPS if cfg.dry_run else None,
            after_step=after_step,
        )
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable, device: torch.device, amp: str, tally: Tally
) -> Tally:
    """Loss and confusion of ``model`` over ``batches`` (this rank's share) into ``tally``."""
    model.eval()
    for x, y in batches:
        with autocast(device, amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        tally.add(loss, logits, y)
    return tally
