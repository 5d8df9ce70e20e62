"""The Profiler: a background thread that samples GPUs and CPUs beside the training loop.

The training thread pays nothing but the start and stop; the sampler thread never raises into
it. Without NVML (no driver, no GPU) it logs one line and records CPU metrics only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError, require_writable_dir
from . import nvml
from .cpu import CpuSampler
from .nvml import COLUMNS, GpuSampler, N
from .output import CsvLog, plot_timeline, summarize, write_json

log = logging.getLogger("hvdsgd")
MAX_INTERVAL_S = 3600.0  # a sample an hour; far longer waits overflow threading's timeouts


class Profiler:
    """Samples every ``interval`` seconds into ``out_dir/{prefix}[-rank{rank}].csv|json|png``.

    Args:
        out_dir: folder for the files (created).
        interval: seconds between samples (GPM pairs are still >= 100 ms apart).
        devices: NVML indices or UUIDs (or unique ``GPU-`` prefixes) to watch; None: the GPUs
            this process's CUDA sees, in CUDA's order (``CUDA_VISIBLE_DEVICES`` honoured).
        cuda_ordinal: watch only CUDA device ``cuda_ordinal`` of this process (e.g. Horovod's
            local rank), matched to NVML by UUID.
        pids: roots of the process trees whose RSS and GPU SM % are recorded; None: this process.
        prefix, rank: file names; ``rank`` adds ``-rank{rank}`` so ranks share one folder.
        idle_below: utilisation % below which a GPU sample counts as idle.
        plot: write the PNG at stop. gpu: False skips NVML entirely.

    Example::

        with Profiler(
            "runs/prof", interval=0.1, cuda_ordinal=hvd.local_rank(), rank=hvd.rank()
        ) as prof:
            train()
        print(prof.summary["gpu_idle_share"])
    """

    def __init__(
        self,
        out_dir: str | Path,
        interval: float = 0.1,
        *,
        devices: Sequence[int | str] | None = None,
        cuda_ordinal: int | None = None,
        pids: Sequence[int] | None = None,
        prefix: str = "profile",
        rank: int | None = None,
        idle_below: float = 5.0,
        plot: bool = True,
        gpu: bool = True,
    ):
        if not 0 < interval <= MAX_INTERVAL_S:  # also refuses NaN and inf
            raise UsageError(
                f"the profiler interval must be > 0 and <= {MAX_INTERVAL_S:g} "
                f"seconds (got {interval})"
            )
        self.out_dir, self.interval = Path(out_dir), float(interval)
        self.devices, self.cuda_ordinal, self.gpu = devices, cuda_ordinal, gpu
        self.pids = [os.getpid()] if pids is None else list(pids)
        self.idle_below, self.plot = idle_below, plot
        stem = prefix + ("" if rank is None else f"-rank{rank}")
        self.csv_path, self.json_path, self.png_path = (
            self.out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "png")
        )
        self.summary: dict[str, Any] | None = None
        self.started: str | None = None  # when start() ran (ISO 8601, UTC); None before
        self.unsupported: dict[str, str] = {}
        self.warnings: list[str] = []
        self._gpus: list[GpuSampler] = []
        self._nvml = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_s: float | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Profiler:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Open the GPUs and the CSV, and start the sampler thread."""
        self._prepare_dir()
        self._stop.clear()
        self._cpu = CpuSampler(self.pids)
        self._gpus = self._open_gpus() if self.gpu else []
        columns = ["wall_time", "elapsed_s"]
        columns += [g.prefix + c for g in self._gpus for c in COLUMNS] + self._cpu.columns()
        self._csv = CsvLog(self.csv_path, columns)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._t0 = self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="hvdsgd-profiler", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        """Also profile the process tree of ``pid`` (e.g. a command started after ``start``)."""
        self._cpu.watch(pid)

    def stop(self) -> dict[str, Any] | None:
        """Stop the thread, write the summary (and PNG), shut NVML down; returns the summary."""
        if self._thread is None:
            return self.summary
        self._stop.set()
        self._thread.join(timeout=max(5.0, 3 * self.interval))
        stuck, self._thread = self._thread.is_alive(), None
        if stuck:  # a driver call hung: leave NVML to it rather than shut it down under it
            self._warn("sampler thread did not stop within the timeout")
        elif self._last_tick == self._t0 or time.monotonic() - self._last_tick > self.interval / 2:
            self._safe_tick()  # the tail since the last tick (a run shorter than one: its row)
        self._csv.close()
        try:
            self.summary = self._summarize()
            write_json(self.json_path, self.summary)
            if self.plot:
                plot_timeline(self.csv_path, self.png_path)
        except Exception:  # never into the host: the CSV is already on disk
            log.exception("profiler: writing the summary failed")
        if not stuck:
            self._close_nvml()
        return self.summary

    # ------------------------------------------------------------ setup and teardown
    def _prepare_dir(self) -> None:
        require_writable_dir(self.out_dir, "--out")

    def _no_gpu(self, reason: str) -> list[GpuSampler]:
        self.unsupported["gpu"] = reason
        log.warning("profiler: no GPU metrics (%s); recording CPU metrics only", reason)
        return []

    def _open_gpus(self) -> list[GpuSampler]:
        """nvmlInit (once per Profiler) and one GpuSampler per chosen device."""
        if N is None:
            return self._no_gpu("pynvml (nvidia-ml-py) is not installed")
        try:
            N.nvmlInit()
        except N.NVMLError as e:
            return self._no_gpu(f"NVML: {e}")
        self._nvml = True
        by_cuda = self.devices is None
        tokens = (
            nvml.parse_cuda_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
            if by_cuda
            else [str(d) for d in self.devices]
        )
        try:
            picked, why = nvml.resolve(tokens, self.cuda_ordinal, by_cuda)
        except N.NVMLError as e:
            picked, why = [], f"NVML: {e}"
        if not picked:
            return self._no_gpu(why)
        return [GpuSampler(f"gpu{i}_", ref, h) for i, (ref, h) in enumerate(picked)]

    def _close_nvml(self) -> None:
        for g in self._gpus:
            g.close()
        if self._nvml:
            self._nvml = False
            try:
                N.nvmlShutdown()
            except N.NVMLError as e:
                log.debug("profiler: nvmlShutdown: %s", e)

    # ------------------------------------------------------------ sampling
    def _run(self) -> None:
        """Tick on a fixed schedule until stopped; a late tick resets the schedule."""
        due, cpu0 = self._t0, time.thread_time()
        while True:
            due += self.interval
            delay = due - time.monotonic()
            if delay < 0:
                due, delay = due - delay, 0.0
            if self._stop.wait(delay):
                self._cpu_s = time.thread_time() - cpu0  # the sampler's own cost
                return
            self._safe_tick()

    def _safe_tick(self) -> None:
        try:
            self._tick()
        except Exception as e:  # a bug here must not take the host down; say it once
            msg = f"sampling failed: {e!r}"
            if msg not in self.warnings:
                self.warnings.append(msg)
                log.exception("profiler: %s", msg)

    def _tick(self) -> None:
        now = self._last_tick = time.monotonic()
        t = now - self._t0
        cpu, pids = self._cpu.read()
        row: dict[str, float | None] = {"wall_time": time.time(), "elapsed_s": t, **cpu}
        for g in self._gpus:
            row.update({g.prefix + k: v for k, v in g.read(pids, t).items()})
        self._csv.write(row)

    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            log.warning("profiler: %s", msg)

    def _summarize(self) -> dict[str, Any]:
        raw = {g.prefix + k: v for g in self._gpus for k, v in g.raw.items()}
        unsupported = dict(self.unsupported)
        for g in self._gpus:
            unsupported.update({g.prefix + k: why for k, why in g.unsupported.items()})
        return {
            "started": self.started,
            "interval_s": self.interval,
            "devices": [g.info for g in self._gpus],
            **summarize(self.csv_path, raw, self.idle_below),
            "unsupported": unsupported,
            "sampler_cpu_s": self._cpu_s,
            "warnings": self.warnings + [w for g in self._gpus for w in g.warnings],
            "files": {
                k: str(p)
                for k, p in (
                    ("csv", self.csv_path),
                    ("json", self.json_path),
                    ("png", self.png_path),
                )
                if k != "png" or self.plot
            },
        }
