"""The parent's side of a shared-buffer run: a ``Supervisor`` owns the worker processes.

It spawns them (``spawn``: the data tensors are shared, not copied), says how many have
started every ``START_REPORT_S`` while they start (oversubscribed, that takes minutes), unlinks
the segments once every worker has attached, and then watches them: a worker that dies is
reported by index and exit code, and ``--on-worker-failure`` decides whether the others stop
(a one-line ``WorkerFailed``) or finish. Inside its ``with`` block SIGTERM and SIGHUP unwind
like Ctrl-C; on every way out the workers are stopped (SIGTERM, then SIGKILL), the applier
ended and the segments unlinked, and an interruption after the start first hands the still
buffer to ``on_interrupt`` (the checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from typing import Any, Callable

import torch
import torch.multiprocessing

from .. import shm
from ..config import TrainConfig
from ..errors import Terminated, UsageError
from ..metrics import Summary
from .updaters import Applier, Control, give_start, receive
from .worker import EXIT_STOPPED, worker

log = logging.getLogger("hvdsgd")

START_REPORT_S = 5.0  # the parent logs how many workers have started at most this often


class WorkerFailed(UsageError):
    """A worker process died or raised; the message names it and its exit code."""


def exit_text(code: int | None) -> str:
    """A worker's exit code as the user reads it (with the signal that killed it)."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def raise_terminated(signum, frame):
    raise Terminated(signum)  # unwinds through the clean-up like Ctrl-C


def warn_oversubscribed(cfg: TrainConfig) -> None:
    """One warning when the workers' compute threads outnumber this process's cores."""
    cores, threads = len(os.sched_getaffinity(0)), cfg.threads or 1
    if cfg.workers * threads > cores:
        log.warning(
            f"hvdsgd: warning: {cfg.workers} workers x {threads} thread"
            f"{'s' * (threads > 1)} on {cores} core{'s' * (cores > 1)} is oversubscribed: "
            f"starting and training will be slow; use --workers "
            f"{max(1, cores // threads)} for one thread per core"
        )


@dataclass
class WorkerReports:
    """What the parent knows of the workers' training, from their reports."""

    workers: int
    num_classes: int
    epochs_done: list = field(default_factory=list)
    loss: float = 0.0
    confusion: Any = None
    lr: float = 0.0
    ready: set = field(default_factory=set)
    done: set = field(default_factory=set)
    errors: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    busy: dict = field(default_factory=dict)  # worker -> (first step, last step), monotonic
    threads: dict = field(default_factory=dict)  # worker -> its torch.get_num_threads()

    def __post_init__(self):
        self.epochs_done = [0] * self.workers
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def take(self, msg: tuple) -> None:
        kind, w = msg[0], msg[1]
        if kind == "ready":
            self.ready.add(w)
            self.threads[w] = msg[2]
        elif kind == "done":
            self.done.add(w)
            self.busy[w] = (msg[2], msg[3])
        elif kind == "error":
            self.errors[w] = msg[2]
        elif kind == "usage":
            self.usage[w] = self.errors[w] = msg[2]
        elif kind == "epoch":
            _, _, epoch, loss_sum, confusion, lr = msg
            self.epochs_done[w] = epoch
            self.loss += loss_sum
            self.confusion += torch.tensor(confusion, dtype=torch.long).view_as(self.confusion)
            self.lr = lr

    def train_summary(self) -> Summary | None:
        """Training loss and accuracy over the epochs reported since the last call."""
        if not self.confusion.sum():
            return None
        s = Summary(self.loss, self.confusion.clone())
        self.loss, self.confusion = 0.0, torch.zeros_like(self.confusion)
        return s


