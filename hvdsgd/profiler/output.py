"""The profiler's files: the CSV timeline, the JSON summary and the PNG plot.

- ``{stem}.csv``: one row per sample: ``wall_time`` (Unix s), ``elapsed_s``, then
  ``gpu{i}_<metric>`` per GPU and ``cpu_util``, ``cpu_busy_cores``, ``rss_mib``, ``cpu{k}_util``.
  A blank cell is a value NVML had no (new) reading for.
- ``{stem}.json``: mean, p50, p95 and max per column, GPU idle share, DCGM-style ratios.
- ``{stem}.png``: GPU utilisation, SM occupancy, tensor, memory, power; CPU cores heatmap.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .nvml import GPM_METRICS

TIME_COLUMNS = ("wall_time", "elapsed_s")
_GPU = re.compile(r"^(gpu\d+)_(.+)$")
MAX_CORE_TICKS = 16  # beyond this many cores, label every k-th one


class CsvLog:
    """The CSV, flushed after every row so that a crash loses at most the row in flight."""

    def __init__(self, path: Path, columns: list[str]):
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, columns, restval="", extrasaction="ignore")
        self.writer.writeheader()
        self.fh.flush()

    def write(self, row: dict[str, float | None]) -> None:
        self.writer.writerow(
            {k: "" if v is None else f"{v:.4f}".rstrip("0").rstrip(".") for k, v in row.items()}
        )
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def read_csv(path: str | Path) -> dict[str, list[float | None]]:
    """The CSV as columns of floats (None for blank cells)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return {}
    return {
        name: [float(r[k]) if k < len(r) and r[k] else None for r in rows[1:]]
        for k, name in enumerate(rows[0])
    }


def _percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile of sorted ``xs`` (as numpy's default)."""
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats(values: list[float]) -> dict[str, float]:
    """mean, p50, p95, max and n of ``values`` (non-empty)."""
    xs = sorted(values)
    out = {
        "mean": sum(xs) / len(xs),
        "p50": _percentile(xs, 0.5),
        "p95": _percentile(xs, 0.95),
        "max": xs[-1],
    }
    return {**{k: round(v, 6) for k, v in out.items()}, "n": len(xs)}


def summarize(
    csv_path: str | Path, raw: dict[str, list[float]] | None = None, idle_below: float = 5.0
) -> dict[str, Any]:
    """Statistics of a profile CSV.

    ``raw`` holds every driver sample of buffered columns (``gpu0_util``, ``gpu0_mem_util``);
    their statistics and the idle share (samples with utilisation < ``idle_below`` %) come
    from those, each sample counted once, rather than from per-row means.
    """
    cols, raw = read_csv(csv_path), raw or {}
    metrics: dict[str, dict[str, float]] = {}
    for name, vals in cols.items():
        xs = raw.get(name) or [v for v in vals if v is not None]
        if name not in TIME_COLUMNS and xs:
            metrics[name] = stats(xs)
    gpus = sorted({m.group(1) for m in map(_GPU.match, cols) if m})
    idle, dcgm = {}, {}
    for g in gpus:
        util = raw.get(f"{g}_util") or [v for v in cols.get(f"{g}_util", []) if v is not None]
        idle[g] = sum(u < idle_below for u in util) / len(util) if util else None
        dcgm[g] = {}
        for col, (_, name) in GPM_METRICS.items():  # DCGM's *_ACTIVE ratios = GPM % / 100
            ratios = [v / 100 for v in cols.get(f"{g}_{col}", []) if v is not None]
            if ratios:
                dcgm[g][name] = stats(ratios)
    elapsed = [t for t in cols.get("elapsed_s", []) if t is not None]
    return {
        "samples": len(elapsed),
        "duration_s": elapsed[-1] if elapsed else 0.0,
        "idle_below_pct": idle_below,
        "gpu_idle_share": idle,
        "dcgm": dcgm,
        "metrics": metrics,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _line(ax: Any, t: list[float | None], ys: list[float | None], label: str) -> bool:
    # strict=False: a column the CSV lacks comes as [] (nothing to draw)
    pts = [(x, y) for x, y in zip(t, ys, strict=False) if x is not None and y is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), label=label, lw=1)
    return bool(pts)


def core_ticks(cores: int) -> list[int]:
    """Rows of the core heat map that get a label: every core, or every k-th of many."""
    return list(range(0, cores, math.ceil(cores / MAX_CORE_TICKS)))


def plot_timeline(csv_path: str | Path, png_path: str | Path) -> None:
    """The PNG timeline: one panel per GPU quantity (lines per GPU), then the CPU cores."""
    import matplotlib.pyplot as plt

    fig = timeline_figure(csv_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def timeline_figure(csv_path: str | Path) -> Any:
    """The figure :func:`plot_timeline` saves (matplotlib's Agg backend); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = read_csv(csv_path)
    t = cols.get("elapsed_s", [])
    gpus = sorted({m.group(1) for m in map(_GPU.match, cols) if m})
    panels = [
        ("GPU utilisation %", ["util", "proc_sm_util", "sm_util"]),
        ("SM occupancy %", ["sm_occupancy"]),
        ("tensor / FP pipes %", ["tensor_util", "fp16_util", "fp32_util"]),
        ("memory %", ["mem_util", "dram_bw_util", "mem_used_pct"]),
        ("power W", ["power_w"]),
    ]
    for g in gpus:  # memory used as a share of total, for the memory panel
        used, total = cols.get(f"{g}_mem_used_mib", []), cols.get(f"{g}_mem_total_mib", [])
        cols[f"{g}_mem_used_pct"] = [  # strict=False: either column may be missing ([])
            100 * u / s if u is not None and s else None for u, s in zip(used, total, strict=False)
        ]
    panels = [
        (title, names)
        for title, names in panels
        if any(v is not None for g in gpus for n in names for v in cols.get(f"{g}_{n}", []))
    ]
    cores = sorted((c for c in cols if re.fullmatch(r"cpu\d+_util", c)), key=lambda c: int(c[3:-5]))
    fig, axes = plt.subplots(
        len(panels) + 1,
        1,
        sharex=True,
        squeeze=False,
        layout="constrained",
        figsize=(10, 2.2 * (len(panels) + 1)),
    )
    for ax, (title, names) in zip(axes[:-1, 0], panels, strict=True):  # the last: CPU cores
        for g in gpus:
            for n in names:
                _line(ax, t, cols.get(f"{g}_{n}", []), f"{g} {n}")
        ax.set_ylabel(title)
        ax.set_ylim(0, 105 if "%" in title else None)
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1, 0]
    times = [x for x in t if x is not None]
    if cores and times:
        grid = [[v or 0.0 for v in cols[c]] for c in cores]
        im = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            vmin=0,
            vmax=100,
            cmap="viridis",
            interpolation="nearest",  # row k is core k, centred on y = k
            extent=(
                times[0],
                max(times[-1], times[0] + 1e-3),  # one sample
                -0.5,
                len(cores) - 0.5,
            ),
        )
        ticks = core_ticks(len(cores))
        ax.set_yticks(ticks, [f"cpu{k}" for k in ticks])
        # Beside the heat map alone, its full height; constrained layout keeps the panels
        # above aligned with it.
        fig.colorbar(im, ax=ax, label="CPU core %", pad=0.01)
    ax.set_ylabel("CPU core")
    ax.set_xlabel("seconds since start")
    fig.suptitle(f"profile: {Path(csv_path).name}" + ("" if gpus else " (no GPU)"))
    return fig
