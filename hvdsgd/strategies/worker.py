"""One shared-buffer worker process: attach to the segments, train ``--epochs`` passes over its
shard with the engine's epoch loop and a ``SharedUpdater``, report to the parent, exit.

Messages on the worker's own ``WorkerEnds.report`` pipe (read by
:class:`hvdsgd.strategies.supervisor.WorkerReports`):
``("ready", w, threads)``, ``("epoch", w, epochs_done, loss_sum, confusion, lr)`` at most every
``REPORT_S``, ``("done", w, first_step, last_step)`` (monotonic clock), and on failure
``("usage", w, message)`` or ``("error", w, message)``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch

from .. import data, models, shm
from ..config import TrainConfig
from ..engine import run_epoch, steps_per_epoch
from ..errors import UsageError
from ..metrics import Tally
from .updaters import SharedUpdater, WorkerEnds, wait_start

EXIT_STOPPED = 3  # a worker that stopped because another one failed
REPORT_S = 0.1  # a worker reports its training loss and epoch count at most this often


def die_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, however it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker(w: int, cfg_dict: dict, spec: dict, ends: WorkerEnds) -> None:
    """Worker ``w``: attach, train ``epochs`` passes over its shard, report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    die_with_parent()
    cpu = torch.device("cpu")
    try:
        cfg = TrainConfig(**cfg_dict)
        torch.set_num_threads(cfg.threads or 1)
        model = models.build(cfg.model, spec["input_shape"], spec["num_classes"])
        shared = shm.SharedModel.attach(spec["names"], model)
        x, y = spec["train_x"], spec["train_y"]
        sampler = data.ShardSampler(len(y), w, cfg.workers, cfg.seed)
        batches = data.Batches(x, y, cfg.batch_size, sampler, cpu, channels_last=cfg.channels_last)
        steps = steps_per_epoch(len(y), cfg.workers, cfg.batch_size, cfg.accum_steps)
        updater = SharedUpdater(cfg, w, shared, model, steps, ends)
        ends.report.send(("ready", w, torch.get_num_threads()))
        wait_start(ends)
        t_first = time.monotonic()
        tally, last_report = Tally(spec["num_classes"], cpu), time.monotonic()
        for epoch in range(cfg.epochs):
            run_epoch(model, batches, updater, cpu, cfg, epoch, tally, base_seed=cfg.seed, who=w)
            # Report at most every REPORT_S: small epochs last milliseconds.
            if time.monotonic() - last_report >= REPORT_S or epoch + 1 == cfg.epochs:
                tally.flush()
                ends.report.send(
                    ("epoch", w, epoch + 1, tally.loss.item(), tally.confusion.tolist(), updater.lr)
                )
                tally, last_report = Tally(spec["num_classes"], cpu), time.monotonic()
        ends.report.send(("done", w, t_first, time.monotonic()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # nothing left to clean up; torch's interpreter teardown is slow
    except threading.BrokenBarrierError:
        os._exit(EXIT_STOPPED)  # another worker failed; the parent reports it
    except BaseException as e:
        usage = isinstance(e, UsageError)
        with contextlib.suppress(Exception):
            ends.report.send(
                ("usage" if usage else "error", w, str(e) if usage else f"{type(e).__name__}: {e}")
            )
        sys.stdout.flush()
        os._exit(1)