class Supervisor:
    """The ``--workers`` processes of one run over ``shared`` and the training set of ``ds``;
    a context (see the module doc) around ``start`` and ``supervise``."""

    def __init__(
        self,
        cfg: TrainConfig,
        shared: shm.SharedModel,
        ds,
        on_interrupt: Callable[[], None] | None = None,
    ):
        self.cfg, self.shared, self.on_interrupt = cfg, shared, on_interrupt
        self.ctx = torch.multiprocessing.get_context("spawn")
        self.ctl = Control.create(self.ctx, cfg)
        self.spec = {
            "names": shared.names,
            "input_shape": ds.input_shape,
            "num_classes": ds.num_classes,
            "train_x": ds.train_x.share_memory_(),
            "train_y": ds.train_y.share_memory_(),
        }
        self.reports = WorkerReports(cfg.workers, ds.num_classes)
        self.procs: list = []
        self.applier = (
            Applier(shared.params, self.ctl, cfg) if cfg.strategy == "async-deferred" else None
        )
        self.failed: list = []  # workers that died, in the order they were found
        self.t0: float | None = None  # the start signal (monotonic: the workers' clock too)
        self.old_handlers: dict = {}

    def __enter__(self) -> Supervisor:
        self.old_handlers = {
            sig: signal.signal(sig, raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)
        }
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
                self.stop()  # the buffer holds still: a consistent checkpoint
                if self.t0 is not None and self.on_interrupt is not None:
                    self.on_interrupt()
        finally:
            for sig, handler in self.old_handlers.items():
                signal.signal(sig, handler)
            self.stop()
            self.shared.unlink()

    # ------------------------------------------------------------------------- start

    def start(self) -> None:
        """Spawn the workers (and the applier), wait until all are ready, unlink the
        segments, and give the start signal."""
        cfg = self.cfg
        warn_oversubscribed(cfg)
        for w in range(cfg.workers):
            p = self.ctx.Process(
                target=worker,
                args=(w, cfg.to_dict(), self.spec, self.ctl.ends[w]),
                name=f"hvdsgd-worker-{w}",
                daemon=True,
            )
            p.start()
            self.ctl.spawned(w)  # its pipes: one writer (the worker), EOF when it dies
            self.procs.append(p)
        if self.applier is not None:
            self.applier.start()
        self.wait_ready()
        self.shared.unlink()  # every worker has mapped it: /dev/shm keeps nothing from here on
        give_start(self.ctl, len(self.procs))
        self.t0 = time.monotonic()

    def wait_ready(self) -> None:
        """Wait until every worker has attached and built its model; with ``--progress``, say
        how many have started every START_REPORT_S and when all have."""
        cfg, reports = self.cfg, self.reports
        t0 = last = time.monotonic()
        while len(reports.ready) < cfg.workers:
            wait_any([p.sentinel for p in self.procs], timeout=0.05)
            self.drain()
            now = time.monotonic()
            if cfg.progress and (now - last >= START_REPORT_S or len(reports.ready) == cfg.workers):
                last = now
                log.info(f"  started {len(reports.ready)}/{cfg.workers} workers ({now - t0:.1f} s)")
            for w, p in enumerate(self.procs):
                if p.exitcode is not None and w not in reports.ready:
                    self.drain()
                    if w in reports.usage:
                        raise UsageError(reports.usage[w])  # the user's fix, as the worker said it
                    why = reports.errors.get(w)
                    raise WorkerFailed(
                        f"worker {w} failed while starting ({exit_text(p.exitcode)})"
                        + (f": {why}" if why else "")
                    )

    # --------------------------------------------------------------------- supervise

    def supervise(self, evaluator) -> list:
        """Snapshot every ``--eval-interval`` s with ``evaluator`` until the workers finish;
        watch for failures. Returns the workers that failed (``--on-worker-failure
        continue``)."""
        cfg = self.cfg
        next_eval = self.t0 + cfg.eval_interval
        while True:
            alive = [p for p in self.procs if p.exitcode is None]
            if alive:
                wait_any(
                    [p.sentinel for p in alive], timeout=max(0.0, next_eval - time.monotonic())
                )
            self.drain()
            self.check_workers()
            if self.applier is not None and self.applier.errors:
                raise WorkerFailed(f"the async-deferred applier failed: {self.applier.errors[0]}")
            finished = all(p.exitcode is not None for p in self.procs)
            if time.monotonic() >= next_eval or finished:
                next_eval += cfg.eval_interval * max(
                    1, math.ceil((time.monotonic() - next_eval) / cfg.eval_interval)
                )
                evaluator.snapshot(self.reports, len(alive))
            if finished:
                evaluator.flush()
                evaluator.take_train(self.reports.train_summary())  # reports after the last
                return self.failed

    def drain(self) -> None:
        while msgs := receive(self.ctl.reports):
            for msg in msgs:
                self.reports.take(msg)

    def check_workers(self) -> None:
        """Report workers that died; stop (abort) or note it (continue)."""
        failed, reports = self.failed, self.reports
        for w, p in enumerate(self.procs):
            if p.exitcode is None or w in failed or (p.exitcode == 0 and w in reports.done):
                continue
            self.drain()
            if p.exitcode == EXIT_STOPPED and failed:
                failed.append(w)
                continue
            why = reports.errors.get(w)
            msg = f"worker {w} died ({exit_text(p.exitcode)})" + (f": {why}" if why else "")
            failed.append(w)
            if self.cfg.on_worker_failure == "abort":
                raise WorkerFailed(
                    msg + "; the other workers were stopped (--on-worker-failure "
                    "continue lets them finish)"
                )
            log.warning(
                f"hvdsgd: warning: {msg}; the other workers go on (--on-worker-failure continue)"
            )

    def train_time(self) -> float:
        """From the start signal to the last worker's last step."""
        return max((b[1] for b in self.reports.busy.values()), default=time.monotonic()) - self.t0

    # -------------------------------------------------------------------------- stop

    def stop(self) -> None:
        """Terminate workers still running (SIGTERM, then SIGKILL after 2 s), reap them all,
        and let the applier finish the deposits in its queue."""
        for p in self.procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.time() + 2.0
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.time()))
            if p.exitcode is None:
                p.kill()
                p.join()
        if self.applier is not None:
            self.applier.stop()
