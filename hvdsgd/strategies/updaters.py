"""How a worker's gradient becomes an update of the shared buffer: one ``SharedUpdater`` per
worker process, and the parent's applier thread of ``async-deferred``.

``POLICY_UPDATES`` names, for every shared-buffer strategy, the method that turns the flat
gradient into an update; ``KERNEL_POLICY`` names the C++ kernel's policy it applies with:

==================  ====================  ===============================================
strategy            the worker reads      the update
==================  ====================  ===============================================
hogwild, lockfree   the live buffer       plain racy stores, no lock (HOGWILD!, fastText)
atomic              the live buffer       per-element atomic adds
locked              the live buffer       the whole update under one lock
sharded             the live buffer       shard by shard, each under its own lock
async-apply         a private copy        under the lock: apply, then copy the fresh weights
                                          back (a parameter server's apply-and-reply)
async-deferred      the live buffer       deposit the gradient in a slot and go on; one
                                          applier (a thread of the parent) applies the
                                          deposits in arrival order
sync                the live buffer       deposit; barrier; worker 0 applies the mean of
                                          all deposits; barrier
==================  ====================  ===============================================
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .. import schedule, shm
from ..config import TrainConfig
from ..engine import steps_per_epoch

# strategy -> the C++ kernel's policy of its updates
KERNEL_POLICY = {
    "hogwild": "hogwild",
    "lockfree": "hogwild",
    "atomic": "atomic",
    "locked": "locked",
    "sharded": "sharded",
    "async-apply": "locked",
    "async-deferred": "hogwild",
    "sync": "hogwild",
}


@dataclass
class Control:
    """The parent's channels to the workers (all inherited at spawn)."""

    start: Any  # Semaphore: one release per worker when every worker has attached; go
    reports: Any  # SimpleQueue: worker -> parent messages
    barrier: Any = None  # sync
    free: Any = None  # async-deferred: free slot ids
    filled: Any = None  # async-deferred: (slot, worker, read_version, lr)

    @classmethod
    def create(cls, ctx, cfg: TrainConfig) -> Control:
        """The channels ``cfg.strategy`` needs, from multiprocessing context ``ctx``."""
        ctl = cls(start=ctx.Semaphore(0), reports=ctx.SimpleQueue())
        if cfg.strategy == "sync":
            ctl.barrier = ctx.Barrier(cfg.workers)
        if cfg.strategy == "async-deferred":
            ctl.free, ctl.filled = ctx.SimpleQueue(), ctx.SimpleQueue()
            for s in range(slots(cfg)):
                ctl.free.put(s)
        return ctl


def wait_start(ctl: Control) -> None:
    """A worker: block until the parent's start signal."""
    ctl.start.acquire()


def give_start(ctl: Control, workers: int) -> None:
    """The parent: the start signal to ``workers`` workers. A semaphore, not an Event: Event.set
    waits for every process asleep in wait() to wake, so one SIGKILLed while it waited (the OOM
    killer) hung the parent for ever; a release never blocks, a dead worker's is left unused."""
    for _ in range(workers):
        ctl.start.release()


def slots(cfg: TrainConfig) -> int:
    """Gradient slots in the shared segment: one per worker (sync), two (async-deferred)."""
    return {"sync": cfg.workers, "async-deferred": 2 * cfg.workers}.get(cfg.strategy, 0)


def steps_per_shard(cfg: TrainConfig, n_train: int) -> int:
    """Steps of one worker's epoch (one pass over its shard of ``n_train`` samples)."""
    return steps_per_epoch(n_train, cfg.workers, cfg.batch_size, cfg.accum_steps, cfg.dry_run)


def updates_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    """Updates of the shared buffer in one epoch: every worker's pass over its shard."""
    return steps_per_shard(cfg, n_train) * (1 if cfg.strategy == "sync" else cfg.workers)


