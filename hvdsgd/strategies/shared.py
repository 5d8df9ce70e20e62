"""HOGWILD! and the parameter-server policies: CPU worker processes, one shared buffer.

    python -m hvdsgd.train --strategy hogwild --workers 4 --model mlp
    python -m hvdsgd.train --strategy sharded --shards 4 --workers 2 --eval-interval 0.5

N worker processes (spawn, ``--threads`` compute threads each, default 1) train one model
whose parameters live in one shared-memory buffer (:mod:`hvdsgd.shm`). Every worker runs the
engine's training step on its own shard of the training set, in its own shuffled order, with
a private momentum buffer and a preallocated flat gradient; its ``Updater`` turns the gradient
into an update of the shared buffer by the policy of ``--strategy``:

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

The parent evaluates the shared weights on the test set every ``--eval-interval`` seconds
without stopping the workers, logs accuracy against wall time, and writes the same run
directory as synchronous training; an epoch is every worker's pass over its shard, so
``updates / (workers x steps per shard)`` (``sync``: one update per step for all). A worker
that dies is reported by index and exit code; ``--on-worker-failure`` decides whether the
others stop or finish. Ctrl-C, SIGTERM or SIGHUP stops the workers and writes the shared
weights as ``checkpoint.pt`` before the one-line exit. More worker threads than cores gets a
warning, and start-up progress every few seconds. The segments are unlinked once every worker
has attached, and again on every way out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from typing import Any

import numpy as np
import torch
import torch.multiprocessing

from .. import checkpoint, data, models, report, schedule, shm
from ..config import TrainConfig
from ..data import ShardSampler
from ..engine import evaluate, run_epoch, steps_per_epoch
from ..errors import Terminated, UsageError
from ..metrics import Summary, Tally

log = logging.getLogger("hvdsgd")

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
ACCURACY_TARGETS = (0.9, 0.95, 0.97)
EXIT_STOPPED = 3  # a worker that stopped because another one failed
REPORT_S = 0.1  # a worker reports its training loss and epoch count at most this often
START_REPORT_S = 5.0  # the parent logs how many workers have started at most this often


class WorkerFailed(UsageError):
    """A worker process died or raised; the message names it and its exit code."""


# ------------------------------------------------------------------------------ updaters


@dataclass
class Control:
    """The parent's channels to the workers (all inherited at spawn)."""

    start: Any  # Event: every worker attached; go
    reports: Any  # SimpleQueue: worker -> parent messages
    barrier: Any = None  # sync
    free: Any = None  # async-deferred: free slot ids
    filled: Any = None  # async-deferred: (slot, worker, read_version, lr)


