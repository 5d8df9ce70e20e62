"""Stratified K-fold cross-validation, the folds trained in parallel: ``python -m hvdsgd.kfold``.

    python -m hvdsgd.kfold --folds 5 --workers 2                  # cnn on digits, 2 processes
    python -m hvdsgd.kfold --folds 5 --compare-serial             # + serial run, speed-up, CPU plot
    horovodrun -np 2 -H localhost:2 --gloo python -m hvdsgd.kfold # folds spread over ranks

The training and test sets of ``--dataset`` are pooled and cut into ``--folds`` stratified
folds (scikit-learn's ``StratifiedKFold``, shuffled with ``--seed``); each fold is a task
(:mod:`hvdsgd.sweep` runs them) that trains a fresh model on the other folds with the data,
model and training flags of ``hvdsgd.train`` and reports test accuracy, macro-F1 and loss on its
own fold. A fold's seed is
``--seed + fold``, and it runs on ``--task-threads`` threads wherever it runs, so its figures
are identical serially, over processes and over Horovod ranks. ``--out`` receives
``tasks.jsonl``, ``summary.json`` and, with ``--compare-serial``, ``cpu.png``: CPU utilisation
over time of the serial and the parallel run (from :mod:`hvdsgd.profiler`).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import numpy as np

from . import tasks
from .config import DataOptions, option, parse_args
from .errors import UsageError, exit_on_usage_error
from .sweep import Runs, Sweep, TaskConfig, cpu_text, data_key, per_task, warm_model

log = logging.getLogger("hvdsgd")


@dataclass
class KFoldConfig(TaskConfig):
    """K-fold cross-validation; the data, model and training flags of ``hvdsgd.train`` apply
    to each fold."""

    TITLE = "K-fold"

    folds: int = option(5, "number of stratified folds (each is one task)")
    out: str = option("runs/kfold", "run directory: tasks.jsonl, summary.json, cpu.png")
    epochs: int = option(10, "passes over each fold's training set")
    lr: float = option(0.05, "learning rate")
    batch_size: int = option(64, "samples per step")
    warmup_epochs: float = option(0.0, "epochs of linear warm-up")

    def check(self) -> None:
        super().check()
        if self.folds < 2:
            raise UsageError(f"--folds must be >= 2 (got {self.folds})")


# ------------------------------------------------------------------------------ data

_POOLED: dict[tuple, tuple] = {}  # this process's pooled data, by sweep.data_key


def pooled(cfg: DataOptions):
    """The data set's train and test parts pooled: (x, y, classes), resized for the model."""
    key = data_key(cfg)
    if key not in _POOLED:
        import torch

        from . import data

        ds = data.load_for(cfg)
        _POOLED[key] = (
            torch.cat([ds.train_x, ds.test_x]),
            torch.cat([ds.train_y, ds.test_y]),
            ds.classes,
        )
    return _POOLED[key]


def split(
    y: np.ndarray, folds: int, seed: int, classes: list[str]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds: (train indices, test indices) per fold; a clear error when impossible."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=len(classes))
    present = counts[counts > 0]
    if folds > present.min():
        k = int(np.flatnonzero(counts == present.min())[0])
        raise UsageError(
            f"--folds {folds} but class {classes[k]!r} has only {present.min()} "
            f"samples; use --folds {present.min()} or fewer"
        )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(y)), y)]


# ------------------------------------------------------------------------------ tasks


def train_fold(
    cfg: dict, fold: int, train_idx: np.ndarray, test_idx: np.ndarray, seed: int, pair=None
) -> dict | None:
    """One fold: a fresh model trained on ``train_idx``; the task runner has seeded the
    generator from ``seed``, so the initial weights come from it. ``pair``: this is one half
    of a fold split over two workers (:mod:`hvdsgd.pair`); the helper half returns None."""
    import torch

    from . import models
    from .strategies.local import fit

    c = KFoldConfig(**cfg)
    x, y, classes = pooled(c)
    tr, te = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    model = models.build(c.model, tuple(x.shape[1:]), len(classes))
    result = fit(c, model, (x[tr], y[tr]), (x[te], y[te]), len(classes), seed, pair=pair)
    return (
        None
        if result is None
        else {"fold": fold, "train_samples": len(tr), "test_samples": len(te), **result}
    )


def warm_worker(cfg: dict, pooled: tuple) -> None:
    """A task worker's start: take the parent's pooled data (no reload), build the model and
    an optimizer once, so that first-call costs are not charged to the first fold."""
    c = KFoldConfig(**cfg)
    _POOLED[data_key(c)] = pooled
    warm_model(c, pooled[0].shape[1:], len(pooled[2]))


def make_tasks(cfg: KFoldConfig) -> list[tasks.Task]:
    _, y, classes = pooled(cfg)
    cfg_dict = cfg.to_dict()
    return [
        tasks.Task(
            f"fold {k + 1}",
            train_fold,
            {"cfg": cfg_dict, "fold": k + 1, "train_idx": tr, "test_idx": te, "seed": cfg.seed + k},
            seed=cfg.seed + k,
            splittable=cfg.accum_steps >= 2,
            inputs={
                "fold": k + 1,
                "model": cfg.model,
                "dataset": cfg.dataset,
                "seed": cfg.seed + k,
                "train_samples": len(tr),
                "test_samples": len(te),
            },
        )
        for k, (tr, te) in enumerate(split(y.numpy(), cfg.folds, cfg.seed, classes))
    ]


