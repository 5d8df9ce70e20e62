"""One process, one model, no Horovod: the unit of work of K-fold folds and lottery tickets.

``fit`` trains a model on in-memory tensors with the engine's training step and the local
optimizer, then evaluates it. Everything random in it derives from ``seed`` (initial
weights are the caller's; the shuffle order and dropout come from here), and it runs on as
many threads as the caller set, so a task computes the same numbers whichever process or
rank runs it.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .. import data, schedule
from .. import pair as pair_
from ..config import OptimOptions
from ..engine import begin_epoch, evaluate, make_optimizer, run_epoch, steps_per_epoch
from ..metrics import Summary, Tally


class Local:
    """The engine's ``Updater`` for one process: optimizer step, schedule, optional hook."""

    name = "local"

    def __init__(
        self,
        cfg: OptimOptions,
        model: torch.nn.Module,
        steps_per_epoch: int,
        after_update: Callable[["Local"], None] | None = None,
    ):
        self.cfg, self.model, self.after_update = cfg, model, after_update
        self.optimizer = make_optimizer(cfg, model, cfg.lr)
        self.scheduler = schedule.build(
            self.optimizer,
            cfg.scheduler,
            total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            world_scale=1.0,
        )
        self.step = 0  # updates so far

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def update(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.step += 1
        if self.after_update is not None:
            self.after_update(self)


def fit(
    cfg: OptimOptions,
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    seed: int,
    after_update: Callable[[Local], None] | None = None,
    pair: "pair_.PairLink | None" = None,
) -> dict | None:
    """Train ``model`` for ``cfg.epochs`` on ``train`` and evaluate it on ``test`` (CPU).

    Returns the test figures (``test_accuracy``, ``test_macro_f1``, ``test_loss``), the last
    epoch's training loss, the number of updates and the training time in seconds. ``pair``:
    this process is one half of a task split over two workers (:mod:`hvdsgd.pair`), with the
    same results; the helper half returns None.
    """
    cpu = torch.device("cpu")
    sampler = data.ShardSampler(len(train[1]), 0, 1, seed)
    batches = data.Batches(
        train[0], train[1], cfg.batch_size, sampler, cpu, channels_last=cfg.channels_last
    )
    steps = steps_per_epoch(len(train[1]), 1, cfg.batch_size, cfg.accum_steps)
    updater = Local(cfg, model, steps, after_update)
    exchange = None
    if (
        pair is not None
        and cfg.accum_steps >= 2
        and not cfg.dry_run
        and pair_.splittable(model, train[0][:2])
    ):
        exchange = pair_.Exchange(
            pair,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            cfg.batch_size * num_classes,
        )
    elif pair is not None and pair.role == 1:
        return None  # not splittable: the owner runs the whole task
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):  # >= 1, validated by the config
        tally = Tally(num_classes, cpu)
        if exchange is None:
            run_epoch(model, batches, updater, cpu, cfg, epoch, tally, base_seed=seed)
        else:  # the same epoch, its accumulation steps split over the pair
            begin_epoch(batches, cpu, seed, epoch)
            pair_.train_epoch(
                model, batches, updater, cfg.amp, cfg.accum_steps, tally, pair, exchange
            )
    train_time = time.perf_counter() - t0
    if exchange is not None:
        exchange.close()
        if pair.role == 1:
            return None
    test_batches = data.Batches(
        test[0], test[1], 512, range(len(test[1])), cpu, channels_last=cfg.channels_last
    )
    result: Summary = evaluate(model, test_batches, cpu, cfg.amp, Tally(num_classes, cpu)).local()
    return {
        **result.as_dict("test"),
        "train_loss": tally.local().loss,
        "updates": updater.step,
        "train_time_s": train_time,
    }
