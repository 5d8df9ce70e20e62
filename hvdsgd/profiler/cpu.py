"""CPU readings through psutil: per-core utilisation and the profiled process tree.

Core utilisation is computed from ``psutil.cpu_times(percpu=True)`` between this sampler's own
ticks: the same arithmetic as ``psutil.cpu_percent(percpu=True)``, without sharing its
module-level state with any other caller of ``cpu_percent`` in the host process.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

BUSY_PCT = 50.0  # a core above this is counted in cpu_busy_cores
TREE_REFRESH_S = 2.0  # finding children scans every process on the host: only this often


def _busy_total(t: Any) -> tuple[float, float]:
    """(busy, total) seconds of one core; guest time is already inside user time on Linux."""
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total - t.idle - getattr(t, "iowait", 0.0), total


class CpuSampler:
    """Per-core %, overall %, busy cores and the RSS of the process trees rooted at ``pids``."""

    def __init__(self, pids: list[int]):
        self.roots = list(pids)
        self.cores = psutil.cpu_count() or 1
        self._procs: dict[int, psutil.Process] = {}
        self._scanned = -float("inf")
        self._last = [_busy_total(t) for t in psutil.cpu_times(percpu=True)]

    def columns(self) -> list[str]:
        return ["cpu_util", "cpu_busy_cores", "rss_mib"] + [
            f"cpu{k}_util" for k in range(self.cores)
        ]

    def watch(self, pid: int) -> None:
        """Add a root whose tree is profiled (e.g. the command the CLI started)."""
        self.roots.append(pid)
        self._scanned = -float("inf")

    def read(self) -> tuple[dict[str, float], set[int]]:
        """One row of CPU columns, and the pids of the profiled trees (for NVML's per-process)."""
        now = [_busy_total(t) for t in psutil.cpu_times(percpu=True)]
        pct = [
            min(100.0, max(0.0, 100 * (b - b0) / (t - t0))) if t > t0 else 0.0
            # strict=False: a CPU taken offline or brought online changes the count
            for (b, t), (b0, t0) in zip(now, self._last, strict=False)
        ]
        self._last = now
        row = {f"cpu{k}_util": p for k, p in enumerate(pct)}
        row["cpu_util"] = sum(pct) / len(pct) if pct else 0.0
        row["cpu_busy_cores"] = float(sum(p > BUSY_PCT for p in pct))
        pids, rss = self._tree()
        row["rss_mib"] = rss / 2**20
        return row, pids

    def _tree(self) -> tuple[set[int], int]:
        """The roots and their children, recursively, and their summed RSS in bytes.

        The tree is re-scanned every ``TREE_REFRESH_S`` (a scan reads every process of the
        host); in between, only the known processes' RSS is read, far less work.
        """
        now = time.monotonic()
        if now - self._scanned >= TREE_REFRESH_S:
            self._scanned, procs = now, {}
            for root in list(self.roots):
                try:
                    proc = psutil.Process(root)
                    procs.update({p.pid: p for p in (proc, *proc.children(recursive=True))})
                except psutil.Error:  # gone, or not ours to see
                    continue
            self._procs = procs
        rss = 0
        for pid, p in list(self._procs.items()):
            try:
                rss += p.memory_info().rss
            except psutil.Error:  # ended since the scan
                del self._procs[pid]
        return set(self._procs), rss
