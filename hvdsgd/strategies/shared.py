"""HOGWILD! and the parameter-server policies: CPU worker processes, one shared buffer.

    python -m hvdsgd.train --strategy hogwild --workers 4 --model mlp
    python -m hvdsgd.train --strategy sharded --shards 4 --workers 2 --eval-interval 0.5

N worker processes (spawn, one compute thread each) train one model whose parameters live
in one shared-memory buffer (:mod:`hvdsgd.shm`). Every worker runs the engine's training
step on its own shard of the training set, in its own shuffled order, with a private
momentum buffer and a preallocated flat gradient; its ``Updater`` turns the gradient into
an update of the shared buffer by the policy of ``--strategy``:

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
directory as synchronous training. A worker that dies is reported by index and exit code;
``--on-worker-failure`` decides whether the others stop or finish. The segments are
unlinked once every worker has attached, and again on every way out.
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
from ..data import ShardSampler
from ..config import TrainConfig
from ..engine import evaluate, seed, train_epoch
from ..errors import UsageError
from ..metrics import Summary, Tally

log = logging.getLogger("hvdsgd")

KERNEL_POLICY = {"hogwild": "hogwild", "lockfree": "hogwild", "atomic": "atomic",
                 "locked": "locked", "sharded": "sharded", "async-apply": "locked",
                 "async-deferred": "hogwild", "sync": "hogwild"}
ACCURACY_TARGETS = (0.9, 0.95, 0.97)
EXIT_STOPPED = 3  # a worker that stopped because another one failed
REPORT_S = 0.1    # a worker reports its training loss and epoch count at most this often


class WorkerFailed(UsageError):
    """A worker process died or raised; the message names it and its exit code."""


# ------------------------------------------------------------------------------ updaters

@dataclass
class Control:
    """The parent's channels to the workers (all inherited at spawn)."""
    start: Any                      # Event: every worker attached; go
    reports: Any                    # SimpleQueue: worker -> parent messages
    barrier: Any = None             # sync
    free: Any = None                # async-deferred: free slot ids
    filled: Any = None              # async-deferred: (slot, worker, read_version, lr)


class SharedUpdater:
    """The engine's ``Updater`` for one worker: flat gradient -> the shared buffer."""

    def __init__(self, cfg: TrainConfig, w: int, shared: shm.SharedModel,
                 model: torch.nn.Module, steps_per_epoch: int, ctl: Control):
        self.cfg, self.w, self.buf, self.ctl = cfg, w, shared.params, ctl
        self.model = model
        self.policy = KERNEL_POLICY[cfg.strategy]
        self.world_scale = float(cfg.workers) if cfg.strategy == "sync" else 1.0
        self.peak = cfg.lr * self.world_scale
        self.factor = schedule.multiplier(
            cfg.scheduler, cfg.epochs * steps_per_epoch,
            round(cfg.warmup_epochs * steps_per_epoch), 1.0 / self.world_scale)
        self.private = None
        if cfg.strategy == "async-apply":   # a private copy of the weights, refreshed per update
            self.private = torch.from_numpy(shared.snapshot())
            shm.bind(shm._params(model), self.private)
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
        staleness = self.buf.apply(self.w, grad, self.lr, self.policy, read_version,
                                   self.momentum_buf, self.cfg.momentum, self.cfg.weight_decay,
                                   False, self.first, read_into)
        self.first = False
        return staleness

    def _direct(self) -> None:   # hogwild, lockfree, atomic, locked, sharded
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
        self.ctl.barrier.wait()          # every gradient deposited
        if self.w == 0:
            np.copyto(self.mean, self.buf.slot(0))
            for k in range(1, self.cfg.workers):
                self.mean += self.buf.slot(k)
            self.mean *= 1.0 / self.cfg.workers
            self._apply(self.mean, self.buf.updates)
        self.ctl.barrier.wait()          # the update is in: everyone reads the new weights


