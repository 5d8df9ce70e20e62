"""The run directory: ``metrics.jsonl``, ``summary.json`` and the plots (rank 0 writes).

- ``metrics.jsonl``: one JSON object per epoch
- ``summary.json``: final figures (test accuracy, macro-F1, samples/s, world size, ...)
- ``curves.png``: loss and accuracy per epoch; ``confusion.png``: the final confusion matrix
- ``events.out.tfevents.*`` with ``--tensorboard``: the scalars of ``metrics.jsonl``

One run owns a directory: ``prepare`` takes ``.hvdsgd.lock`` (released when the process
ends, however it ends), so a second run on the same ``--out`` is refused with the first one's
PID, and refuses a directory holding an earlier run's results unless it continues that run
(``--resume``) or ``--overwrite`` deletes them. The directory is created 0750 and no file in it
is world-writable (the entry points add o-w to the umask). A write that fails (full disk,
read-only file system) is one UsageError naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from .errors import UsageError, require_writable_dir

LOCK = ".hvdsgd.lock"
# What a run writes at the top of its directory: these mark a used --out, and --overwrite
# deletes exactly these (nothing else in the directory is touched).
RESULTS = ("metrics.jsonl", "summary.json", "tasks.jsonl", "checkpoint*.pt")
OUTPUTS = RESULTS + (
    "curves.png",
    "confusion.png",
    "cpu.png",
    "accuracy.png",
    "profile*.csv",
    "profile*.json",
    "profile*.png",
    "events.out.tfevents.*",
)


def profiler(
    cfg,
    out: str | Path,
    device: str = "cpu",
    cuda_ordinal: int | None = None,
    rank: int | None = None,
):
    """``--profile``: this process's sampler (its own GPU, matched by UUID; its process tree's
    CPU use) writing into ``out``, not yet started; None without ``--profile``."""
    if not cfg.profile:
        return None
    from .profiler import Profiler  # imports nothing of training

    return Profiler(
        out, cfg.profile_interval, cuda_ordinal=cuda_ordinal, rank=rank, gpu=device == "cuda"
    )


def profile_figures(prof) -> dict[str, Any]:
    """The ``summary.json`` lines of a profile: its files and the means that matter most."""
    if prof is None or not getattr(prof, "summary", None):
        return {}
    s = prof.summary
    keep = ("util", "sm_util", "sm_occupancy", "tensor_util", "mem_used_mib", "power_w")
    means = {
        column: stats.get("mean")
        for column, stats in s.get("metrics", {}).items()
        if column in ("cpu_util", "cpu_busy_cores", "rss_mib")
        or (column.startswith("gpu") and column.split("_", 1)[1] in keep)
    }
    return {
        "profile": {
            "files": s.get("files"),
            "mean": means,
            "gpu_idle_share": s.get("gpu_idle_share"),
            "warnings": s.get("warnings"),
        }
    }


def summary(
    cfg,
    dataset: str,
    strategy: str,
    world_size: int,
    parameters: int,
    test,
    last: dict[str, Any],
    samples: int,
    train_time: float,
    wall_time: float,
    device: str,
    threads: int,
    **extra: Any,
) -> dict[str, Any]:
    """The ``summary.json`` record; every strategy writes these keys (plus its own ``extra``)."""
    rate = samples / train_time if train_time else None
    return {
        "model": cfg.model,
        "dataset": dataset,
        "strategy": strategy,
        "world_size": world_size,
        "epochs": cfg.epochs,
        "parameters": parameters,
        "test_accuracy": test.accuracy,
        "test_macro_f1": test.macro_f1,
        "test_loss": test.loss,
        "test_per_class_accuracy": test.per_class_accuracy,
        "train_loss": last.get("train_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "samples_per_sec": rate,
        "samples_per_sec_per_rank": rate / world_size if rate else None,
        "wall_time_s": wall_time,
        "device": device,
        "threads_per_rank": threads,
        **extra,
        "config": cfg.to_dict(),
    }


class RunDir:
    """Writes a run's records into ``path`` (on rank 0 / the parent process only)."""

    def __init__(self, path: str | Path, tensorboard: bool = False):
        self.path = Path(path)
        self.tensorboard = tensorboard
        self._lock: int | None = None
        self._writer = None
        self._rows = 0  # rows given to TensorBoard (the step of rows without a whole epoch)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def prepare(
        self,
        resume_epoch: int | None = None,
        overwrite: bool = False,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        """Create the folder (0750), lock it, and start the records: a resumed run keeps its
        epochs <= ``resume_epoch`` (or takes ``history``, the rows of the run it continues
        from elsewhere); a new run needs a folder without results, or ``overwrite``."""
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.mkdir(mode=0o750)
        require_writable_dir(self.path, "--out")
        self.lock()
        if resume_epoch is None:
            found = self.results()
            if found and not overwrite:
                self.close()
                raise UsageError(
                    f"--out {self.path} already holds a run's results "
                    f"({', '.join(found[:3])}); continue it with --resume, start "
                    "over with --overwrite, or choose another --out"
                )
            for f in self.outputs():
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            return
        rows = history if history is not None else self.read_metrics()
        self._write(
            self.metrics_file,
            "".join(json.dumps(r) + "\n" for r in rows if r["epoch"] <= resume_epoch),
        )

    def lock(self) -> None:
        """Hold ``.hvdsgd.lock`` for this process's life, or name the PID that holds it."""
        if self._lock is not None:
            return
        path = self.path / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {owner[0]} on {owner[1]}" if len(owner) >= 2 else "another process"
            raise UsageError(
                f"--out {self.path} is in use by a running hvdsgd ({who}); wait for "
                "it to finish, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._lock = fd

    def close(self) -> None:
        """Flush TensorBoard and release the lock (process exit releases it too)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def results(self) -> list[str]:
        """Names of an earlier run's results in the folder (an empty metrics file is none)."""
        return sorted(
            f.name
            for pattern in RESULTS
            for f in self.path.glob(pattern)
            if f.is_dir() or f.stat().st_size > 0
        )

    def outputs(self) -> list[Path]:
        return [f for pattern in OUTPUTS for f in self.path.glob(pattern) if f.is_file()]

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl (and its numbers to TensorBoard)."""
        self._write(self.metrics_file, json.dumps(row) + "\n", mode="a")
        if self.tensorboard:
            self._scalars(row)

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.path / ".summary.json.tmp"
        self._write(tmp, json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path / "summary.json")

    def _write(self, path: Path, text: str, mode: str = "w") -> None:
        try:
            with path.open(mode) as fh:
                fh.write(text)
        except OSError as e:
            raise UsageError(
                f"cannot write {path} ({e.strerror}); free space or fix the "
                "permissions, then --resume"
            ) from None

    def _scalars(self, row: dict[str, Any]) -> None:
        """The row's numbers as TensorBoard scalars, tagged as in metrics.jsonl; the step is
        the epoch (runs evaluated by the clock: the row's index)."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self._writer = SummaryWriter(log_dir=str(self.path))
        epoch = row.get("epoch")
        step = epoch if isinstance(epoch, int) else self._rows
        self._rows += 1
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def plot(self, confusion, classes: list[str]) -> None:
        """``curves.png`` from metrics.jsonl and ``confusion.png`` from ``confusion``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.read_metrics()
        timed = any("time_s" in r for r in rows)  # shared-buffer runs: evaluated by the clock
        fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(15 if timed else 10, 4))
        ax1, ax2 = axes[:2]
        for ax, what, scale in ((ax1, "loss", 1), (ax2, "accuracy", 100)):
            for split in ("train", "test"):
                pts = [
                    (r["epoch"], scale * r[f"{split}_{what}"])
                    for r in rows
                    if f"{split}_{what}" in r
                ]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True), marker="o" if len(pts) < 40 else None, label=split
                    )
        ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
        ax2.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
        if timed:
            axes[2].plot(
                [r["time_s"] for r in rows], [100 * r["test_accuracy"] for r in rows], label="test"
            )
            axes[2].set(
                xlabel="wall time (s)",
                ylabel="top-1 accuracy (%)",
                title="test accuracy against wall time",
            )
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(self.path / "curves.png", dpi=110)
        plt.close(fig)

        k = len(classes)
        fig, ax = plt.subplots(figsize=(0.45 * k + 3, 0.45 * k + 2.5) if k <= 20 else (12, 11))
        im = ax.imshow(confusion, cmap="Blues")
        fig.colorbar(im, ax=ax)
        if k <= 20:
            ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 0)
            ax.set_yticks(range(k), classes)
            for i in range(k):
                for j in range(k):
                    if confusion[i][j]:
                        ax.text(
                            j,
                            i,
                            int(confusion[i][j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if confusion[i][j] > confusion.max() / 2 else "black",
                        )
        ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
        fig.tight_layout()
        fig.savefig(self.path / "confusion.png", dpi=110)
        plt.close(fig)
