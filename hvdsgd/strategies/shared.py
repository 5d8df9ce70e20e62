"""HOGWILD! and the parameter-server policies: CPU worker processes, one shared buffer.

    python -m hvdsgd.train --strategy hogwild --workers 4 --model mlp
    python -m hvdsgd.train --strategy sharded --shards 4 --workers 2 --eval-interval 0.5

N worker processes (spawn, ``--threads`` compute threads each, default 1) train one model
whose parameters live in one shared-memory buffer (:mod:`hvdsgd.shm`). Every worker runs the
engine's epoch loop on its own shard of the training set, in its own shuffled order, with a
private momentum buffer and a preallocated flat gradient; its ``SharedUpdater`` turns the
gradient into an update of the shared buffer by the policy of ``--strategy``
(:mod:`hvdsgd.strategies.updaters` has the table).

The run's parts, one module each:

- :mod:`~hvdsgd.strategies.updaters`: gradient -> update (the policy table, the applier);
- :mod:`~hvdsgd.strategies.worker`: one worker process;
- :mod:`~hvdsgd.strategies.supervisor`: the processes: start, watch, failures, signals, stop;
- :mod:`~hvdsgd.strategies.evaluator`: snapshots of the shared weights on the test set;
- this module: ``SharedRun``, which puts them together inside the run lifecycle of
  :mod:`hvdsgd.run` (the run directory, rows, summary, checkpoint and lines of every strategy).

The parent evaluates the shared weights on the test set every ``--eval-interval`` seconds
without stopping the workers and records each evaluation as a row; an epoch is every worker's
pass over its shard, so ``updates / (workers x steps per shard)`` (``sync``: one update per
step for all). Ctrl-C, SIGTERM or SIGHUP stops the workers and writes the shared weights as
``checkpoint.pt`` before the one-line exit.
"""

from __future__ import annotations

import logging

import torch

from .. import checkpoint, data, models, shm
from ..config import TrainConfig
from ..engine import DRY_RUN_STEPS, evaluate
from ..errors import UsageError
from ..metrics import Tally
from ..run import Outcome, Run
from .evaluator import Evaluator
from .supervisor import Supervisor
from .updaters import slots, updates_per_epoch

log = logging.getLogger("hvdsgd")


def real_samples(cfg: TrainConfig, n_train: int, w: int) -> int:
    """Distinct samples in worker ``w``'s epoch: its shard without the repeats that pad it."""
    n = len(range(w, n_train, cfg.workers))
    return min(n, DRY_RUN_STEPS * cfg.batch_size * cfg.accum_steps) if cfg.dry_run else n