class SharedUpdater:
    """The engine's ``Updater`` for one worker: flat gradient -> the shared buffer."""

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
        self.policy = KERNEL_POLICY[cfg.strategy]
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
        self.momentum_buf = np.zeros(n, np.float32) if cfg.momentum else None
        self.mean = np.empty(n, np.float32) if cfg.strategy == "sync" else None
        self.first, self.step = True, 0
        self.version = self.buf.updates
        self.lr = self.peak * self.factor(0)
        self._policy_update = getattr(self, "_" + cfg.strategy.replace("-", "_"), self._direct)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()  # accumulates into the flat gradient buffer

    def update(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.lr = self.peak * self.factor(self.step)
        self._policy_update()
        self.grad.zero_()
        self.step += 1

    def _apply(self, grad: np.ndarray, read_version: int, read_into=None) -> int:
        staleness = self.buf.apply(
            self.w,
            grad,
            self.lr,
            policy=self.policy,
            read_version=read_version,
            momentum_buf=self.momentum_buf,
            momentum=self.cfg.momentum,
            weight_decay=self.cfg.weight_decay,
            first_step=self.first,
            read_into=read_into,
        )
        self.first = False
        return staleness

    def _direct(self) -> None:  # hogwild, lockfree, atomic, locked, sharded
        self._apply(self.g, self.version)
        self.version = self.buf.updates  # the next forward pass reads from here on

    def _async_apply(self) -> None:
        staleness = self._apply(self.g, self.version, read_into=self.private.numpy())
        # Under the lock the fresh copy is exactly the buffer just after this update.
        self.version += staleness + 1

    def _async_deferred(self) -> None:
        slot = self.ctl.free.get()
        np.copyto(self.buf.slot(slot), self.g)
        self.ctl.filled.put((slot, self.w, self.version, self.lr))
        self.version = self.buf.updates  # go on with whatever has been applied so far

    def _sync(self) -> None:
        np.copyto(self.buf.slot(self.w), self.g)
        self.ctl.barrier.wait()  # every gradient deposited
        if self.w == 0:
            np.copyto(self.mean, self.buf.slot(0))
            for k in range(1, self.cfg.workers):
                self.mean += self.buf.slot(k)
            self.mean *= 1.0 / self.cfg.workers
            self._apply(self.mean, self.buf.updates)
        self.ctl.barrier.wait()  # the update is in: everyone reads the new weights


def applier(buf, ctl: Control, cfg: TrainConfig, errors: list) -> None:
    """async-deferred: apply deposited gradients in arrival order (a thread of the parent)."""
    momentum_buf = np.zeros(buf.size, np.float32) if cfg.momentum else None
    first = True
    try:
        while (item := ctl.filled.get()) is not None:
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
            ctl.free.put(slot)
    except Exception as e:  # pragma: no cover - reported by the parent
        errors.append(e)


# ------------------------------------------------------------------------------- workers


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, however it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker(w: int, cfg_dict: dict, spec: dict, ctl: Control) -> None:
    """One worker process: attach, train ``epochs`` passes over its shard, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    _die_with_parent()
    cpu = torch.device("cpu")
    try:
        cfg = TrainConfig(**cfg_dict)
        torch.set_num_threads(cfg.threads or 1)
        model = models.build(cfg.model, spec["input_shape"], spec["num_classes"])
        shared = shm.SharedModel.attach(spec["names"], model)
        x, y = spec["train_x"], spec["train_y"]
        sampler = ShardSampler(len(y), w, cfg.workers, cfg.seed)
        batches = data.Batches(x, y, cfg.batch_size, sampler, cpu, channels_last=cfg.channels_last)
        steps = steps_per_epoch(len(y), cfg.workers, cfg.batch_size, cfg.accum_steps)
        updater = SharedUpdater(cfg, w, shared, model, steps, ctl)
        ctl.reports.put(("ready", w, torch.get_num_threads()))
        ctl.start.wait()
        t_first = time.monotonic()
        tally, last_report = Tally(spec["num_classes"], cpu), time.monotonic()
        for epoch in range(cfg.epochs):
            run_epoch(model, batches, updater, cpu, cfg, epoch, tally, base_seed=cfg.seed, who=w)
            # Report at most every REPORT_S: small epochs last milliseconds.
            if time.monotonic() - last_report >= REPORT_S or epoch + 1 == cfg.epochs:
                tally.flush()
                ctl.reports.put(
                    ("epoch", w, epoch + 1, tally.loss.item(), tally.confusion.tolist(), updater.lr)
                )
                tally, last_report = Tally(spec["num_classes"], cpu), time.monotonic()
        ctl.reports.put(("done", w, t_first, time.monotonic()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # nothing left to clean up; torch's interpreter teardown takes ~0.6 s
    except threading.BrokenBarrierError:
        os._exit(EXIT_STOPPED)  # another worker failed; the parent reports it
    except BaseException as e:
        usage = isinstance(e, UsageError)
        with contextlib.suppress(Exception):
            ctl.reports.put(
                ("usage" if usage else "error", w, str(e) if usage else f"{type(e).__name__}: {e}")
            )
        sys.stdout.flush()
        os._exit(1)


# -------------------------------------------------------------------------------- parent


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exit code {code}, killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class Progress:
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


def _raise_terminated(signum, frame):
    raise Terminated(signum)  # unwinds through the clean-up like Ctrl-C


def steps_per_shard(cfg: TrainConfig, n_train: int) -> int:
    """Steps of one worker's epoch (one pass over its shard of ``n_train`` samples)."""
    return steps_per_epoch(n_train, cfg.workers, cfg.batch_size, cfg.accum_steps, cfg.dry_run)


def updates_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    """Updates of the shared buffer in one epoch: every worker's pass over its shard."""
    return steps_per_shard(cfg, n_train) * (1 if cfg.strategy == "sync" else cfg.workers)


def real_samples(cfg: TrainConfig, n_train: int, w: int) -> int:
    """Distinct samples in worker ``w``'s epoch: its shard without the repeats that pad it."""
    n = len(range(w, n_train, cfg.workers))
    return min(n, 2 * cfg.batch_size * cfg.accum_steps) if cfg.dry_run else n


def _warn_oversubscribed(cfg: TrainConfig) -> None:
    """One warning when the workers' compute threads outnumber this process's cores."""
    cores, threads = len(os.sched_getaffinity(0)), cfg.threads or 1
    if cfg.workers * threads > cores:
        log.warning(
            f"hvdsgd: warning: {cfg.workers} workers x {threads} thread"
            f"{'s' * (threads > 1)} on {cores} core{'s' * (cores > 1)} is oversubscribed: "
            f"starting and training will be slow; use --workers "
            f"{max(1, cores // threads)} for one thread per core"
        )


def run(cfg: TrainConfig, ds: data.Dataset) -> dict:
    """Train ``cfg`` with a shared-buffer strategy; returns the summary (written to --out)."""
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # the parent only evaluates: leave the cores to the workers
    cpu = torch.device("cpu")
    n_train = len(ds.train_y)
    if cfg.workers > n_train:
        raise UsageError(
            f"--workers {cfg.workers} but only {n_train} training samples; use fewer workers"
        )
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.input_shape, ds.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    run_dir = report.RunDir(cfg.out, tensorboard=cfg.tensorboard)
    run_dir.prepare(overwrite=cfg.overwrite)

    ctx = torch.multiprocessing.get_context("spawn")  # shares the data tensors, no copy
    slots = {"sync": cfg.workers, "async-deferred": 2 * cfg.workers}.get(cfg.strategy, 0)
    shards = cfg.shards if cfg.strategy == "sharded" else 1
    if shards > n_params:
        raise UsageError(f"--shards {shards} is more than the model's {n_params} parameters")
    shared = shm.SharedModel.create(model, cfg.workers, shards=shards, slots=slots)
    ctl = Control(start=ctx.Event(), reports=ctx.SimpleQueue())
    if cfg.strategy == "sync":
        ctl.barrier = ctx.Barrier(cfg.workers)
    if cfg.strategy == "async-deferred":
        ctl.free, ctl.filled = ctx.SimpleQueue(), ctx.SimpleQueue()
        for s in range(slots):
            ctl.free.put(s)
    spec = {
        "names": shared.names,
        "input_shape": ds.input_shape,
        "num_classes": ds.num_classes,
        "train_x": ds.train_x.share_memory_(),
        "train_y": ds.train_y.share_memory_(),
    }
    test_batches = data.Batches(
        ds.test_x, ds.test_y, 512, range(len(ds.test_y)), cpu, channels_last=cfg.channels_last
    )
    progress = Progress(cfg.workers, ds.num_classes)
    procs: list = []
    applier_thread, applier_errors = None, []
    threads = cfg.threads or 1
    old_handlers = {
        sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    started = False
    try:
        log.info(
            f"hvdsgd: {cfg.model} ({n_params:,} parameters) on {ds.name} "
            f"({n_train} train / {len(ds.test_y)} test), --strategy {cfg.strategy}"
            + (f" ({shards} shards)" if shards > 1 else "")
            + f", {cfg.workers} worker process{'es' * (cfg.workers > 1)} x {threads} "
            f"thread{'s' * (threads > 1)}, batch {cfg.batch_size}, lr {cfg.lr:g} "
            f"({cfg.scheduler}); shared buffer {shared.params.name}"
        )
        _warn_oversubscribed(cfg)
        for w in range(cfg.workers):
            p = ctx.Process(
                target=worker,
                args=(w, cfg.to_dict(), spec, ctl),
                name=f"hvdsgd-worker-{w}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        if cfg.strategy == "async-deferred":
            applier_thread = threading.Thread(
                target=applier, args=(shared.params, ctl, cfg, applier_errors), daemon=True
            )
            applier_thread.start()
        _wait_ready(procs, progress, ctl, cfg)
        shared.unlink()  # every worker has mapped it: /dev/shm keeps nothing from here on
        ctl.start.set()
        started = True
        t0 = time.monotonic()  # system-wide on Linux: comparable with the workers' clocks
        evaluator = Evaluator(cfg, shared, ds, test_batches, run_dir, t0, n_train)
        # --profile: the CPU use of this process and its workers, beside training.
        with report.profiled(cfg, run_dir.path) as prof:
            failed = _supervise(cfg, procs, progress, ctl, evaluator, applier_errors)
        rows = evaluator.rows
        # Training time: from the start signal to the last worker's last step.
        train_time = max((b[1] for b in progress.busy.values()), default=time.monotonic()) - t0
    except KeyboardInterrupt:  # Ctrl-C, or errors.Terminated (SIGTERM, SIGHUP)
        _stop(procs)
        _stop_applier(applier_thread, ctl)  # the buffer holds still: a consistent checkpoint
        if started:
            _save_interrupted(cfg, model, ds, run_dir, shared)
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        _stop(procs)
        _stop_applier(applier_thread, ctl)
        shared.unlink()

    test = evaluate(model, test_batches, cpu, cfg.amp, Tally(ds.num_classes, cpu)).local()
    # Samples trained on, without the repeats that pad the shards to equal length.
    seen = [progress.epochs_done[w] * real_samples(cfg, n_train, w) for w in range(cfg.workers)]
    samples = sum(seen)
    # Each worker's own rate over its own first-to-last step, summed: the throughput with
    # every worker running, without the tail in which the last one finishes alone.
    aggregate = sum(seen[w] / max(end - begin, 1e-9) for w, (begin, end) in progress.busy.items())
    stats = shared.params.stats(-1)
    reached = {
        f"{t:g}": next((r["time_s"] for r in rows if r["test_accuracy"] >= t), None)
        for t in ACCURACY_TARGETS
    }
    summary = report.summary(
        cfg,
        ds.name,
        cfg.strategy,
        cfg.workers,
        n_params,
        test,
        {**(rows[-1] if rows else {}), **evaluator.last_train},
        samples,
        train_time,
        time.perf_counter() - t_start,
        "cpu",
        max(progress.threads.values(), default=threads),
        workers=cfg.workers,
        shards=shards,
        updates=shared.params.updates,
        train_samples=samples,
        aggregate_samples_per_sec=aggregate,
        staleness_mean=stats["staleness_mean"],
        staleness_p95=stats["staleness_p95"],
        staleness_max=stats["staleness_max"],
        time_to_accuracy_s=reached,
        failed_workers=failed,
        **report.profile_figures(prof),
    )
    run_dir.write_summary(summary)
    run_dir.plot(test.confusion.numpy(), ds.classes)
    if cfg.checkpoint and not cfg.dry_run:
        _save_checkpoint(cfg, model, ds, run_dir, cfg.epochs, shared.params.updates)
    log.info(
        f"done: test accuracy {100 * test.accuracy:.2f}%, macro-F1 {test.macro_f1:.4f}, "
        f"{summary['samples_per_sec']:,.0f} samples/s, staleness mean "
        f"{stats['staleness_mean']:.2f} p95 {stats['staleness_p95']:.0f} max "
        f"{stats['staleness_max']:.0f}, {summary['wall_time_s']:.1f} s; "
        f"results in {run_dir.path}/"
    )
    return summary


def _save_checkpoint(
    cfg: TrainConfig,
    model: torch.nn.Module,
    ds: data.Dataset,
    run_dir: report.RunDir,
    epoch: int,
    updates: int,
) -> None:
    """``checkpoint.pt`` of the shared weights: tensors and plain data only (weights_only)."""
    ident = checkpoint.identity(cfg, model, ds.input_shape, ds.num_classes)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}  # off the segment
    checkpoint.save(
        run_dir.path / checkpoint.NAME,
        {
            "model": weights,
            "epoch": epoch,
            "updates": updates,
            "identity": ident,
            "strategy": {},
            "config": cfg.to_dict(),
        },
    )


def _save_interrupted(
    cfg: TrainConfig,
    model: torch.nn.Module,
    ds: data.Dataset,
    run_dir: report.RunDir,
    shared: shm.SharedModel,
) -> None:
    """After the workers stopped: the weights as they are, with the whole epochs completed."""
    if not cfg.checkpoint or cfg.dry_run:
        return
    updates = shared.params.updates
    epoch = updates // updates_per_epoch(cfg, len(ds.train_y))
    try:
        _save_checkpoint(cfg, model, ds, run_dir, epoch, updates)
    except UsageError as e:  # still an interruption: say why there is no checkpoint
        log.warning(f"hvdsgd: warning: {e}")
        return
    log.info(
        f"stopped after {updates} updates ({epoch} whole epochs of {cfg.epochs}); "
        f"the shared weights are in {run_dir.path / checkpoint.NAME}"
    )


def _drain(ctl: Control, progress: Progress) -> None:
    while not ctl.reports.empty():
        progress.take(ctl.reports.get())


def _check_workers(procs, progress: Progress, cfg: TrainConfig, failed: list, ctl: Control) -> None:
    """Report workers that died; stop (abort) or note it (continue)."""
    for w, p in enumerate(procs):
        if p.exitcode is None or w in failed or (p.exitcode == 0 and w in progress.done):
            continue
        _drain(ctl, progress)
        if p.exitcode == EXIT_STOPPED and failed:
            failed.append(w)
            continue
        why = progress.errors.get(w)
        msg = f"worker {w} died ({_exit_text(p.exitcode)})" + (f": {why}" if why else "")
        failed.append(w)
        if cfg.on_worker_failure == "abort":
            raise WorkerFailed(
                msg + "; the other workers were stopped (--on-worker-failure "
                "continue lets them finish)"
            )
        log.warning(
            f"hvdsgd: warning: {msg}; the other workers go on (--on-worker-failure continue)"
        )


def _wait_ready(procs, progress: Progress, ctl: Control, cfg: TrainConfig) -> None:
    """Wait until every worker has attached and built its model; with ``--progress``, say how
    many have started every START_REPORT_S (oversubscribed, that takes minutes) and when all
    have."""
    t0 = last = time.monotonic()
    while len(progress.ready) < cfg.workers:
        wait_any([p.sentinel for p in procs], timeout=0.05)
        _drain(ctl, progress)
        now = time.monotonic()
        if cfg.progress and (now - last >= START_REPORT_S or len(progress.ready) == cfg.workers):
            last = now
            log.info(f"  started {len(progress.ready)}/{cfg.workers} workers ({now - t0:.1f} s)")
        for w, p in enumerate(procs):
            if p.exitcode is not None and w not in progress.ready:
                _drain(ctl, progress)
                if w in progress.usage:
                    raise UsageError(progress.usage[w])  # the user's fix, as the worker said it
                why = progress.errors.get(w)
                raise WorkerFailed(
                    f"worker {w} failed while starting ({_exit_text(p.exitcode)})"
                    + (f": {why}" if why else "")
                )


class Evaluator:
    """Snapshots of the shared weights every ``eval_interval`` s, evaluated on the test set.

    A snapshot is one copy of the buffer (microseconds for small models), so the workers are
    never stopped and hardly disturbed; the copies are evaluated in batches, at least every
    ``flush_s`` seconds and whenever they hold more than ``max_bytes``, and each becomes a
    row of metrics.jsonl stamped with the time it was taken.
    """

    flush_s, max_bytes = 2.0, 64 * 2**20

    def __init__(self, cfg, shared: shm.SharedModel, ds, test_batches, run_dir, t0, n_train):
        self.cfg, self.shared, self.ds, self.test, self.run_dir = (
            cfg,
            shared,
            ds,
            test_batches,
            run_dir,
        )
        self.t0, self.updates_per_epoch = t0, updates_per_epoch(cfg, n_train)
        self.model = models.build(cfg.model, ds.input_shape, ds.num_classes)
        self.flat = torch.zeros(shared.params.size)
        shm.bind(shm.params_of(self.model), self.flat)
        self.state = None
        if shared.state is not None:
            self.state = torch.zeros(shared.state.size)
            shm.bind(shm.float_buffers_of(self.model), self.state)
        self.pending: list = []
        self.rows: list = []
        self.last_flush = time.monotonic()
        self.last_train: dict = {}
        self.last_updates = -1

    def snapshot(self, progress: "Progress", alive: int) -> None:
        """Copy the weights, unless no update came since the last copy (the same row again)."""
        now = time.monotonic()
        if self.shared.params.updates == self.last_updates:
            return
        self.last_updates = self.shared.params.updates
        state = (
            torch.from_numpy(self.shared.state.params()).clone()
            if self.shared.state is not None
            else None
        )
        self.pending.append(
            {
                "t": now - self.t0,
                "updates": self.shared.params.updates,
                "params": self.shared.flat.clone(),
                "state": state,
                "train": progress.train_summary(),
                "lr": progress.lr,
                "alive": alive,
            }
        )
        size = sum(p["params"].numel() * 4 for p in self.pending)
        if size > self.max_bytes or now - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        cpu = torch.device("cpu")
        for snap in self.pending:
            self.flat.copy_(snap["params"])
            if self.state is not None:
                self.state.copy_(snap["state"])
            test = evaluate(
                self.model, self.test, cpu, self.cfg.amp, Tally(self.ds.num_classes, cpu)
            ).local()
            self.take_train(snap["train"])
            stats = self.shared.params.stats(-1)
            epoch = snap["updates"] / self.updates_per_epoch  # exactly --epochs at the end
            row = {
                "time_s": snap["t"],
                "epoch": epoch,
                "epochs": self.cfg.epochs,
                "updates": snap["updates"],
                **self.last_train,
                **test.as_dict("test"),
                "lr": snap["lr"],
                "staleness_mean": stats["staleness_mean"],
                "workers_alive": snap["alive"],
            }
            self.rows.append(row)
            self.run_dir.log_epoch(row)
            log.info(
                f"{row['time_s']:7.2f} s  epoch {epoch:5.2f}/"
                f"{self.cfg.epochs}  updates {row['updates']:>7}  test loss {test.loss:.4f} "
                f"acc {100 * test.accuracy:5.2f}%"
            )
        self.pending.clear()
        self.last_flush = time.monotonic()

    def take_train(self, tr: Summary | None) -> None:
        """The training metrics of the latest report (kept for the rows that follow)."""
        if tr is not None:
            self.last_train = {
                "train_loss": tr.loss,
                "train_accuracy": tr.accuracy,
                "train_macro_f1": tr.macro_f1,
            }


def _supervise(
    cfg, procs, progress: "Progress", ctl: Control, evaluator: Evaluator, applier_errors: list
) -> list:
    """Snapshot every ``eval_interval`` s until the workers finish; watch for failures."""
    failed: list = []
    next_eval = evaluator.t0 + cfg.eval_interval
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if alive:
            wait_any([p.sentinel for p in alive], timeout=max(0.0, next_eval - time.monotonic()))
        _drain(ctl, progress)
        _check_workers(procs, progress, cfg, failed, ctl)
        if applier_errors:
            raise WorkerFailed(f"the async-deferred applier failed: {applier_errors[0]}")
        finished = all(p.exitcode is not None for p in procs)
        if time.monotonic() >= next_eval or finished:
            next_eval += cfg.eval_interval * max(
                1, math.ceil((time.monotonic() - next_eval) / cfg.eval_interval)
            )
            evaluator.snapshot(progress, len(alive))
        if finished:
            evaluator.flush()
            evaluator.take_train(progress.train_summary())  # reports after the last update
            return failed


def _stop_applier(thread: threading.Thread | None, ctl: Control) -> None:
    """async-deferred: let the applier finish the deposits in its queue, then end it."""
    if thread is not None and thread.is_alive():
        with contextlib.suppress(Exception):
            ctl.filled.put(None)
        thread.join(timeout=2)


def _stop(procs) -> None:
    """Terminate workers still running (SIGTERM, then SIGKILL after 2 s) and reap them all."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.time() + 2.0
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.time()))
        if p.exitcode is None:
            p.kill()
            p.join()
