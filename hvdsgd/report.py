"""The run directory: ``metrics.jsonl``, ``summary.json`` and the plots (rank 0 writes).

- ``metrics.jsonl``: one JSON object per epoch
- ``summary.json``: final figures (test accuracy, macro-F1, samples/s, world size, ...)
- ``curves.png``: loss and accuracy per epoch; ``confusion.png``: the final confusion matrix
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import require_writable_dir


def profiled(cfg, out: str | Path, device: str = "cpu", cuda_ordinal: int | None = None,
             rank: int | None = None):
    """``--profile``: this process's sampler (its own GPU, matched by UUID; its process tree's
    CPU use) writing into ``out``, or a context that does nothing."""
    if not cfg.profile:
        return contextlib.nullcontext()
    from .profiler import Profiler  # imports nothing of training
    return Profiler(out, cfg.profile_interval, cuda_ordinal=cuda_ordinal, rank=rank,
                    gpu=device == "cuda")


def profile_figures(prof) -> dict[str, Any]:
    """The ``summary.json`` lines of a profile: its files and the means that matter most."""
    if prof is None or not getattr(prof, "summary", None):
        return {}
    s = prof.summary
    keep = ("util", "sm_util", "sm_occupancy", "tensor_util", "mem_used_mib", "power_w")
    means = {column: stats.get("mean") for column, stats in s.get("metrics", {}).items()
             if column in ("cpu_util", "cpu_busy_cores", "rss_mib")
             or (column.startswith("gpu") and column.split("_", 1)[1] in keep)}
    return {"profile": {"files": s.get("files"), "mean": means,
                        "gpu_idle_share": s.get("gpu_idle_share"), "warnings": s.get("warnings")}}


def summary(cfg, dataset: str, strategy: str, world_size: int, parameters: int, test,
            last: dict[str, Any], samples: int, train_time: float, wall_time: float,
            device: str, threads: int, **extra: Any) -> dict[str, Any]:
    """The ``summary.json`` record; every strategy writes these keys (plus its own ``extra``)."""
    rate = samples / train_time if train_time else None
    return {
        "model": cfg.model, "dataset": dataset, "strategy": strategy, "world_size": world_size,
        "epochs": cfg.epochs, "parameters": parameters,
        "test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1, "test_loss": test.loss,
        "test_per_class_accuracy": test.per_class_accuracy,
        "train_loss": last.get("train_loss"), "train_accuracy": last.get("train_accuracy"),
        "samples_per_sec": rate, "samples_per_sec_per_rank": rate / world_size if rate else None,
        "wall_time_s": wall_time, "device": device, "threads_per_rank": threads,
        **extra, "config": cfg.to_dict(),
    }


class RunDir:
    """Writes a run's records into ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def prepare(self, resume_epoch: int | None = None) -> None:
        """Create the folder, prove it writable, and keep only epochs <= ``resume_epoch``."""
        require_writable_dir(self.path, "--out")
        rows = self.read_metrics() if resume_epoch is not None else []
        self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows
                                             if r["epoch"] <= (resume_epoch or 0)))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    def log_epoch(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path / "summary.json")

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
                pts = [(r["epoch"], scale * r[f"{split}_{what}"]) for r in rows
                       if f"{split}_{what}" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else None, label=split)
        ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
        ax2.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
        if timed:
            axes[2].plot([r["time_s"] for r in rows], [100 * r["test_accuracy"] for r in rows],
                         label="test")
            axes[2].set(xlabel="wall time (s)", ylabel="top-1 accuracy (%)",
                        title="test accuracy against wall time")
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
                        ax.text(j, i, int(confusion[i][j]), ha="center", va="center", fontsize=7,
                                color="white" if confusion[i][j] > confusion.max() / 2 else "black")
        ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
        fig.tight_layout()
        fig.savefig(self.path / "confusion.png", dpi=110)
        plt.close(fig)
