"""Synchronous data-parallel SGD on Horovod: ``python -m hvdsgd.train``.

    horovodrun -np 4 python -m hvdsgd.train                        # cnn on digits, 4 ranks
    horovodrun -np 2 -H localhost:2 --gloo python -m hvdsgd.train --model mlp --epochs 5
    horovodrun -np 8 -H host1:4,host2:4 python -m hvdsgd.train \\
        --model resnet18 --dataset cifar10 --data-dir /data --amp
    python -m hvdsgd.train --model cnn                              # one plain process
    python -m hvdsgd.train --strategy hogwild --workers 4 --model mlp  # HOGWILD on CPU
    python -m hvdsgd.train --resume runs/train/checkpoint.pt --epochs 30  # 15 more epochs

Every rank runs this file top to bottom; rank 0 alone prints and writes the run directory
(``--out``): metrics.jsonl, summary.json, curves.png, confusion.png and checkpoint.pt. A
directory holding an earlier run's results is refused unless ``--resume`` continues it or
``--overwrite`` replaces it; ``--epochs`` counts every epoch of a resumed run, those before
the checkpoint included. One plain process (no horovodrun) does not use Horovod at all.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import checkpoint, data, dist, logs, models, report
from .config import RESUME_OUT, SHARED_STRATEGIES, TrainConfig, parse_args
from .engine import Progress, evaluate, run_epoch, steps_per_epoch
from .errors import UsageError, exit_on_usage_error
from .metrics import Tally
from .run import Outcome, Run
from .strategies.allreduce import Allreduce

log = logging.getLogger("hvdsgd")
DEFAULT_OUT = TrainConfig.out


# ----------------------------------------------------------------------------- helpers


def progress_bar(cfg: TrainConfig, total: int, epoch: int):
    """Rank 0's progress: a tqdm bar on a terminal, else a line every 10 s or every
    ``--log-interval`` batches (horovodrun pipes)."""
    if not (cfg.progress and dist.is_main()):
        return None
    desc = f"epoch {epoch + 1}/{cfg.epochs}"
    if not sys.stderr.isatty():
        return LineProgress(total, desc, batches=cfg.log_interval)
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="batch",
        leave=False,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    )


class LineProgress:
    """tqdm's update/close for logs and pipes: one plain line at most every ``every`` s, or
    every ``batches`` batches when that is set."""

    def __init__(self, total: int, desc: str, every: float = 10.0, batches: int = 0):
        self.total, self.desc, self.every, self.batches, self.n = total, desc, every, batches, 0
        self.start = self.last = time.perf_counter()
        self.last_n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        due = (
            self.n - self.last_n >= self.batches if self.batches else now - self.last >= self.every
        )
        if due and self.n < self.total:
            self.last, self.last_n = now, self.n
            eta = (now - self.start) / self.n * (self.total - self.n)
            log.info(f"  {self.desc}: {self.n}/{self.total} batches, {eta:.0f} s left")

    def close(self) -> None:
        pass


def epoch_line(r: dict) -> str:
    return (
        f"epoch {r['epoch']:>3}/{r['epochs']}  "
        f"train loss {r['train_loss']:.4f} acc {100 * r['train_accuracy']:5.2f}%  "
        f"test loss {r['test_loss']:.4f} acc {100 * r['test_accuracy']:5.2f}% "
        f"f1 {r['test_macro_f1']:.4f}  lr {r['lr']:.4g}  "
        f"{r['samples_per_sec']:,.0f} samples/s ({r['samples_per_sec_per_rank']:,.0f}/rank)  "
        f"{r['epoch_time_s']:.2f} s"
    )


# -------------------------------------------------------------------------------- main


def train(cfg: TrainConfig) -> dict:
    """Train ``cfg`` with its strategy on every rank; returns the summary (the same dict on
    every rank). Every strategy writes its run directory through one ``run.Run``."""
    t_start = time.perf_counter()
    shared = cfg.strategy in SHARED_STRATEGIES
    device, elastic = setup(cfg, shared)
    # Data: every rank loads it; a failure on any rank stops them all with one message. (An
    # elastic rank fails alone and Horovod goes on without its host: no collective may come
    # before hvd.elastic.run, where ranks that join later could not match it.)
    ds = data.load_for(cfg) if elastic else dist.agree(lambda: data.load_for(cfg), name="load_data")
    if shared:  # HOGWILD and the parameter-server policies: this process spawns the workers
        from .strategies.shared import SharedRun

        return SharedRun(cfg, ds, t_start).fit()
    check_world(cfg, ds, dist.size())
    if device.type == "cuda" and cfg.loader_workers == 0:
        ds = ds.to(device)  # small data sets live on the GPU: a batch is one index op

    job = SyncRun(cfg, device, ds, elastic, t_start)
    try:
        if not elastic:
            return job.fit(SimpleNamespace(progress=Progress(world=dist.size())))
        from . import elastic as hvd_elastic

        job.state = hvd_elastic.TrainState(
            job.model, job.strategy, Progress(world=dist.size()), job.on_reset
        )
        return hvd_elastic.run(job.fit, job.state)
    finally:
        job.run.close()


def setup(cfg: TrainConfig, shared: bool) -> tuple[torch.device, bool]:
    """This process's device and whether it is elastic, its log, and the flags that follow
    from them. The shared-buffer strategies run in one plain process, on CPU."""
    if shared:
        refuse_launcher(cfg)
    device = torch.device("cpu") if shared else dist.init(cfg.device, cfg.threads, cfg.gpu)
    elastic = not shared and dist.elastic()  # horovodrun --min-np/--max-np: ranks come and go
    logs.setup(dist.is_main())
    if cfg.amp == "auto":
        cfg.amp = "fp16" if device.type == "cuda" else "bf16"
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; use --amp bf16 on CPU")
    if cfg.dry_run:
        cfg.epochs = 1
    return device, elastic


def refuse_launcher(cfg: TrainConfig) -> None:
    """A shared-buffer strategy under horovodrun (elastic or not): one line saying how to run
    it."""
    if dist.elastic():
        raise UsageError(
            f"--strategy {cfg.strategy} runs on one host and cannot be elastic; "
            f"run it as one plain process: python -m hvdsgd.train --strategy "
            f"{cfg.strategy} --workers N"
        )
    if int(os.environ.get("HOROVOD_SIZE", "1")) > 1:
        raise UsageError(
            f"--strategy {cfg.strategy} starts its own --workers processes; run it "
            f"as one plain process: python -m hvdsgd.train --strategy {cfg.strategy} "
            f"--workers N"
        )


def check_world(cfg: TrainConfig, ds: data.Dataset, size: int) -> None:
    """Enough samples for every rank (else one line), and a warning for oversized batches."""
    n_train, n_test = len(ds.train_y), len(ds.test_y)
    if size > min(n_train, n_test):
        raise UsageError(
            f"{size} ranks but only {n_train} training / {n_test} test samples; "
            "use fewer ranks (-np) or a larger data set"
        )
    if cfg.batch_size > n_train // size:
        log.warning(
            f"warning: --batch-size {cfg.batch_size} is larger than the "
            f"{math.ceil(n_train / size)} training samples of each rank: every step "
            "is one partial batch"
        )


class SyncRun:
    """One synchronous run on this rank: the model, its batches and the Allreduce strategy,
    built once, and its ``run.Run`` (the run directory, rows, checkpoint, summary and lines of
    every strategy). ``fit`` trains every epoch left and finishes the run; an elastic run
    re-enters it after every reset, with the state of the last commit.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        ds: data.Dataset,
        elastic: bool,
        t_start: float,
    ):
        self.cfg, self.device, self.ds, self.elastic, self.t_start = (
            cfg,
            device,
            ds,
            elastic,
            t_start,
        )
        self.state = None  # the elastic TrainState (hvdsgd.elastic), when elastic
        rank, size = dist.rank(), dist.size()
        self.n_train, self.n_test = len(ds.train_y), len(ds.test_y)
        pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"

        torch.manual_seed(cfg.seed)
        self.model = models.build(cfg.model, ds.input_shape, ds.num_classes).to(device)
        # --channels-last converts the batches only: conv layers follow the input's layout, and
        # the parameters (so their gradients) stay contiguous, as Horovod's collectives require.
        self.run = Run(cfg, ds, self.model, t_start)  # the run directory and what a user sees

        # Horovod: each rank trains on its own shard, reshuffled every epoch.
        self.sampler = data.EpochSampler(self.n_train, rank, size, cfg.seed)
        self.train_batches = data.Batches(
            ds.train_x,
            ds.train_y,
            cfg.batch_size,
            self.sampler,
            device,
            cfg.loader_workers,
            pin,
            cfg.channels_last,
        )
        self.test_batches = data.Batches(
            ds.test_x,
            ds.test_y,
            cfg.test_batch_size or max(256, cfg.batch_size),
            data.shard(self.n_test, rank, size),
            device,
            0,
            pin,
            cfg.channels_last,
        )
        self.strategy = Allreduce(
            cfg, self.model, device, self.steps_per_epoch(size), broadcast=not elastic
        )

    def steps_per_epoch(self, ranks: int) -> int:
        return steps_per_epoch(self.n_train, ranks, self.cfg.batch_size, self.cfg.accum_steps)

    def start(self, p: Progress) -> None:
        """Rank 0 reads --resume and prepares --out; every rank learns the outcome."""
        cfg, history = self.cfg, None  # history: the metrics of a run continued from elsewhere
        if cfg.resume:
            state, history, (p.samples, p.seconds) = dist.on_main(
                lambda: resume(cfg, self.run.dir, self.run.ident), name="resume"
            )
            self.model.load_state_dict(state["model"])
            self.strategy.load_state_dict(state["strategy"])
            p.epoch = state["epoch"]
        self.run.prepare(p.epoch if cfg.resume else None, history)
        size, ds = dist.size(), self.ds
        self.run.announce(
            f", {'x'.join(map(str, ds.input_shape))}",
            f"{size} rank{'s' * (size > 1)} x {cfg.batch_size} x {cfg.accum_steps} accum = "
            f"{size * cfg.batch_size * cfg.accum_steps} samples/step, lr {cfg.lr:g} -> "
            f"{cfg.lr * self.strategy.world_scale:g} ({cfg.scheduler}), {self.device.type}, "
            f"{torch.get_num_threads()} thread(s)/rank"
            + (f", elastic (commit every {cfg.commit_every} steps)" if self.elastic else "")
            + (f", resuming after epoch {p.epoch}" if p.epoch else ""),
        )
        p.started, p.epoch_start = True, time.time()

    def fit(self, state) -> dict:
        """Every epoch from where ``state.progress`` stands, then the summary."""
        p = state.progress
        if not p.started:
            self.start(p)
            if self.elastic:
                state.commit()
        # --profile: one sampler per rank, watching this rank's own GPU (and CPU) beside training.
        size, device = dist.size(), self.device
        self.run.start_profiler(device.type, device.index, dist.rank() if size > 1 else None)
        row, test = {}, None
        for epoch in range(p.epoch, self.cfg.epochs):
            row, test = self.train_epoch(epoch, p)
        return self.finish(p, row, test)

    def train_epoch(self, epoch: int, p: Progress):
        """One epoch (the rest of it, after an elastic reset): train, evaluate, record and
        commit; returns its metrics row and the test summary."""
        cfg, device = self.cfg, self.device
        tally = Tally(self.ds.num_classes, device)
        after_step = functools.partial(self.after_step, p, epoch, tally) if self.elastic else None
        # An elastic run may go on from the middle of the epoch (skip: the samples done).
        run_epoch(
            self.model,
            self.train_batches,
            self.strategy,
            device,
            cfg,
            epoch,
            tally,
            base_seed=cfg.seed,
            who=dist.rank(),
            skip=p.done,
            progress=functools.partial(progress_bar, cfg, epoch=epoch),
            after_step=after_step,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.time() - p.epoch_start
        # Horovod: sum every rank's loss and confusion counts, so all ranks see the same; an
        # elastic run's view of host changes rides along.
        hosts = self.state.host_view() if self.elastic else None
        now = tally.reduce(f"train_metrics.{epoch}", hosts)
        tr = now + p.partial
        if not math.isfinite(tr.loss):
            raise UsageError(
                f"the training loss became {tr.loss} in epoch {epoch + 1}; "
                f"lower --lr (now {cfg.lr:g}) or set --grad-clip 1.0 "
                f"(the last good checkpoint is kept)"
            )
        test = self.evaluate(f"test_metrics.{epoch}")
        # The sampler pads every rank's shard to the same length; those repeats are not more
        # samples (1,437 digits are 1,437 however many ranks see them).
        seen = min(tr.count, self.n_train)
        row = {
            "epoch": epoch + 1,
            "epochs": cfg.epochs,
            **tr.as_dict("train"),
            "train_samples": seen,
            **test.as_dict("test"),
            "test_per_class_accuracy": test.per_class_accuracy,
            "lr": self.strategy.lr,
            "samples_per_sec": tr.count / epoch_time,
            "samples_per_sec_per_rank": tr.count / epoch_time / dist.size(),
            "epoch_time_s": epoch_time,
            "world_size": dist.size(),
        }
        p.epoch, p.step, p.done, p.partial = epoch + 1, 0, 0, None
        p.samples, p.seconds = p.samples + seen, p.seconds + epoch_time
        if self.elastic:
            self.state.save()  # the epoch is done: a rank lost while recording it redoes nothing
        # Rank 0 writes the row and the checkpoint; a write that fails (full disk) stops every
        # rank with its one line.
        self.run.record(row, epoch_line(row), self.model, self.strategy, name=f"record.{epoch}")
        p.epoch_start = time.time()
        if self.elastic:  # the epoch's commit
            self.state.save()
            self.state.check_host_updates(now.extra)
        return row, test

    def after_step(self, p: Progress, epoch: int, tally: Tally, samples: int) -> None:
        """Elastic: where the epoch stands, committed every ``--commit-every`` steps."""
        p.step += 1
        p.done = min(self.n_train, p.done + samples * dist.size())
        if p.step % self.cfg.commit_every == 0 and p.done < self.n_train:  # (the end commits)
            # Horovod: the metrics so far are summed now, as a rank may be lost later; rank 0's
            # view of host changes rides in the same allreduce.
            now = tally.reduce(f"train_metrics.{epoch}.{p.step}", self.state.host_view())
            p.partial = now + p.partial
            tally.clear()
            self.state.save()
            self.state.check_host_updates(now.extra)

    def evaluate(self, name: str):
        """The test metrics, summed over every rank's shard."""
        tally = Tally(self.ds.num_classes, self.device)
        return evaluate(self.model, self.test_batches, self.device, self.cfg.amp, tally).reduce(
            name=name
        )

    def finish(self, p: Progress, row: dict, test) -> dict:
        """The summary: written by rank 0, returned on every rank."""
        if test is None:  # resumed a finished run (or reset after the last epoch): evaluate
            test = self.evaluate("test_metrics.final")
        elastic = {"elastic": {"commit_every": self.cfg.commit_every, "resets": p.resets}}
        return self.run.finish(
            Outcome(
                strategy=self.strategy.name,
                world_size=dist.size(),
                test=test,
                last=row,
                samples=p.samples,
                train_time=p.seconds,
                device=self.device.type,
                threads=torch.get_num_threads(),
                extra=elastic if self.elastic else {},
            )
        )

    def on_reset(self, event: dict) -> None:
        """Elastic: the new world's ranks, threads, shards, learning rate and buckets."""
        rank, size = dist.rank(), dist.size()
        logs.setup(dist.is_main())
        dist.set_threads(self.cfg.threads)
        self.sampler.set_world(rank, size)
        self.test_batches.sampler = data.shard(self.n_test, rank, size)
        p = self.state.progress
        self.strategy.resize(size, self.steps_per_epoch(size), p.epoch + p.done / self.n_train)
        if dist.is_main():
            with contextlib.suppress(UsageError):
                self.run.dir.lock()  # rank 0 may be a new process now; the old one is gone
        redone = event["steps_redone"]
        log.info(
            f"{event['cause']}: {event['from']} -> {event['to']} ranks; resuming "
            f"epoch {event['epoch']} at step {event['step']} "
            f"({redone} step{'s' * (redone != 1)} redone)"
        )


def resume(cfg: TrainConfig, run: report.RunDir, ident: dict):
    """Rank 0's half of ``--resume``: the checkpoint's state, the metrics rows of the run it
    continues when that run lived in another directory (else None), and the (samples,
    seconds) trained before it. ``--epochs`` counts every epoch: a checkpoint at or past it
    has nothing left to train, and says how to go on."""
    path = checkpoint.resolve(cfg.resume, run.path)
    state = checkpoint.load(path, ident)
    done, source = state["epoch"], report.RunDir(path.parent)
    if done >= cfg.epochs and (done > cfg.epochs or (path.parent / "summary.json").exists()):
        more = cfg.epochs if cfg.epochs < done else done  # read --epochs as "this many more"
        raise UsageError(
            f"{path} has trained {done} epochs and --epochs is {cfg.epochs}, which "
            f"counts every epoch (the {done} included); to train more, pass "
            f"--epochs {done + more}"
        )
    rows = [r for r in source.read_metrics() if r["epoch"] <= done]
    before = (
        sum(r.get("train_samples", 0) for r in rows),
        sum(r.get("epoch_time_s", 0.0) for r in rows),
    )
    same = path.parent.resolve() == run.path.resolve()
    return state, None if same else rows, before


@exit_on_usage_error
def main(argv=None) -> None:
    head, examples, *_ = __doc__.split("\n\n")
    cfg = parse_args(argv, description=head, epilog="examples:\n" + examples)
    if cfg.resume and cfg.resume != RESUME_OUT and cfg.out == DEFAULT_OUT:
        # --resume PATH without --out: go on writing into PATH's run directory.
        path = Path(cfg.resume)
        cfg.out = str(path if path.is_dir() else path.parent)
    train(cfg)


if __name__ == "__main__":
    main()
