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
async-deferred      the live buffer       deposit the gradient in one of the worker's two
                                          slots and go on; one applier (a thread of the
                                          parent) applies the deposits as they arrive
sync                the live buffer       deposit; barrier; worker 0 applies the mean of
                                          all deposits; barrier
==================  ====================  ===============================================
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
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
class WorkerEnds:
    """One worker's ends of the channels to the parent. Every pipe has one worker at one end and
    the parent at the other, and the parent closes its copy of the worker's end once the worker
    has it: a worker that dies (SIGKILL, the OOM killer) while it waits or in the middle of a
    message takes no lock or pipe of another worker with it, and the parent reads its pipe's
    end as end-of-file. (One queue shared by every worker, as before, hung them all when one
    died inside ``get``, holding the queue's read lock.)"""

    start: Any  # Semaphore, shared: one release per worker; a release never blocks
    report: Connection  # send: worker -> parent messages
    barrier: Any = None  # sync
    free: Connection | None = None  # async-deferred, recv: this worker's free slot ids
    filled: Connection | None = None  # async-deferred, send: (slot, worker, read_version, lr)


@dataclass
class Control:
    """The parent's channels to the workers: for each worker, its ``WorkerEnds`` (passed to it
    at spawn) and the parent's ends of the same pipes."""

    start: Any  # Semaphore: one release per worker when every worker has attached; go
    ends: list[WorkerEnds]  # worker w's ends
    reports: list[Connection]  # recv: worker w's messages (only the living workers' pipes)
    free: list[Connection] = field(default_factory=list)  # async-deferred, send: w's free slots
    filled: list[Connection] = field(default_factory=list)  # async-deferred, recv: w's deposits

    @classmethod
    def create(cls, ctx, cfg: TrainConfig) -> Control:
        """The channels ``cfg.strategy`` needs, from multiprocessing context ``ctx``. Worker w
        owns gradient slots ``2w`` and ``2w + 1`` (async-deferred), both free at the start."""
        start = ctx.Semaphore(0)
        barrier = ctx.Barrier(cfg.workers) if cfg.strategy == "sync" else None
        ends, reports, free, filled = [], [], [], []
        for w in range(cfg.workers):
            report_r, report_w = ctx.Pipe(duplex=False)
            end = WorkerEnds(start=start, report=report_w, barrier=barrier)
            reports.append(report_r)
            if cfg.strategy == "async-deferred":
                (end.free, free_w), (filled_r, end.filled) = ctx.Pipe(False), ctx.Pipe(False)
                free.append(free_w)
                filled.append(filled_r)
                for s in (2 * w, 2 * w + 1):
                    free_w.send(s)
            ends.append(end)
        return cls(start=start, ends=ends, reports=reports, free=free, filled=filled)

    def spawned(self, w: int) -> None:
        """The parent, once worker ``w`` is started: close the parent's copies of its ends, so
        that its pipes read as end-of-file when it dies."""
        end = self.ends[w]
        for conn in (end.report, end.free, end.filled):
            if conn is not None:
                conn.close()


def receive(conns: list[Connection], timeout: float = 0.0) -> list:
    """The messages waiting on ``conns`` after at most ``timeout`` s, one per ready pipe; a pipe
    at end-of-file (its worker is gone, perhaps mid-message) is closed and dropped from
    ``conns``."""
    out = []
    for conn in wait_any(conns, timeout):
        try:
            out.append(conn.recv())
        except (EOFError, OSError):
            conns.remove(conn)
            conn.close()
    return out


def wait_start(ends: WorkerEnds) -> None:
    """A worker: block until the parent's start signal."""
    ends.start.acquire()


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
        ends: WorkerEnds,
    ):
        self.cfg, self.w, self.buf, self.ends = cfg, w, shared.params, ends
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
        slot = self.ends.free.recv()  # one of this worker's two slots
        np.copyto(self.buf.slot(slot), self.g)
        self.ends.filled.send((slot, self.w, self.version, self.lr))
        self.version = self.buf.updates  # go on with whatever has been applied so far

    def average(self) -> None:
        """sync: every worker deposits; worker 0 applies the mean; all read the result."""
        np.copyto(self.buf.slot(self.w), self.g)
        self.ends.barrier.wait()  # every gradient deposited
        if self.w == 0:
            np.copyto(self.mean, self.buf.slot(0))
            for k in range(1, self.cfg.workers):
                self.mean += self.buf.slot(k)
            self.mean *= 1.0 / self.cfg.workers
            self.kernel(self.mean, self.lr, read_version=self.buf.updates, first_step=self.first)
            self.first = False
        self.ends.barrier.wait()  # the update is in: everyone reads the new weights


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
    """async-deferred: a thread of the parent that applies the workers' deposits as they arrive
    and hands each slot back to its worker; ``stop`` lets it finish the deposits waiting in
    the pipes. An error is kept in ``errors`` for the supervisor to report."""

    def __init__(self, buf, ctl: Control, cfg: TrainConfig):
        self.buf, self.ctl, self.cfg = buf, ctl, cfg
        self.errors: list = []
        self.wake_r, self.wake_w = multiprocessing.Pipe(duplex=False)  # stop: in this process
        self.thread = threading.Thread(target=self.run, name="hvdsgd-applier", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        cfg, buf, conns = self.cfg, self.buf, list(self.ctl.filled)
        momentum_buf = np.zeros(buf.size, np.float32) if cfg.momentum else None
        first, stopping = True, False
        try:
            while conns:
                if not stopping and self.wake_r in wait_any([*conns, self.wake_r]):
                    stopping = True  # from here on: what is waiting, then out
                items = receive(conns, timeout=0.0)
                if stopping and not items:
                    return
                for slot, w, version, lr in items:
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
                    with contextlib.suppress(OSError):  # BrokenPipeError: the worker is gone
                        self.ctl.free[w].send(slot)
        except Exception as e:  # pragma: no cover - reported by the supervisor
            self.errors.append(e)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.wake_w.send(None)
            self.thread.join(timeout=2)
