"""The parent's view of a shared-buffer run: snapshots of the shared weights, evaluated on the
test set while the workers train on."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .. import models, shm
from ..engine import evaluate
from ..metrics import Summary, Tally

log = logging.getLogger("hvdsgd")

ACCURACY_TARGETS = (0.9, 0.95, 0.97)


def eval_line(row: dict) -> str:
    """The log line of one evaluation row."""
    return (
        f"{row['time_s']:7.2f} s  epoch {row['epoch']:5.2f}/"
        f"{row['epochs']}  updates {row['updates']:>7}  test loss {row['test_loss']:.4f} "
        f"acc {100 * row['test_accuracy']:5.2f}%"
    )


class Evaluator:
    """Snapshots of the shared weights every ``eval_interval`` s, evaluated on the test set.

    A snapshot is one copy of the buffer, so the workers are never stopped and hardly
    disturbed; the copies are evaluated in batches, at least every ``flush_s`` seconds and
    whenever they hold more than ``max_bytes``, and each becomes a row handed to ``record``
    (metrics.jsonl and its log line), stamped with the time it was taken.
    """

    flush_s, max_bytes = 2.0, 64 * 2**20

    def __init__(
        self,
        cfg,
        shared: shm.SharedModel,
        ds,
        test_batches,
        t0: float,
        updates_per_epoch: int,
        record: Callable[[dict, str], None],
    ):
        self.cfg, self.shared, self.ds, self.test = cfg, shared, ds, test_batches
        self.t0, self.updates_per_epoch, self.record = t0, updates_per_epoch, record
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

    def snapshot(self, reports, alive: int) -> None:
        """Copy the weights, unless no update came since the last copy (the same row again),
        with the training metrics ``reports`` (a ``WorkerReports``) holds since the last one."""
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
                "train": reports.train_summary(),
                "lr": reports.lr,
                "alive": alive,
            }
        )
        size = sum(p["params"].numel() * 4 for p in self.pending)
        if size > self.max_bytes or now - self.last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Evaluate the pending snapshots; each becomes a recorded row."""
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
            row = {
                "time_s": snap["t"],
                "epoch": snap["updates"] / self.updates_per_epoch,  # exactly --epochs at the end
                "epochs": self.cfg.epochs,
                "updates": snap["updates"],
                **self.last_train,
                **test.as_dict("test"),
                "lr": snap["lr"],
                "staleness_mean": stats["staleness_mean"],
                "workers_alive": snap["alive"],
            }
            self.rows.append(row)
            self.record(row, eval_line(row))
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

    def time_to_accuracy(self) -> dict:
        """Seconds to the first row at each of ``ACCURACY_TARGETS`` (None: never reached)."""
        return {
            f"{t:g}": next((r["time_s"] for r in self.rows if r["test_accuracy"] >= t), None)
            for t in ACCURACY_TARGETS
        }