class SharedRun:
    """One shared-buffer run in this (the parent) process: the model, its ``Run`` lifecycle,
    the buffer, the supervisor of the workers and the evaluator."""

    def __init__(self, cfg: TrainConfig, ds: data.Dataset, t_start: float):
        self.cfg, self.ds = cfg, ds
        torch.set_num_threads(1)  # the parent only evaluates: leave the cores to the workers
        self.n_train = len(ds.train_y)
        if cfg.workers > self.n_train:
            raise UsageError(
                f"--workers {cfg.workers} but only {self.n_train} training samples; "
                "use fewer workers"
            )
        torch.manual_seed(cfg.seed)
        self.model = models.build(cfg.model, ds.input_shape, ds.num_classes)
        self.run = Run(cfg, ds, self.model, t_start)
        self.shards = cfg.shards if cfg.strategy == "sharded" else 1
        self.shared: shm.SharedModel | None = None
        cpu = torch.device("cpu")
        self.test_batches = data.Batches(
            ds.test_x, ds.test_y, 512, range(len(ds.test_y)), cpu, channels_last=cfg.channels_last
        )

    def fit(self) -> dict:
        """Train with ``--workers`` processes until every one is done; the summary."""
        cfg, run = self.cfg, self.run
        try:
            run.prepare()
            if self.shards > run.n_params:
                raise UsageError(
                    f"--shards {self.shards} is more than the model's {run.n_params} parameters"
                )
            self.shared = shm.SharedModel.create(
                self.model, cfg.workers, shards=self.shards, slots=slots(cfg)
            )
            with Supervisor(cfg, self.shared, self.ds, self.save_interrupted) as sup:
                run.announce("", self.how())
                sup.start()
                evaluator = Evaluator(
                    cfg,
                    self.shared,
                    self.ds,
                    self.test_batches,
                    sup.t0,
                    updates_per_epoch(cfg, self.n_train),
                    run.record,
                )
                run.start_profiler()  # the CPU use of this process and its workers
                failed = sup.supervise(evaluator)
                run.stop_profiler()
            return run.finish(self.outcome(sup, evaluator, failed))
        finally:
            if self.shared is not None:
                self.shared.unlink()  # (idempotent) also when the supervisor never started
            run.close()

    def how(self) -> str:
        """The start line's account of the workers and the buffer."""
        cfg, threads = self.cfg, self.cfg.threads or 1
        return (
            f"--strategy {cfg.strategy}"
            + (f" ({self.shards} shards)" if self.shards > 1 else "")
            + f", {cfg.workers} worker process{'es' * (cfg.workers > 1)} x {threads} "
            f"thread{'s' * (threads > 1)}, batch {cfg.batch_size}, lr {cfg.lr:g} "
            f"({cfg.scheduler}); shared buffer {self.shared.params.name}"
        )

    def weights(self) -> dict:
        """The shared weights, copied off the segment (tensors only: weights_only)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def outcome(self, sup: Supervisor, evaluator: Evaluator, failed: list) -> Outcome:
        """The final test metrics and the figures of the shared-buffer strategies."""
        cfg, reports, params = self.cfg, sup.reports, self.shared.params
        cpu = torch.device("cpu")
        test = evaluate(
            self.model, self.test_batches, cpu, cfg.amp, Tally(self.ds.num_classes, cpu)
        ).local()
        # Samples trained on, without the repeats that pad the shards to equal length.
        seen = [
            reports.epochs_done[w] * real_samples(cfg, self.n_train, w) for w in range(cfg.workers)
        ]
        # Each worker's own rate over its own first-to-last step, summed: the throughput with
        # every worker running, without the tail in which the last one finishes alone.
        aggregate = sum(
            seen[w] / max(end - begin, 1e-9) for w, (begin, end) in reports.busy.items()
        )
        stats = params.stats(-1)
        rows = evaluator.rows
        return Outcome(
            strategy=cfg.strategy,
            world_size=cfg.workers,
            test=test,
            last={**(rows[-1] if rows else {}), **evaluator.last_train},
            samples=sum(seen),
            train_time=sup.train_time(),
            device="cpu",
            threads=max(reports.threads.values(), default=cfg.threads or 1),
            extra={
                "workers": cfg.workers,
                "shards": self.shards,
                "updates": params.updates,
                "aggregate_samples_per_sec": aggregate,
                "staleness_mean": stats["staleness_mean"],
                "staleness_p95": stats["staleness_p95"],
                "staleness_max": stats["staleness_max"],
                "time_to_accuracy_s": evaluator.time_to_accuracy(),
                "failed_workers": failed,
            },
            done_figures=lambda s: (
                f"{s['samples_per_sec']:,.0f} samples/s, staleness mean "
                f"{s['staleness_mean']:.2f} p95 {s['staleness_p95']:.0f} max "
                f"{s['staleness_max']:.0f}, "
            ),
            final_checkpoint={
                "weights": self.weights(),
                "epoch": cfg.epochs,
                "strategy": {},
                "updates": params.updates,
            },
        )

    def save_interrupted(self) -> None:
        """After the workers stopped: the weights as they are, with the whole epochs done."""
        cfg, run = self.cfg, self.run
        updates = self.shared.params.updates
        epoch = updates // updates_per_epoch(cfg, self.n_train)
        try:
            saved = run.save_checkpoint(self.weights(), epoch, {}, updates=updates)
        except UsageError as e:  # still an interruption: say why there is no checkpoint
            log.warning(f"hvdsgd: warning: {e}")
            return
        if saved:
            log.info(
                f"stopped after {updates} updates ({epoch} whole epochs of {cfg.epochs}); "
                f"the shared weights are in {run.path / checkpoint.NAME}"
            )
