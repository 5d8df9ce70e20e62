"""NVML and GPM readings of one GPU, and the choice of GPUs by CUDA's view of them.

Every call is checked on its own. A metric the driver refuses (Not Supported, Insufficient
Permissions, Function Not Found) is marked unsupported with the reason and not asked for
again; ``GPU is lost`` from any call marks the whole device lost, and it is not polled again.
NVML numbers devices in PCI order and ignores ``CUDA_VISIBLE_DEVICES``, so devices are matched
by UUID (:func:`resolve`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

try:
    import pynvml as N
except ImportError:  # pragma: no cover - a dependency of the profiler only
    N = None

log = logging.getLogger("hvdsgd")

GPM_MIN_GAP_S = 0.1  # NVIDIA: the two samples of a GPM pair must be >= 100 ms apart
_GPM_WAIT_S = 0.01  # a pair due within this much is waited for rather than skipped
GPM_METRICS = {  # column -> (NVML_GPM_METRIC_* id, DCGM-style name of value / 100)
    "graphics_util": (1, "gr_engine_active"),
    "sm_util": (2, "sm_active"),
    "sm_occupancy": (3, "sm_occupancy"),
    "tensor_util": (5, "pipe_tensor_active"),
    "dram_bw_util": (10, "dram_active"),
    "fp32_util": (12, "pipe_fp32_active"),
    "fp16_util": (13, "pipe_fp16_active"),
}
COLUMNS = (
    "util",
    "mem_util",
    "mem_used_mib",
    "mem_total_mib",
    "power_w",
    "energy_j",
    "sm_clock_mhz",
    "mem_clock_mhz",
    "temp_c",
    "pcie_rx_mb_s",
    "pcie_tx_mb_s",
    "proc_sm_util",
    *GPM_METRICS,
)  # per GPU, each prefixed gpu{i}_
# Refusals that will not change during the run: NOT_SUPPORTED, NO_PERMISSION,
# FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH.
_PERMANENT = (3, 4, 13, 25)
_UNION = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")  # by nvmlValueType_t


class GpuLost(Exception):
    """NVML said GPU_IS_LOST."""


def _check_lost(e: Exception) -> None:
    if getattr(e, "value", None) == N.NVML_ERROR_GPU_IS_LOST:
        raise GpuLost(str(e))


def _query(fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, None when NVML refuses (GpuLost still raised)."""
    try:
        return fn(*args)
    except N.NVMLError as e:
        _check_lost(e)
        return None


def _value(kind: int, v: Any) -> float:
    """A ``c_nvmlValue_t`` union read by its ``nvmlValueType_t``."""
    return float(getattr(v, _UNION[kind] if 0 <= kind < len(_UNION) else "uiVal"))


# ---------------------------------------------------------------- choosing devices


@dataclass
class GpuRef:
    """One GPU as this process sees it."""

    uuid: str
    name: str
    nvml_index: int | None  # None for a MIG instance
    cuda_ordinal: int | None  # its CUDA device number here (None: picked by NVML index)