# ---------------------------------------------------------------------------- report

METRICS = ("test_accuracy", "test_macro_f1", "test_loss", "train_time_s")


def aggregate(results: list[tasks.Result]) -> dict:
    """Mean and standard deviation of each metric over the folds that finished, and of their
    task times (``seconds``: what the table's rows show, training and evaluation)."""
    ok = [r for r in results if r.ok]
    columns = {m: [r.result[m] for r in ok] for m in METRICS}
    columns["seconds"] = [r.seconds for r in ok]
    return {
        m: {
            "mean": statistics.mean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        }
        for m, vals in columns.items()
    }


def table(runs: dict[str, list[tasks.Result]]) -> str:
    """The per-fold table (one column block per mode), then mean ± std over the folds that
    finished. Time: the task's seconds, training and evaluation, as the rows."""
    modes = list(runs)
    head = (
        "| fold | "
        + " | ".join(f"{m} accuracy | {m} macro-F1 | {m} loss | {m} task time (s)" for m in modes)
        + " |"
    )
    lines = [head, "|---|" + "---|" * 4 * len(modes)]
    for i, name in enumerate(r.name for r in runs[modes[0]]):
        cells = []
        for m in modes:
            r = runs[m][i]
            cells += (
                [
                    f"{100 * r.result['test_accuracy']:.2f}%",
                    f"{r.result['test_macro_f1']:.4f}",
                    f"{r.result['test_loss']:.4f}",
                    f"{r.seconds:.2f}",
                ]
                if r.ok
                else ["FAILED", "", "", f"{r.seconds:.2f}"]
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for m in modes:
        a = aggregate(runs[m])
        cells += [
            _mean_std(a["test_accuracy"], 100, 2) + "%",
            _mean_std(a["test_macro_f1"], 1, 4),
            _mean_std(a["test_loss"], 1, 4),
            _mean_std(a["seconds"], 1, 2),
        ]
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(stat: dict, scale: float, digits: int) -> str:
    """``mean ± std`` of an :func:`aggregate` entry, times ``scale``; n/a without a mean."""
    if stat["mean"] is None:
        return "n/a"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


# ------------------------------------------------------------------------------ main


def kfold(cfg: KFoldConfig) -> dict:
    sweep = Sweep(cfg, "hvdsgd.kfold")
    x, y, classes = pooled(cfg)
    sweep.start(
        cfg.folds,
        f"{cfg.folds} stratified folds of {cfg.dataset} ({len(y)} samples, "
        f"{len(classes)} classes), {cfg.model}, {cfg.epochs} epochs",
        "fold",
        warm=(warm_worker, (cfg.to_dict(), (x, y, classes))),
    )
    runs = sweep.run(make_tasks(cfg))
    summary = {
        "folds": cfg.folds,
        "mode": sweep.mode,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "samples": len(y),
        "workers": sweep.workers,
        "task_threads": cfg.task_threads,
        "wall_time_s": runs.wall,
        **aggregate(runs.reported),
        "failed": [r.name for r in runs.reported if not r.ok],
        "per_fold": per_task(runs.reported, "fold"),
        "cpu_util_mean": runs.cpu(),
        "config": cfg.to_dict(),
    }
    if runs.compared:
        summary["serial"] = {
            "wall_time_s": runs.walls["serial"],
            **aggregate(runs.results["serial"]),
            "cpu_util_mean": runs.cpu("serial"),
        }
        summary.update(runs.speedup(sweep.workers))
        summary["identical_per_fold"] = runs.identical()
    return sweep.finish(runs, summary, lambda: report(summary, runs, sweep))


def report(summary: dict, runs: Runs, sweep: Sweep) -> None:
    """The table, then one line: the time, the mean accuracy (and, compared with the serial
    run, the speed-up, efficiency, identity and CPU utilisation of both)."""
    log.info("\n" + table(runs.results))
    s, n = summary, sweep.workers
    line = (
        f"{s['folds']} folds in {runs.wall:.1f} s ({s['mode']}); mean accuracy "
        f"{_pct(s['test_accuracy'])} ± {100 * s['test_accuracy']['std']:.2f}"
    )
    if runs.compared:
        line += (
            f"; serial {runs.walls['serial']:.1f} s: speed-up {s['speedup']:.2f}x, "
            f"efficiency {100 * s['efficiency']:.0f}% on {n} "
            f"workers; per-fold results identical: {s['identical_per_fold']}; "
            f"CPU {cpu_text(s['serial']['cpu_util_mean'])}% serial, "
            f"{cpu_text(s['cpu_util_mean'])}% parallel"
        )
    log.info(line + f"; results in {sweep.out}/")


def _pct(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{100 * stat['mean']:.2f}%"


@exit_on_usage_error
def main(argv=None) -> None:
    head, examples, *_ = __doc__.split("\n\n")
    cfg = parse_args(
        argv,
        cls=KFoldConfig,
        prog="python -m hvdsgd.kfold",
        description=head,
        epilog="examples:\n" + examples,
    )
    kfold(cfg)


if __name__ == "__main__":
    main()
