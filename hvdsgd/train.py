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
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import checkpoint, data, dist, models, report
from .config import RESUME_OUT, SHARED_STRATEGIES, TrainConfig, parse_args
from .engine import Progress, evaluate, seed, train_epoch
from .errors import UsageError, exit_on_usage_error
from .metrics import Tally
from .strategies.allreduce import Allreduce

log = logging.getLogger("hvdsgd")
DEFAULT_OUT = TrainConfig.out


# ----------------------------------------------------------------------------- helpers


def setup_logging(main: bool) -> None:
    """Rank 0 logs progress at INFO; the other ranks only errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("hvdsgd")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if main else logging.ERROR)
    root.propagate = False


def load_data(cfg: TrainConfig) -> data.Dataset:
    """The data set, resized to what the model needs."""
    return data.load(
        cfg.dataset,
        cfg.data_dir,
        cfg.download,
        cfg.synthetic,
        cfg.shape,
        cfg.num_classes,
        cfg.synthetic_samples,
        cfg.seed,
        resize_to=models.input_size(cfg.model),
    )


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
    """Train ``cfg`` on every rank; returns the summary (the same dict on every rank)."""
    if cfg.strategy in SHARED_STRATEGIES:
        return train_shared(cfg)
    t_start = time.perf_counter()
    device = dist.init(cfg.device, cfg.threads, cfg.gpu)
    rank, size = dist.rank(), dist.size()
    elastic = dist.elastic()  # horovodrun --min-np/--max-np: ranks may come and go
    setup_logging(dist.is_main())
    if cfg.amp == "auto":
        cfg.amp = "fp16" if device.type == "cuda" else "bf16"
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; use --amp bf16 on CPU")
    if cfg.dry_run:
        cfg.epochs = 1

    # Data: every rank loads it; a failure on any rank stops them all with one message. (An
    # elastic rank fails alone and Horovod goes on without its host: no collective may come
    # before hvd.elastic.run, where ranks that join later could not match it.)
    ds = load_data(cfg) if elastic else dist.agree(lambda: load_data(cfg), name="load_data")
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
    if device.type == "cuda" and cfg.loader_workers == 0:
        ds = ds.to(device)  # small data sets live on the GPU: a batch is one index op
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"

    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.input_shape, ds.num_classes).to(device)
    # --channels-last converts the batches only: conv layers follow the input's layout, and the
    # parameters (and so their gradients) stay contiguous, as Horovod's collectives require.
    n_params = sum(p.numel() for p in model.parameters())

    # Horovod: each rank trains on its own shard, reshuffled every epoch.
    sampler = data.EpochSampler(n_train, rank, size, cfg.seed)
    train_batches = data.Batches(
        ds.train_x,
        ds.train_y,
        cfg.batch_size,
        sampler,
        device,
        cfg.loader_workers,
        pin,
        cfg.channels_last,
    )
    test_batches = data.Batches(
        ds.test_x,
        ds.test_y,
        cfg.test_batch_size or max(256, cfg.batch_size),
        data.shard(n_test, rank, size),
        device,
        0,
        pin,
        cfg.channels_last,
    )

    def steps_per_epoch(ranks: int) -> int:
        return math.ceil(math.ceil(math.ceil(n_train / ranks) / cfg.batch_size) / cfg.accum_steps)

    strategy = Allreduce(cfg, model, device, steps_per_epoch(size), broadcast=not elastic)
    run = report.RunDir(cfg.out, tensorboard=cfg.tensorboard)
    ckpt_path = run.path / checkpoint.NAME
    # --profile: one sampler per rank, watching this rank's own GPU (and CPU) beside training.
    prof = report.profiler(cfg, run.path, device.type, device.index, rank if size > 1 else None)
    ident = checkpoint.identity(cfg, model, ds.input_shape, ds.num_classes)

    def start(p) -> None:
        """Rank 0 reads --resume and prepares --out; every rank learns the outcome."""
        history = None  # the metrics of a run continued from another directory
        if cfg.resume:
            state, history, (p.samples, p.seconds) = dist.on_main(
                lambda: resume(cfg, run, ident), name="resume"
            )
            model.load_state_dict(state["model"])
            strategy.load_state_dict(state["strategy"])
            p.epoch = state["epoch"]
        dist.on_main(
            lambda: run.prepare(p.epoch if cfg.resume else None, cfg.overwrite, history),
            name="prepare_out",
        )
        log.info(
            f"hvdsgd: {cfg.model} ({n_params:,} parameters) on {ds.name} "
            f"({n_train} train / {n_test} test, {'x'.join(map(str, ds.input_shape))}), "
            f"{size} rank{'s' * (size > 1)} x {cfg.batch_size} x {cfg.accum_steps} accum = "
            f"{size * cfg.batch_size * cfg.accum_steps} samples/step, lr {cfg.lr:g} -> "
            f"{cfg.lr * strategy.world_scale:g} ({cfg.scheduler}), {device.type}, "
            f"{torch.get_num_threads()} thread(s)/rank"
            + (f", elastic (commit every {cfg.commit_every} steps)" if elastic else "")
            + (f", resuming after epoch {p.epoch}" if p.epoch else "")
        )
        p.started, p.epoch_start = True, time.time()

    def fit(state) -> dict:
        """Every epoch from where ``state.progress`` stands, then the summary. An elastic run
        re-enters here after every reset, with the state of the last commit."""
        p = state.progress
        if not p.started:
            start(p)
            if elastic:
                state.commit()
        if prof is not None and prof.started is None:
            prof.start()  # once --out is prepared: a new run clears an old run's profile files
        row, test = {}, None
        for epoch in range(p.epoch, cfg.epochs):
            # RNG state is a function of (seed, epoch, rank): resuming needs no saved generator.
            seed(cfg.seed + 1000 * epoch + dist.rank(), device)
            sampler.set_epoch(epoch)
            sampler.done = p.done  # an elastic run may go on from the middle of the epoch
            bar = progress_bar(cfg, len(train_batches), epoch)
            tally = Tally(ds.num_classes, device)

            def after_step(samples: int) -> None:  # elastic: where the epoch stands, committed
                p.step += 1
                p.done = min(n_train, p.done + samples * dist.size())
                if p.step % cfg.commit_every == 0 and p.done < n_train:  # (the end commits)
                    # Horovod: the metrics so far are summed now, as a rank may be lost later;
                    # rank 0's view of host changes rides in the same allreduce.
                    now = tally.reduce(f"train_metrics.{epoch}.{p.step}", state.host_view())
                    p.partial = now + p.partial
                    tally.clear()
                    state.save()
                    state.check_host_updates(now.extra)

            train_epoch(
                model,
                train_batches,
                strategy,
                device,
                cfg.amp,
                cfg.accum_steps,
                tally,
                bar,
                max_steps=2 if cfg.dry_run else None,
                after_step=after_step if elastic else None,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.time() - p.epoch_start
            if bar is not None:
                bar.close()
            # Horovod: sum every rank's loss and confusion counts, so all ranks see the same.
            now = tally.reduce(f"train_metrics.{epoch}", state.host_view() if elastic else None)
            tr = now + p.partial
            if not math.isfinite(tr.loss):
                raise UsageError(
                    f"the training loss became {tr.loss} in epoch {epoch + 1}; "
                    f"lower --lr (now {cfg.lr:g}) or set --grad-clip 1.0 "
                    f"(the last good checkpoint is kept)"
                )
            test = evaluate(
                model, test_batches, device, cfg.amp, Tally(ds.num_classes, device)
            ).reduce(name=f"test_metrics.{epoch}")
            # The sampler pads every rank's shard to the same length; those repeats are not
            # more samples (1,437 digits are 1,437 however many ranks see them).
            seen = min(tr.count, n_train)
            row = {
                "epoch": epoch + 1,
                "epochs": cfg.epochs,
                **tr.as_dict("train"),
                "train_samples": seen,
                **test.as_dict("test"),
                "test_per_class_accuracy": test.per_class_accuracy,
                "lr": strategy.lr,
                "samples_per_sec": tr.count / epoch_time,
                "samples_per_sec_per_rank": tr.count / epoch_time / dist.size(),
                "epoch_time_s": epoch_time,
                "world_size": dist.size(),
            }
            log.info(epoch_line(row))
            p.epoch, p.step, p.done, p.partial = epoch + 1, 0, 0, None
            p.samples, p.seconds = p.samples + seen, p.seconds + epoch_time
            if elastic:
                state.save()  # the epoch is done: a rank lost while recording it redoes nothing

            def record(epoch=epoch, row=row):
                run.log_epoch(row)
                if cfg.checkpoint and not cfg.dry_run:
                    saved = {
                        "model": model.state_dict(),
                        "epoch": epoch + 1,
                        "identity": ident,
                        "strategy": strategy.state_dict(),
                        "config": cfg.to_dict(),
                    }
                    checkpoint.save(ckpt_path, saved)
                    if cfg.keep_checkpoints:
                        checkpoint.save(run.path / f"checkpoint-epoch{epoch + 1}.pt", saved)

            # Rank 0 writes; a write that fails (full disk) stops every rank with its one line.
            dist.on_main(record, name=f"record.{epoch}")
            p.epoch_start = time.time()
            if elastic:  # the epoch's commit
                state.save()
                state.check_host_updates(now.extra)

        if prof is not None:
            prof.stop()  # its summary goes into ours
        if test is None:  # resumed a finished run (or reset after the last epoch): evaluate
            test = evaluate(
                model, test_batches, device, cfg.amp, Tally(ds.num_classes, device)
            ).reduce(name="test_metrics.final")
        extra = (
            {"elastic": {"commit_every": cfg.commit_every, "resets": p.resets}} if elastic else {}
        )
        summary = report.summary(
            cfg,
            ds.name,
            strategy.name,
            dist.size(),
            n_params,
            test,
            row,
            p.samples,
            p.seconds,
            time.perf_counter() - t_start,
            device.type,
            torch.get_num_threads(),
            **report.profile_figures(prof),
            **extra,
        )
        summary["train_samples"] = p.samples

        def finish():
            run.write_summary(summary)
            run.plot(test.confusion.numpy(), ds.classes)

        dist.on_main(finish, name="summary")
        log.info(
            f"done: test accuracy {100 * test.accuracy:.2f}%, macro-F1 {test.macro_f1:.4f}, "
            f"{summary['wall_time_s']:.1f} s; results in {run.path}/"
        )
        return summary

    try:
        if not elastic:
            return fit(SimpleNamespace(progress=Progress(world=size)))
        from . import elastic as hvd_elastic

        def on_reset(event: dict) -> None:
            """The new world: its ranks, threads, shards, learning rate and buckets."""
            new_rank, new_size = dist.rank(), dist.size()
            setup_logging(dist.is_main())
            dist.set_threads(cfg.threads)
            sampler.set_world(new_rank, new_size)
            test_batches.sampler = data.shard(n_test, new_rank, new_size)
            p = state.progress
            strategy.resize(new_size, steps_per_epoch(new_size), p.epoch + p.done / n_train)
            if dist.is_main():
                with contextlib.suppress(UsageError):
                    run.lock()  # rank 0 may be a new process now; the old one is gone
            redone = event["steps_redone"]
            log.info(
                f"{event['cause']}: {event['from']} -> {event['to']} ranks; resuming "
                f"epoch {event['epoch']} at step {event['step']} "
                f"({redone} step{'s' * (redone != 1)} redone)"
            )

        state = hvd_elastic.TrainState(model, strategy, Progress(world=size), on_reset)
        return hvd_elastic.run(fit, state)
    finally:
        if prof is not None:
            prof.stop()  # the samples so far, also when training stops early
        run.close()  # the lock and TensorBoard; also when training stops early


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


def train_shared(cfg: TrainConfig) -> dict:
    """HOGWILD and the parameter-server policies: one process that spawns the workers."""
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
    from .strategies import shared

    setup_logging(True)
    if cfg.dry_run:
        cfg.epochs = 1
    return shared.run(cfg, load_data(cfg))


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
