"""One run's lifecycle, the same for every strategy: the run directory, the lines a user sees,
the metrics rows, the checkpoint and the summary.

A strategy (``train.SyncRun``, ``strategies.shared.SharedRun``) trains; a ``Run`` writes:

- ``prepare``: ``--out`` made, locked, and refused when it holds an earlier run's results
  (unless ``--resume`` continues it or ``--overwrite`` replaces it);
- ``announce``: the start line (``hvdsgd: MODEL (N parameters) on DATA (...), HOW``);
- ``record``: one metrics row (an epoch, or one evaluation of a shared-buffer run): its line
  on the log, the row in ``metrics.jsonl``, and, with the model, the checkpoint;
- ``save_checkpoint``: ``checkpoint.pt`` (nothing under ``--no-checkpoint`` or ``--dry-run``);
- ``finish``: ``summary.json`` from ``report.summary`` with the strategy's own keys, the
  plots, and the ``done:`` line.

Files are written by rank 0 alone (``dist.on_main``: a write that fails stops every rank with
its one line); one process (the shared-buffer strategies' parent) is rank 0.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import checkpoint, dist, report
from .metrics import Summary

log = logging.getLogger("hvdsgd")


@dataclass
class Outcome:
    """What a strategy hands ``Run.finish`` once it has trained."""

    strategy: str  # summary.json's "strategy"
    world_size: int  # ranks, or worker processes
    test: Summary  # the final test metrics
    last: dict  # the last metrics row (its train_loss and train_accuracy)
    samples: int  # training samples, padding excluded
    train_time: float  # seconds of training (samples / train_time: samples/s)
    device: str
    threads: int  # compute threads per rank or worker
    extra: dict = field(default_factory=dict)  # the strategy's own summary.json keys
    # the strategy's figures in the done: line (from the summary), before the wall time
    done_figures: Callable[[dict], str] | None = None
    # a checkpoint written after the summary (shared-buffer runs; sync runs save per epoch)
    final_checkpoint: dict | None = None


class Run:
    """The run directory ``cfg.out`` of a run of ``model`` on ``ds`` begun at ``t_start``
    (``time.perf_counter``)."""

    def __init__(self, cfg, ds, model: torch.nn.Module, t_start: float):
        self.cfg, self.ds, self.t_start = cfg, ds, t_start
        self.n_params = sum(p.numel() for p in model.parameters())
        self.ident = checkpoint.identity(cfg, model, ds.input_shape, ds.num_classes)
        self.dir = report.RunDir(cfg.out, tensorboard=cfg.tensorboard)
        self.prof = None

    @property
    def path(self):
        return self.dir.path

    def prepare(self, resume_epoch: int | None = None, history: list | None = None) -> None:
        """Rank 0 prepares ``--out`` (a resumed run keeps its rows up to ``resume_epoch``, or
        takes ``history``); every rank learns the outcome."""
        dist.on_main(
            lambda: self.dir.prepare(resume_epoch, self.cfg.overwrite, history),
            name="prepare_out",
        )

    def announce(self, data: str, how: str) -> None:
        """The start line: the model, the data (``data``: more about it) and ``how`` it is
        trained."""
        cfg, ds = self.cfg, self.ds
        log.info(
            f"hvdsgd: {cfg.model} ({self.n_params:,} parameters) on {ds.name} "
            f"({len(ds.train_y)} train / {len(ds.test_y)} test{data}), {how}"
        )

    def start_profiler(self, device: str = "cpu", cuda_ordinal=None, rank=None) -> None:
        """``--profile``: this process's sampler, from now to ``finish`` (or ``close``)."""
        if self.prof is None:
            self.prof = report.profiler(self.cfg, self.path, device, cuda_ordinal, rank)
            if self.prof is not None:
                self.prof.start()  # once --out is prepared: a new run clears an old profile

    def stop_profiler(self) -> None:
        if self.prof is not None:
            self.prof.stop()

    def record(self, row: dict, line: str, model=None, strategy=None, name="record") -> None:
        """One metrics row: ``line`` on the log; rank 0 appends ``row`` to metrics.jsonl and,
        given the ``model`` (and its ``strategy``'s state), saves the checkpoint of epoch
        ``row["epoch"]``."""
        log.info(line)
        dist.on_main(functools.partial(self.write_row, row, model, strategy), name=name)

    def write_row(self, row: dict, model=None, strategy=None) -> None:
        self.dir.log_epoch(row)
        if model is not None:
            self.save_checkpoint(model.state_dict(), row["epoch"], strategy.state_dict(), keep=True)

    def save_checkpoint(
        self, weights: dict, epoch: int, strategy: dict, keep: bool = False, **extra: Any
    ) -> bool:
        """``checkpoint.pt``: the weights after ``epoch`` epochs, what they were trained for,
        the strategy's state and the config (``extra``: more entries); with ``keep`` and
        ``--keep-checkpoints`` also ``checkpoint-epochN.pt``. False when none is written
        (``--no-checkpoint``, ``--dry-run``)."""
        cfg = self.cfg
        if not cfg.checkpoint or cfg.dry_run:
            return False
        saved = {
            "model": weights,
            "epoch": epoch,
            **extra,
            "identity": self.ident,
            "strategy": strategy,
            "config": cfg.to_dict(),
        }
        checkpoint.save(self.path / checkpoint.NAME, saved)
        if keep and cfg.keep_checkpoints:
            checkpoint.save(self.path / f"checkpoint-epoch{epoch}.pt", saved)
        return True

    def finish(self, o: Outcome) -> dict:
        """The summary: written by rank 0 with the plots (and ``o.final_checkpoint``),
        announced in the ``done:`` line, and returned on every rank."""
        self.stop_profiler()  # its summary goes into ours
        summary = report.summary(
            self.cfg,
            self.ds.name,
            o.strategy,
            o.world_size,
            self.n_params,
            o.test,
            o.last,
            o.samples,
            o.train_time,
            time.perf_counter() - self.t_start,
            o.device,
            o.threads,
            train_samples=o.samples,
            **o.extra,
            **report.profile_figures(self.prof),
        )

        def write():
            self.dir.write_summary(summary)
            if self.cfg.plots:
                self.dir.plot(o.test.confusion.numpy(), self.ds.classes)
            if o.final_checkpoint is not None:
                self.save_checkpoint(**o.final_checkpoint)

        dist.on_main(write, name="summary")
        figures = o.done_figures(summary) if o.done_figures is not None else ""
        log.info(
            f"done: test accuracy {100 * o.test.accuracy:.2f}%, macro-F1 {o.test.macro_f1:.4f}, "
            f"{figures}{summary['wall_time_s']:.1f} s; results in {self.path}/"
        )
        return summary

    def close(self) -> None:
        """The profiler's samples so far, the lock and TensorBoard; also when training stops
        early."""
        self.stop_profiler()
        self.dir.close()