def parse_cuda_visible_devices(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries; None when unset (every GPU visible)."""
    if value is None:
        return None
    return [t.strip() for t in value.split(",")] if value.strip() else []


def _match(tok: str, uuids: list[str], handles: list[Any]) -> tuple[int | None, Any] | None:
    """(NVML index, handle) for one entry, or None where CUDA would end the list."""
    if tok.isdigit():
        i = int(tok)
        return (i, handles[i]) if i < len(handles) else None
    if tok.startswith("MIG-"):
        try:
            return None, N.nvmlDeviceGetHandleByUUID(tok)
        except N.NVMLError:
            return None
    hits = [i for i, u in enumerate(uuids) if tok.startswith("GPU-") and u.startswith(tok)]
    return (hits[0], handles[hits[0]]) if len(hits) == 1 else None  # a prefix must be unique


def resolve(
    tokens: list[str] | None, cuda_ordinal: int | None = None, by_cuda: bool = True
) -> tuple[list[tuple[GpuRef, Any]], str]:
    """The (GpuRef, handle) pairs for ``tokens``, in their order, and why the list is empty.

    ``tokens`` are ``CUDA_VISIBLE_DEVICES`` entries (None: all GPUs): NVML indices, ``GPU-``
    UUIDs or unique prefixes of them, ``MIG-`` UUIDs; like CUDA, the list ends at the first
    entry that matches nothing or repeats. ``cuda_ordinal`` keeps only that entry. An index
    is an NVML (PCI-order) index, which is CUDA's order under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    and on servers of identical GPUs. NVML must be initialised.
    """
    count = N.nvmlDeviceGetCount()
    handles = [N.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids = [N.nvmlDeviceGetUUID(h) for h in handles]
    picked: list[tuple[int | None, Any]] = []
    for tok in [str(i) for i in range(count)] if tokens is None else tokens:
        hit = _match(tok, uuids, handles)
        if hit is None or (hit[0] is not None and hit[0] in [p[0] for p in picked]):
            break
        picked.append(hit)
    refs = [
        (GpuRef(N.nvmlDeviceGetUUID(h), N.nvmlDeviceGetName(h), i, k if by_cuda else None), h)
        for k, (i, h) in enumerate(picked)
    ]
    if not refs:
        return [], (
            f"NVML sees {count} GPU(s), none of them visible here" if count else "NVML found no GPU"
        )
    if cuda_ordinal is None:
        return refs, ""
    if 0 <= cuda_ordinal < len(refs):
        return [refs[cuda_ordinal]], ""
    return [], f"no CUDA device {cuda_ordinal}: {len(refs)} visible to this process"


def visible_gpus(
    cuda_ordinal: int | None = None, cuda_visible_devices: str | None = None
) -> list[GpuRef]:
    """The GPUs CUDA numbers 0, 1, ... in this process, without initialising CUDA.

    Reads ``CUDA_VISIBLE_DEVICES`` from the environment unless given; ``cuda_ordinal`` (e.g.
    Horovod's local rank) keeps only that device. Raises ``pynvml.NVMLError`` without NVML.
    """
    env = (
        cuda_visible_devices
        if cuda_visible_devices is not None
        else os.environ.get("CUDA_VISIBLE_DEVICES")
    )
    N.nvmlInit()
    try:
        return [ref for ref, _ in resolve(parse_cuda_visible_devices(env), cuda_ordinal)[0]]
    finally:
        N.nvmlShutdown()


# ---------------------------------------------------------------- sampling one GPU


class GpuSampler:
    """Reads one GPU once per tick; never raises, and stops polling a lost GPU."""

    def __init__(self, prefix: str, ref: GpuRef, handle: Any):
        self.prefix, self.ref, self.h = prefix, ref, handle
        self.unsupported: dict[str, str] = {}  # column -> reason
        self.warnings: list[str] = []
        self.lost = False
        self.raw: dict[str, list[float]] = {"util": [], "mem_util": []}  # every driver sample
        self._seen = {"util": 0, "mem_util": 0, "proc": 0}  # last driver timestamps (us)
        self._energy0: float | None = None
        self._power_field = True  # NVML_FI_DEV_POWER_INSTANT until it fails
        self._gpm_ids = {col: mid for col, (mid, _) in GPM_METRICS.items()}
        self._gpm_bufs: list[Any] | None = None
        self._gpm_t: float | None = None
        self.info: dict[str, Any] = {
            "column": prefix.rstrip("_"),
            "uuid": ref.uuid,
            "name": ref.name,
            "nvml_index": ref.nvml_index,
            "cuda_ordinal": ref.cuda_ordinal,
            "lost": False,
        }
        try:
            self._describe()
            self._setup_gpm()
            self.read(set(), 0.0)  # prime: skip the driver's history, set counter baselines
        except GpuLost as e:
            self._mark_lost(0.0, e)
        for col in self.raw:
            self.raw[col].clear()

    # -- helpers
    def _warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
            log.warning("profiler: %s", msg)

    def _failed(self, cols: tuple[str, ...], fn: Callable, e: Exception) -> None:
        _check_lost(e)
        reason = f"{fn.__name__}: {e}"
        if getattr(e, "value", None) in _PERMANENT:
            self.unsupported.update({c: reason for c in cols})
        else:
            self._warn(f"{self.info['column']} {'/'.join(cols)}: {reason}")

    def _call(self, cols: str | tuple[str, ...], fn: Callable, *args: Any) -> Any:
        """``fn(*args)``, or None when it fails (a permanent refusal marks ``cols``)."""
        cols = (cols,) if isinstance(cols, str) else cols
        if cols[0] in self.unsupported:
            return None
        try:
            return fn(*args)
        except N.NVMLError as e:
            self._failed(cols, fn, e)
            return None

    def _mark_lost(self, t: float, e: Exception) -> None:
        self.lost = self.info["lost"] = True
        self._gpm_bufs = None  # freeing them needs the device
        self._warn(
            f"{self.info['column']} ({self.ref.name}, {self.ref.uuid}) lost at "
            f"{t:.1f} s ({e}); no longer polled"
        )

    # -- setup
    def _describe(self) -> None:
        cc = _query(N.nvmlDeviceGetCudaComputeCapability, self.h)
        mode = _query(N.nvmlDeviceGetMigMode, self.h)
        self.info.update(
            compute_capability=f"{cc[0]}.{cc[1]}" if cc else None, mig_mode=bool(mode and mode[0])
        )

    def _setup_gpm(self) -> None:
        """GPM buffers where the device supports GPM; MIG instances sample their GPU instance."""
        h, gi, why = self.h, None, ""
        is_mig = bool(getattr(_query(N.nvmlDeviceIsMigDeviceHandle, h), "value", 0))
        try:
            if is_mig:
                gi = N.nvmlDeviceGetGpuInstanceId(h)
                h = N.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h)
            if N.nvmlGpmQueryDeviceSupport(h).isSupportedDevice:
                self._gpm_bufs = [N.nvmlGpmSampleAlloc(), N.nvmlGpmSampleAlloc()]
            else:
                why = "nvmlGpmQueryDeviceSupport: no GPM on this device (needs Hopper or newer)"
        except N.NVMLError as e:
            _check_lost(e)
            why = f"GPM setup: {e}"
        self._gpm_h, self._gpm_gi = h, gi
        self.info.update(mig=is_mig, gpm_supported=not why, gpm_reason=why or None)
        if why:
            self.unsupported.update({col: why for col in GPM_METRICS})
            self._gpm_ids = {}

    def close(self) -> None:
        """Free the GPM buffers (while NVML is still initialised)."""
        for buf in self._gpm_bufs or []:
            try:
                N.nvmlGpmSampleFree(buf)
            except N.NVMLError:
                pass
        self._gpm_bufs = None

    # -- reading
    def read(self, pids: set[int], t: float) -> dict[str, float | None]:
        """One row of this GPU's columns (unprefixed); {} once the GPU is lost."""
        if self.lost:
            return {}
        try:
            return self._read(pids)
        except GpuLost as e:
            self._mark_lost(t, e)
            return {}

    def _read(self, pids: set[int]) -> dict[str, float | None]:
        h, v = self.h, {}
        v["util"] = self._buffered("util", N.NVML_GPU_UTILIZATION_SAMPLES)
        v["mem_util"] = self._buffered("mem_util", N.NVML_MEMORY_UTILIZATION_SAMPLES)
        mem = self._call(
            ("mem_used_mib", "mem_total_mib"), N.nvmlDeviceGetMemoryInfo, h, N.nvmlMemory_v2
        )
        if mem is not None:
            v["mem_used_mib"], v["mem_total_mib"] = mem.used / 2**20, mem.total / 2**20
        v["power_w"] = self._power_w()
        mj = self._call("energy_j", N.nvmlDeviceGetTotalEnergyConsumption, h)
        if mj is not None:
            self._energy0 = mj if self._energy0 is None else self._energy0
            v["energy_j"] = (mj - self._energy0) / 1000
        v["sm_clock_mhz"] = self._call("sm_clock_mhz", N.nvmlDeviceGetClockInfo, h, N.NVML_CLOCK_SM)
        v["mem_clock_mhz"] = self._call(
            "mem_clock_mhz", N.nvmlDeviceGetClockInfo, h, N.NVML_CLOCK_MEM
        )
        v["temp_c"] = self._call("temp_c", N.nvmlDeviceGetTemperature, h, N.NVML_TEMPERATURE_GPU)
        for col, counter in (
            ("pcie_rx_mb_s", N.NVML_PCIE_UTIL_RX_BYTES),
            ("pcie_tx_mb_s", N.NVML_PCIE_UTIL_TX_BYTES),
        ):
            kb = self._call(col, N.nvmlDeviceGetPcieThroughput, h, counter)  # KB/s
            v[col] = None if kb is None else kb / 1000
        v["proc_sm_util"] = self._proc_sm_util(pids)
        v.update(self._gpm())
        return v

    def _buffered(self, col: str, kind: int) -> float | None:
        """Mean of the driver's samples newer than the last one seen: none lost, none twice."""
        if col in self.unsupported:
            return None
        try:
            vtype, samples = N.nvmlDeviceGetSamples(self.h, kind, self._seen[col])
        except N.NVMLError as e:
            if e.value != N.NVML_ERROR_NOT_FOUND:  # NOT_FOUND: nothing new yet
                self._failed((col,), N.nvmlDeviceGetSamples, e)
            return None
        new = [s for s in samples if s.timeStamp > self._seen[col]]
        if not new:
            return None
        self._seen[col] = max(s.timeStamp for s in new)
        vals = [_value(vtype, s.sampleValue) for s in new]
        self.raw[col].extend(vals)
        return sum(vals) / len(vals)

    def _power_w(self) -> float | None:
        """Instant power (a field value); the 1-s average of nvmlDeviceGetPowerUsage if absent."""
        if self._power_field:
            try:
                fv = N.nvmlDeviceGetFieldValues(self.h, [N.NVML_FI_DEV_POWER_INSTANT])[0]
                if fv.nvmlReturn == N.NVML_SUCCESS:
                    self.info["power_source"] = "instant"
                    return _value(fv.valueType, fv.value) / 1000
            except N.NVMLError as e:
                _check_lost(e)
            self._power_field = False
            self.info["power_source"] = "average"
        mw = self._call("power_w", N.nvmlDeviceGetPowerUsage, self.h)
        return None if mw is None else mw / 1000

    def _proc_sm_util(self, pids: set[int]) -> float | None:
        """SM % of the profiled processes, from the samples newer than the last one seen."""
        if "proc_sm_util" in self.unsupported:
            return None
        try:
            recs = N.nvmlDeviceGetProcessUtilization(self.h, self._seen["proc"])
        except N.NVMLError as e:
            if e.value in (N.NVML_ERROR_NOT_FOUND, N.NVML_SUCCESS):  # no samples: idle
                return 0.0
            self._failed(("proc_sm_util",), N.nvmlDeviceGetProcessUtilization, e)
            return None
        new = [r for r in recs if r.timeStamp > self._seen["proc"]]
        self._seen["proc"] = max([r.timeStamp for r in new], default=self._seen["proc"])
        per_pid: dict[int, list[int]] = {}
        for r in new:
            if r.pid in pids:
                per_pid.setdefault(r.pid, []).append(r.smUtil)
        return float(sum(sum(u) / len(u) for u in per_pid.values()))

    def _gpm(self) -> dict[str, float | None]:
        """GPM metrics from the pair (previous sample, this one), >= GPM_MIN_GAP_S apart."""
        if self._gpm_bufs is None or not self._gpm_ids:
            return {}
        if self._gpm_t is not None:
            wait = self._gpm_t + GPM_MIN_GAP_S - time.monotonic()
            if wait > _GPM_WAIT_S:
                return {}  # too soon: the next tick takes the pair
            if wait > 0:
                time.sleep(wait)  # timer jitter: a few ms, on the sampler thread only
        prev, cur = self._gpm_bufs
        try:
            t = time.monotonic()
            if self._gpm_gi is None:
                N.nvmlGpmSampleGet(self._gpm_h, cur)
            else:
                N.nvmlGpmMigSampleGet(self._gpm_h, self._gpm_gi, cur)
        except N.NVMLError as e:
            self._gpm_failed(e)
            return {}
        first, self._gpm_t, self._gpm_bufs = self._gpm_t is None, t, [cur, prev]
        return {} if first else self._gpm_metrics(prev, cur)

    def _gpm_metrics(self, s1: Any, s2: Any) -> dict[str, float | None]:
        cols = list(self._gpm_ids)
        mg = N.c_nvmlGpmMetricsGet_t()
        mg.version, mg.numMetrics, mg.sample1, mg.sample2 = (
            N.NVML_GPM_METRICS_GET_VERSION,
            len(cols),
            s1,
            s2,
        )
        for k, col in enumerate(cols):
            mg.metrics[k].metricId = self._gpm_ids[col]
        try:
            N.nvmlGpmMetricsGet(mg)
        except N.NVMLError as e:
            self._gpm_failed(e)
            return {}
        out: dict[str, float | None] = {}
        for k, col in enumerate(cols):  # each metric carries its own nvmlReturn
            m = mg.metrics[k]
            if m.nvmlReturn == N.NVML_SUCCESS and math.isfinite(m.value):
                out[col] = m.value
            else:
                out[col] = None
                why = f"GPM metric {self._gpm_ids[col]}: {N.NVMLError(m.nvmlReturn)}"
                if m.nvmlReturn in _PERMANENT:  # not asked for again
                    self.unsupported[col] = why
                    del self._gpm_ids[col]
                else:
                    self._warn(f"{self.info['column']} {col}: {why}")
        return out

    def _gpm_failed(self, e: Exception) -> None:
        _check_lost(e)
        if getattr(e, "value", None) in _PERMANENT:
            self.unsupported.update({col: f"GPM: {e}" for col in self._gpm_ids})
            self.info.update(gpm_supported=False, gpm_reason=f"GPM: {e}")
            self._gpm_ids = {}
            self.close()
        else:
            self._warn(f"{self.info['column']} GPM: {e}")