def applier(buf, ctl: Control, cfg: TrainConfig, errors: list) -> None:
    """async-deferred: apply deposited gradients in arrival order (a thread of the parent)."""
    momentum_buf = np.zeros(buf.size, np.float32) if cfg.momentum else None
    first = True
    try:
        while (item := ctl.filled.get()) is not None:
            slot, w, version, lr = item
            buf.apply(w, buf.slot(slot), lr, "hogwild", version, momentum_buf, cfg.momentum,
                      cfg.weight_decay, False, first, None)
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
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    try:
        cfg = TrainConfig(**cfg_dict)
        model = models.build(cfg.model, spec["input_shape"], spec["num_classes"])
        shared = shm.SharedModel.attach(spec["names"], model)
        x, y = spec["train_x"], spec["train_y"]
        sampler = ShardSampler(len(y), w, cfg.workers, cfg.seed)
        batches = data.Batches(x, y, cfg.batch_size, sampler, cpu,
                               channels_last=cfg.channels_last)
        steps_per_epoch = math.ceil(len(batches) / cfg.accum_steps)
        updater = SharedUpdater(cfg, w, shared, model, steps_per_epoch, ctl)
        ctl.reports.put(("ready", w))
        ctl.start.wait()
        t_first = time.monotonic()
        tally, last_report = Tally(spec["num_classes"], cpu), time.monotonic()
        for epoch in range(cfg.epochs):
            seed(cfg.seed + 1000 * epoch + w, cpu)  # dropout etc.: (seed, epoch, worker)
            sampler.set_epoch(epoch)
            train_epoch(model, batches, updater, cpu, cfg.amp, cfg.accum_steps,
                        tally, max_steps=2 if cfg.dry_run else None)
            # Report at most every REPORT_S: small epochs last milliseconds.
            if time.monotonic() - last_report >= REPORT_S or epoch + 1 == cfg.epochs:
                tally.flush()
                ctl.reports.put(("epoch", w, epoch + 1, tally.loss.item(),
                                 tally.confusion.tolist(), updater.lr))
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
            ctl.reports.put(("usage" if usage else "error", w,
                             str(e) if usage else f"{type(e).__name__}: {e}"))
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
    busy: dict = field(default_factory=dict)      # worker -> (first step, last step), monotonic

    def __post_init__(self):
        self.epochs_done = [0] * self.workers
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def take(self, msg: tuple) -> None:
        kind, w = msg[0], msg[1]
        if kind == "ready":
            self.ready.add(w)
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


class _Stop(KeyboardInterrupt):
    """SIGTERM to the parent: unwind through the clean-up like Ctrl-C."""


def _raise_stop(signum, frame):
    raise _Stop()