class SharedUpdater:
    """The engine's ``Updater`` for one worker: flat gradient -> the shared buffer, by the
    method ``POLICY_UPDATES[cfg.strategy]``."""

    def __init__(
        self,
        cfg: TrainConfig,
        w: int,
        shared: shm.SharedModel,
        model: torch.nn.Module,
        steps_per_epoch: int,
        ctl: Control,
    ):
        self.cfg, self.w, self.buf, self.ctl = cfg, w, shared.params, ctl
        self.model = model
        self.policy_update = POLICY_UPDATES[cfg.strategy]
        self.world_scale = float(cfg.workers) if cfg.strategy == "sync" else 1.0
        self.peak = cfg.lr * self.world_scale
        self.factor = schedule.multiplier(
            cfg.scheduler,
            cfg.epochs * steps_per_epoch,
            round(cfg.warmup_epochs * steps_per_epoch),
            1.0 / self.world_scale,
        )
        self.private = None
        if cfg.strategy == "async-apply":  # a private copy of the weights, refreshed per update
            self.private = torch.from_numpy(shared.snapshot())
            shm.bind(shm.params_of(model), self.private)
        self.grad = shm.grad_buffer(model)  # every p.grad is a view into it
        self.g = self.grad.numpy()
        n = self.buf.size
        momentum_buf = np.zeros(n, np.float32) if cfg.momentum else None
        # The C++ kernel with this worker's fixed arguments: (grad, lr, read_version, ...).
        self.kernel = functools.partial(
            self.buf.apply,
            w,
            policy=KERNEL_POLICY[cfg.strategy],
            momentum_buf=momentum_buf,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.mean = np.empty(n, np.float32) if cfg.strategy == "sync" else None
        self.first, self.step = True, 0
        self.version = self.buf.updates
        self.lr = self.peak * self.factor(0)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # accumulates into the flat gradient buffer

    def update(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.lr = self.peak * self.factor(self.step)
        self.policy_update(self)
        self.grad.zero_()
        self.step += 1

    def direct(self) -> None:
        """hogwild, lockfree, atomic, locked, sharded: the kernel updates the live buffer."""
        self.kernel(self.g, self.lr, read_version=self.version, first_step=self.first)
        self.first = False
        self.version = self.buf.updates  # the next forward pass reads from here on

    def apply_and_reply(self) -> None:
        """async-apply: under the lock, apply, then copy the fresh weights into the private
        copy the next forward pass reads."""
        staleness = self.kernel(
            self.g,
            self.lr,
            read_version=self.version,
            first_step=self.first,
            read_into=self.private.numpy(),
        )
        self.first = False
        # Under the lock the fresh copy is exactly the buffer just after this update.
        self.version += staleness + 1

    def deposit(self) -> None:
        """async-deferred: the gradient into a free slot, for the parent's applier; go on."""
        slot = self.ctl.free.get()
        np.copyto(self.buf.slot(slot), self.g)
        self.ctl.filled.put((slot, self.w, self.version, self.lr))
        self.version = self.buf.updates  # go on with whatever has been applied so far

    def average(self) -> None:
        """sync: every worker deposits; worker 0 applies the mean; all read the result."""
        np.copyto(self.buf.slot(self.w), self.g)
        self.ctl.barrier.wait()  # every gradient deposited
        if self.w == 0:
            np.copyto(self.mean, self.buf.slot(0))
            for k in range(1, self.cfg.workers):
                self.mean += self.buf.slot(k)
            self.mean *= 1.0 / self.cfg.workers
            self.kernel(self.mean, self.lr, read_version=self.buf.updates, first_step=self.first)
            self.first = False
        self.ctl.barrier.wait()  # the update is in: everyone reads the new weights


# strategy -> how its worker turns a gradient into an update (every SHARED_STRATEGIES entry)
POLICY_UPDATES: dict[str, Callable[[SharedUpdater], None]] = {
    "hogwild": SharedUpdater.direct,
    "lockfree": SharedUpdater.direct,
    "atomic": SharedUpdater.direct,
    "locked": SharedUpdater.direct,
    "sharded": SharedUpdater.direct,
    "async-apply": SharedUpdater.apply_and_reply,
    "async-deferred": SharedUpdater.deposit,
    "sync": SharedUpdater.average,
}


class Applier:
    """async-deferred: a thread of the parent that applies the deposited gradients in arrival
    order; ``stop`` lets it finish the deposits in its queue. An error is kept in ``errors``
    for the supervisor to report."""

    def __init__(self, buf, ctl: Control, cfg: TrainConfig):
        self.buf, self.ctl, self.cfg = buf, ctl, cfg
        self.errors: list = []
        self.thread = threading.Thread(target=self.run, name="hvdsgd-applier", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        cfg, buf = self.cfg, self.buf
        momentum_buf = np.zeros(buf.size, np.float32) if cfg.momentum else None
        first = True
        try:
            while (item := self.ctl.filled.get()) is not None:
                slot, w, version, lr = item
                buf.apply(
                    w,
                    buf.slot(slot),
                    lr,
                    policy="hogwild",
                    read_version=version,
                    momentum_buf=momentum_buf,
                    momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay,
                    first_step=first,
                )
                first = False
                self.ctl.free.put(slot)
        except Exception as e:  # pragma: no cover - reported by the supervisor
            self.errors.append(e)

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.ctl.filled.put(None)
            self.thread.join(timeout=2)
