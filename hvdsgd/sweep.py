"""One sweep of independent tasks, start to exit: what ``hvdsgd.kfold`` and ``hvdsgd.lottery``
share.

A family of tasks (the folds, the tickets) supplies its config (a :class:`TaskConfig`), its
tasks, its table and its plot; a :class:`Sweep` does the rest, the same way for every family:

1. ``Sweep(cfg, prog)``: the log, the run directory (``--out``, ``--overwrite``) and the mode
   (serial, worker processes, or Horovod ranks under ``horovodrun``);
2. ``sweep.start(...)``: the number of workers, one line saying what runs where, and the warm
   start (a task worker's first-call costs paid here too, so no timing includes them);
3. ``sweep.run(tasks)``: the tasks executed by :func:`hvdsgd.tasks.run`, serially first with
   ``--compare-serial``, each run timed and its CPU utilisation profiled;
4. ``sweep.finish(runs, summary, report)``: ``tasks.jsonl`` and ``summary.json``, ``cpu.png``
   (``--compare-serial``), the family's report, and exit status 1 if a task failed.

:class:`TaskConfig` composes only the option groups of :mod:`hvdsgd.config` that apply to a
task (data and model, training and optimisation, the run directory) and its own
:class:`SweepOptions`; the other flags of ``python -m hvdsgd.train`` are refused in one line.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import tasks
from .config import (
    DataOptions,
    DeviceOptions,
    OptimOptions,
    Options,
    OutputOptions,
    ProfileOptions,
    RunOptions,
    SharedBufferOptions,
    StrategyOptions,
    at_least,
    flag,
    option,
)
from .errors import UsageError
from .tasks import Result, StartMethod, Task

log = logging.getLogger("hvdsgd")

# ------------------------------------------------------------------------------ config


@dataclass
class SweepOptions(Options):
    """How the tasks of a sweep run: where, on how many threads, and whether serially too."""

    TITLE = "sweep: how the tasks run"

    workers: int = option(2, "task worker processes; a free one takes the next task")
    task_threads: int = option(
        1, "compute threads per task (the same in every mode, so results match)"
    )
    start_method: StartMethod = option(
        "auto",
        "how task workers start: auto (fork with one thread per task, else forkserver), "
        "fork (one thread per task only), spawn, forkserver",
    )
    serial: bool = option(False, "run the tasks one after another in this process")
    compare_serial: bool = option(
        False,
        "run the tasks serially and in parallel; report speed-up, "
        "efficiency and CPU utilisation over time of both",
    )

    def check(self) -> None:
        super().check()
        at_least(self, 1, "workers", "task_threads")
        if self.serial and self.compare_serial:
            raise UsageError("--serial and --compare-serial exclude each other; pick one")
        tasks.check_method(self.start_method, self.task_threads)


TRAIN_ONLY = {  # the option groups of python -m hvdsgd.train that a task has no use for
    DeviceOptions: "the tasks train on CPU, on batches sliced in place",
    StrategyOptions: "each task trains alone in one process (local SGD, no allreduce)",
    SharedBufferOptions: "each task trains alone in one process (local SGD, no shared buffer)",
    RunOptions: "a sweep's tasks keep no checkpoints or event files",
    ProfileOptions: "a sweep profiles the CPU of its runs itself (profile-*.csv in --out)",
}
BECAUSE = {  # not its group's reason
    "log_interval": "a sweep logs one line per finished task",
    "plots": "a sweep's tasks draw no per-run curves",
}
FIXES = {"threads": "use --task-threads"}  # the fix when it is not "drop it"


def refused_flags() -> dict[str, str]:
    """Every flag of ``python -m hvdsgd.train`` that does not apply to a sweep's tasks (``--no-``
    forms and Horovod aliases included), with its one-line refusal."""
    out, own = {}, {f.name for f in dataclasses.fields(SweepOptions)}  # own: --workers
    for group, why in TRAIN_ONLY.items():
        for f in dataclasses.fields(group):
            if f.name in own:
                continue
            names = [flag(f.name)]
            names += ["no-" + names[0]] if isinstance(f.default, bool) else []
            names += {"device": ["no-cuda"], "adasum": ["use-adasum"]}.get(f.name, [])
            why_, fix = BECAUSE.get(f.name, why), FIXES.get(f.name, "drop it")
            for name in names:
                out[name] = f"--{name} applies to python -m hvdsgd.train; {why_}: {fix}"
    return out


# Dataclass fields come last base first: data, training, run directory, sweep.
@dataclass
class TaskConfig(SweepOptions, OutputOptions, OptimOptions, DataOptions):
    """The data, model and training flags of ``hvdsgd.train`` (each task's), plus how a
    sweep of tasks runs (kfold, lottery)."""

    REFUSED = refused_flags()

    def check(self) -> None:
        super().check()
        if self.amp == "auto":  # what train() picks on CPU
            self.amp = "bf16"
        if self.amp == "fp16":
            raise UsageError(
                "--amp fp16 needs a CUDA GPU and a sweep's tasks train on CPU; use --amp bf16"
            )

    @property
    def mode(self) -> str:
        return tasks.mode_for(self.workers, self.serial)

    @property
    def main(self) -> bool:
        """This process reports: not a Horovod rank other than 0."""
        return tasks.reporting(self.mode)


def data_key(cfg: DataOptions) -> tuple:
    """What a family's per-process data cache is keyed by: the fields the data depend on."""
    return (
        cfg.dataset,
        cfg.data_dir,
        cfg.model,
        cfg.seed,
        cfg.synthetic,
        cfg.input_shape,
        cfg.num_classes,
        cfg.synthetic_samples,
    )


def warm_model(cfg: TaskConfig, input_shape: tuple, num_classes: int) -> None:
    """Build the model and an optimizer once: a process's first optimizer costs about a
    second of imports, which no task's timing should include."""
    from . import models
    from .engine import make_optimizer

    make_optimizer(cfg, models.build(cfg.model, tuple(input_shape), num_classes), cfg.lr)


# ------------------------------------------------------------------------------- runs


@dataclass
class Runs:
    """The timed runs of one sweep's tasks: ``serial`` (with ``--compare-serial``) and the one
    reported, ``label`` (``parallel``, or ``serial`` with ``--serial``)."""

    results: dict[str, list[Result]]
    walls: dict[str, float]
    profiles: dict[str, Any]
    label: str

    @property
    def reported(self) -> list[Result]:
        return self.results[self.label]

    @property
    def wall(self) -> float:
        return self.walls[self.label]

    @property
    def compared(self) -> bool:
        """Whether the tasks also ran serially (``--compare-serial``)."""
        return self.label != "serial" and "serial" in self.walls

    def cpu(self, label: str | None = None) -> float | None:
        """Mean CPU utilisation (%) of a run (by default the reported one)."""
        return cpu_mean(self.profiles[label or self.label])

    def speedup(self, workers: int, serial_phase_s: float = 0.0) -> dict:
        """Speed-up of the parallel run over the serial one, each after ``serial_phase_s`` of
        work before the tasks, and the parallel efficiency on ``workers``."""
        s = (serial_phase_s + self.walls["serial"]) / (serial_phase_s + self.wall)
        return {"speedup": s, "efficiency": s / workers}

    def identical(self) -> bool:
        """The same figures in both runs, task by task (accuracy and loss, bit for bit)."""
        return identical(self.results["serial"], self.reported)


def per_task(results: list[Result], name_key: str, inputs: bool = False) -> list[dict]:
    """``summary.json``'s row per task: its name under ``name_key``, (its inputs,) its result,
    its time, worker and error."""
    return [
        {
            name_key: r.name,
            **(r.inputs if inputs else {}),
            **(r.result or {}),
            "seconds": r.seconds,
            "worker": r.worker,
            "error": r.error,
        }
        for r in results
    ]


class Sweep:
    """One sweep of tasks from its run directory to its exit status (module docstring)."""

    def __init__(self, cfg: TaskConfig, prog: str):
        from . import logs

        self.cfg, self.prog, self.out, self.run_dir = cfg, prog, Path(cfg.out), None
        logs.setup(cfg.main)
        if cfg.main:
            from .report import RunDir

            self.run_dir = RunDir(self.out)
            self.run_dir.prepare(overwrite=cfg.overwrite)  # no metrics.jsonl: tasks.jsonl
        self.mode = "serial" if cfg.serial else cfg.mode  # of the reported run
        self.workers, self.warm = 1, None

    def start(self, n_tasks: int, what: str, unit: str, warm: tuple) -> None:
        """One line: ``what`` runs, and how (``unit``: "fold", "task"); then ``warm`` =
        ``(fn, args)``, which each task worker runs as it starts, runs here too."""
        world = int(os.environ.get("HOROVOD_SIZE", "1"))
        self.workers = {"horovod": world, "serial": 1}.get(
            self.mode, min(self.cfg.workers, n_tasks)
        )
        how = {
            "serial": "serially in this process",
            "processes": f"{self.workers} worker processes",
            "horovod": f"{world} Horovod ranks",
        }[self.mode]
        log.info(f"{self.prog}: {what}; {how}, {self.cfg.task_threads} thread(s) per {unit}")
        self.warm = warm
        warm[0](*warm[1])  # first-call costs stay out of every timing, here as in the workers

    def run(self, task_list: list[Task]) -> Runs:
        """The tasks, serially first with ``--compare-serial``, then in this sweep's mode."""
        runs = Runs({}, {}, {}, "serial" if self.mode == "serial" else "parallel")
        labels = (["serial"] if self.cfg.compare_serial else []) + [runs.label]
        for label in labels:
            mode = "serial" if label == "serial" else self.mode
            runs.results[label], runs.walls[label], runs.profiles[label] = self.timed(
                task_list, mode, label
            )
        return runs

    def timed(self, task_list: list[Task], mode: str, label: str) -> tuple:
        """``task_list`` in ``mode`` under the profiler (CPU, on the reporting process): the
        results, the wall time in seconds and the profiler (None on other ranks)."""
        from .profiler import Profiler

        cfg = self.cfg
        prof = Profiler(self.out, 0.1, prefix=f"profile-{label}", gpu=False) if cfg.main else None
        if prof:
            prof.start()
        t0 = time.perf_counter()
        try:
            results = tasks.run(
                task_list,
                mode,
                cfg.workers,
                cfg.task_threads,
                cfg.progress,
                warm=self.warm,
                method=cfg.start_method,
            )
        finally:
            wall = time.perf_counter() - t0
            if prof:
                prof.stop()
        return results, wall, prof

    def finish(self, runs: Runs, summary: dict, report: Callable[[], None]) -> dict:
        """Records, ``cpu.png`` and ``report()`` (the family's table, plot and lines) on the
        reporting process; then exit status 1, after naming them, if tasks failed."""
        if self.cfg.main:
            try:
                write_records(self.out, runs.reported, summary)
                if runs.compared:
                    profiles = {k: p.csv_path for k, p in runs.profiles.items()}
                    plot_cpu(profiles, self.out / "cpu.png")
                report()
            finally:
                self.run_dir.close()  # the lock on --out: the run is over
        failed = [r for results in runs.results.values() for r in results if not r.ok]
        if failed:
            if self.cfg.main:
                print(tasks.failures_text(failed), file=sys.stderr, flush=True)
                print(f"{self.prog}: {len(failed)} task(s) failed", file=sys.stderr, flush=True)
            raise SystemExit(1)
        return summary


# ---------------------------------------------------------------------------- records


def cpu_mean(prof) -> float | None:
    """Mean CPU utilisation (%) of a finished profile, None without samples."""
    if prof is None or not prof.summary:
        return None
    return (prof.summary["metrics"].get("cpu_util") or {}).get("mean")


def cpu_text(value: float | None) -> str:
    """A CPU utilisation for a log line: ``97`` or ``n/a``."""
    return "n/a" if value is None else f"{value:.0f}"


def identical(a: list[Result], b: list[Result]) -> bool:
    """The same figures, task by task (accuracy and loss, bit for bit)."""
    return all(
        x.ok
        and y.ok
        and x.result["test_accuracy"] == y.result["test_accuracy"]
        and x.result["test_loss"] == y.result["test_loss"]
        for x, y in zip(a, b, strict=True)
    )


def write_records(out: Path, results: list[Result], summary: dict) -> None:
    """``tasks.jsonl`` (one row per task) and ``summary.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tasks.jsonl").open("w") as fh:
        for r in results:
            fh.write(json.dumps(dataclasses.asdict(r)) + "\n")
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")


def plot_cpu(profiles: dict[str, Path], path: Path) -> None:
    """CPU utilisation over time, one panel per run (serial above, parallel below)."""
    import matplotlib

    matplotlib.use("Agg")
    import statistics

    import matplotlib.pyplot as plt

    from .profiler import read_csv

    fig, axes = plt.subplots(
        len(profiles), 1, figsize=(9, 2.4 * len(profiles)), sharex=True, squeeze=False
    )
    for ax, (name, csv) in zip(axes[:, 0], profiles.items(), strict=True):
        cols = read_csv(csv)
        t = cols["elapsed_s"]
        for key in sorted(
            k for k in cols if k.startswith("cpu") and k.endswith("_util") and k != "cpu_util"
        ):
            ax.plot(t, cols[key], lw=0.8, alpha=0.6, label=key.replace("_util", ""))
        ax.plot(t, cols["cpu_util"], lw=2, color="black", label="all cores")
        vals = [v for v in cols["cpu_util"] if v is not None]
        ax.set_title(
            f"{name}: mean CPU utilisation {statistics.mean(vals):.0f}%"
            if vals
            else f"{name}: no samples (the run was shorter than one interval)",
            fontsize=10,
        )
        ax.set_ylabel("CPU %")
        ax.set_ylim(0, 105)
        ax.legend(loc="lower right", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