def run(cfg: TrainConfig, ds: data.Dataset) -> dict:
    """Train ``cfg`` with a shared-buffer strategy; returns the summary (written to --out)."""
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # the parent only evaluates: leave the cores to the workers
    cpu = torch.device("cpu")
    n_train = len(ds.train_y)
    if cfg.workers > n_train:
        raise UsageError(f"--workers {cfg.workers} but only {n_train} training samples; "
                         "use fewer workers")
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.input_shape, ds.num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    run_dir = report.RunDir(cfg.out)
    run_dir.prepare()

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
    spec = {"names": shared.names, "input_shape": ds.input_shape,
            "num_classes": ds.num_classes,
            "train_x": ds.train_x.share_memory_(), "train_y": ds.train_y.share_memory_()}
    test_batches = data.Batches(ds.test_x, ds.test_y, 512, range(len(ds.test_y)), cpu,
                                channels_last=cfg.channels_last)
    progress = Progress(cfg.workers, ds.num_classes)
    procs: list = []
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    applier_thread, applier_errors = None, []
    try:
        for w in range(cfg.workers):
            p = ctx.Process(target=worker, args=(w, cfg.to_dict(), spec, ctl),
                            name=f"hvdsgd-worker-{w}", daemon=True)
            p.start()
            procs.append(p)
        if cfg.strategy == "async-deferred":
            applier_thread = threading.Thread(
                target=applier, args=(shared.params, ctl, cfg, applier_errors), daemon=True)
            applier_thread.start()

        log.info(f"hvdsgd: {cfg.model} ({n_params:,} parameters) on {ds.name} "
                 f"({n_train} train / {len(ds.test_y)} test), --strategy {cfg.strategy}"
                 + (f" ({shards} shards)" if shards > 1 else "")
                 + f", {cfg.workers} worker process{'es' * (cfg.workers > 1)} x 1 thread, "
                 f"batch {cfg.batch_size}, lr {cfg.lr:g} ({cfg.scheduler}); shared buffer "
                 f"{shared.params.name}")
        _wait_ready(procs, progress, ctl, cfg)
        shared.unlink()  # every worker has mapped it: /dev/shm keeps nothing from here on
        ctl.start.set()
        t0 = time.monotonic()  # system-wide on Linux: comparable with the workers' clocks
        evaluator = Evaluator(cfg, shared, ds, test_batches, run_dir, t0, n_train)
        # --profile: the CPU use of this process and its workers, beside training.
        with report.profiled(cfg, run_dir.path) as prof:
            failed = _supervise(cfg, procs, progress, ctl, evaluator, applier_errors)
        rows = evaluator.rows
        # Training time: from the start signal to the last worker's last step.
        train_time = max((b[1] for b in progress.busy.values()), default=time.monotonic()) - t0
    except (KeyboardInterrupt, _Stop):
        log.info("hvdsgd: interrupted; stopping the workers")
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        _stop(procs)
        if applier_thread is not None:
            with contextlib.suppress(Exception):
                ctl.filled.put(None)
            applier_thread.join(timeout=2)
        shared.unlink()

    test = evaluate(model, test_batches, cpu, cfg.amp, Tally(ds.num_classes, cpu)).local()
    shard = len(ShardSampler(n_train, 0, cfg.workers, cfg.seed))
    if cfg.dry_run:
        shard = min(shard, 2 * cfg.batch_size * cfg.accum_steps)
    samples = sum(progress.epochs_done) * shard
    # Each worker's own rate over its own first-to-last step, summed: the throughput with
    # every worker running, without the tail in which the last one finishes alone.
    aggregate = sum(progress.epochs_done[w] * shard / max(end - begin, 1e-9)
                    for w, (begin, end) in progress.busy.items())
    stats = shared.params.stats(-1)
    reached = {f"{t:g}": next((r["time_s"] for r in rows if r["test_accuracy"] >= t), None)
               for t in ACCURACY_TARGETS}
    summary = report.summary(
        cfg, ds.name, cfg.strategy, cfg.workers, n_params, test, rows[-1] if rows else {},
        samples, train_time, time.perf_counter() - t_start, "cpu", 1,
        workers=cfg.workers, shards=shards, updates=shared.params.updates,
        aggregate_samples_per_sec=aggregate,
        staleness_mean=stats["staleness_mean"], staleness_p95=stats["staleness_p95"],
        staleness_max=stats["staleness_max"], time_to_accuracy_s=reached,
        failed_workers=failed, **report.profile_figures(prof))
    run_dir.write_summary(summary)
    run_dir.plot(test.confusion.numpy(), ds.classes)
    if cfg.checkpoint and not cfg.dry_run:
        ident = checkpoint.identity(cfg, model, ds.input_shape, ds.num_classes)
        checkpoint.save(run_dir.path / checkpoint.NAME,
                        {"model": model.state_dict(), "epoch": cfg.epochs, "identity": ident,
                         "strategy": {}, "config": cfg.to_dict()})
    log.info(f"done: test accuracy {100 * test.accuracy:.2f}%, macro-F1 {test.macro_f1:.4f}, "
             f"{summary['samples_per_sec']:,.0f} samples/s, staleness mean "
             f"{stats['staleness_mean']:.2f} p95 {stats['staleness_p95']:.0f} max "
             f"{stats['staleness_max']:.0f}, {summary['wall_time_s']:.1f} s; "
             f"results in {run_dir.path}/")
    return summary


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
            raise WorkerFailed(msg + "; the other workers were stopped (--on-worker-failure "
                               "continue lets them finish)")
        log.warning(f"hvdsgd: warning: {msg}; the other workers go on (--on-worker-failure continue)")


def _wait_ready(procs, progress: Progress, ctl: Control, cfg: TrainConfig) -> None:
    """Wait until every worker has attached and built its model."""
    while len(progress.ready) < cfg.workers:
        wait_any([p.sentinel for p in procs], timeout=0.05)
        _drain(ctl, progress)
        for w, p in enumerate(procs):
            if p.exitcode is not None and w not in progress.ready:
                _drain(ctl, progress)
                if w in progress.usage:
                    raise UsageError(progress.usage[w])  # the user's fix, as the worker said it
                why = progress.errors.get(w)
                raise WorkerFailed(f"worker {w} failed while starting ({_exit_text(p.exitcode)})"
                                   + (f": {why}" if why else ""))


class Evaluator:
    """Snapshots of the shared weights every ``eval_interval`` s, evaluated on the test set.

    A snapshot is one copy of the buffer (microseconds for small models), so the workers are
    never stopped and hardly disturbed; the copies are evaluated in batches, at least every
    ``flush_s`` seconds and whenever they hold more than ``max_bytes``, and each becomes a
    row of metrics.jsonl stamped with the time it was taken.
    """

    flush_s, max_bytes = 2.0, 64 * 2**20

    def __init__(self, cfg, shared: shm.SharedModel, ds, test_batches, run_dir, t0, n_train):
        self.cfg, self.shared, self.ds, self.test, self.run_dir = cfg, shared, ds, test_batches, run_dir
        self.t0, self.n_train = t0, n_train
        self.model = models.build(cfg.model, ds.input_shape, ds.num_classes)
        self.flat = torch.zeros(shared.params.size)
        shm.bind(shm._params(self.model), self.flat)
        self.state = None
        if shared.state is not None:
            self.state = torch.zeros(shared.state.size)
            shm.bind(shm._float_buffers(self.model), self.state)
        self.pending: list = []
        self.rows: list = []
        self.last_flush = time.monotonic()
        self.last_train: dict = {}
        self.samples_per_update = cfg.batch_size * cfg.accum_steps * (
            cfg.workers if cfg.strategy == "sync" else 1)

    def snapshot(self, progress: "Progress", alive: int) -> None:
        now = time.monotonic()
        state = (torch.from_numpy(self.shared.state.params()).clone()
                 if self.shared.state is not None else None)
        self.pending.append({"t": now - self.t0, "updates": self.shared.params.updates,
                             "params": self.shared.flat.clone(), "state": state,
                             "train": progress.train_summary(), "lr": progress.lr,
                             "alive": alive})
        size = sum(p["params"].numel() * 4 for p in self.pending)
        if size > self.max_bytes or now - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        cpu = torch.device("cpu")
        for snap in self.pending:
            self.flat.copy_(snap["params"])
            if self.state is not None:
                self.state.copy_(snap["state"])
            test = evaluate(self.model, self.test, cpu, self.cfg.amp,
                            Tally(self.ds.num_classes, cpu)).local()
            if snap["train"] is not None:
                tr = snap["train"]
                self.last_train = {"train_loss": tr.loss, "train_accuracy": tr.accuracy,
                                   "train_macro_f1": tr.macro_f1}
            stats = self.shared.params.stats(-1)
            row = {"time_s": snap["t"],
                   "epoch": snap["updates"] * self.samples_per_update / self.n_train,
                   "epochs": self.cfg.epochs, "updates": snap["updates"], **self.last_train,
                   **test.as_dict("test"), "lr": snap["lr"],
                   "staleness_mean": stats["staleness_mean"], "workers_alive": snap["alive"]}
            self.rows.append(row)
            self.run_dir.log_epoch(row)
            log.info(f"{row['time_s']:7.2f} s  epoch {min(row['epoch'], self.cfg.epochs):5.2f}/"
                     f"{self.cfg.epochs}  updates {row['updates']:>7}  test loss {test.loss:.4f} "
                     f"acc {100 * test.accuracy:5.2f}%")
        self.pending.clear()
        self.last_flush = time.monotonic()


def _supervise(cfg, procs, progress: "Progress", ctl: Control, evaluator: Evaluator,
               applier_errors: list) -> list:
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
            next_eval += cfg.eval_interval * max(1, math.ceil(
                (time.monotonic() - next_eval) / cfg.eval_interval))
            evaluator.snapshot(progress, len(alive))
        if finished:
            evaluator.flush()
            return failed


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
