"""A fake ``libnvidia-ml`` at the ctypes level, driving the real ``pynvml`` module.

``FakeNvml(...).install(monkeypatch)`` sets ``pynvml.nvmlLib`` to the fake and empties pynvml's
function-pointer cache, so every pynvml wrapper runs its real argument and structure
marshalling and then calls a method here by its C name. The methods receive the real ctypes
objects: ``byref`` arguments arrive as ``CArgObject`` and are written through ``arg._obj``;
device handles are opaque pointers whose address names the GPU. A C function the fake lacks
raises AttributeError, which pynvml turns into NVML_ERROR_FUNCTION_NOT_FOUND, as with an old
driver.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass, field

import pynvml as N

OK = N.NVML_SUCCESS
_BASE = 0x1000  # handle address of GPU i: _BASE + i
_DEFAULT_GPM = {1: 55.0, 2: 60.0, 3: 30.0, 5: 25.0, 10: 15.0, 12: 5.0, 13: 2.0}


def now_us() -> int:
    return int(time.time() * 1e6)


@dataclass
class FakeGpu:
    """One fake GPU: what it reports, and which calls fail with which nvmlReturn_t."""

    uuid: str
    name: str = "NVIDIA H200"
    util: int = 40  # % in each generated GPU_UTILIZATION sample
    mem_util: int = 20
    history: int = 99  # value of the samples already in the buffer before the profiler starts
    auto_samples: bool = True  # append a sample every period_us up to now on each read
    period_us: int = 20_000
    gpm: bool = True
    gpm_values: dict[int, float] = field(default_factory=lambda: dict(_DEFAULT_GPM))
    gpm_errors: dict[int, int] = field(default_factory=dict)  # metric id -> its nvmlReturn
    errors: dict[str, int] = field(default_factory=dict)  # C function -> nvmlReturn_t
    power_instant_mw: int | None = 250_000  # None: the field value is NOT_SUPPORTED
    power_avg_mw: int = 200_000
    procs: dict[int, int] = field(default_factory=dict)  # pid -> smUtil
    mig_gi: int | None = None  # a MIG instance: its GPU instance id
    lost: bool = False
    index: int = 0
    buffers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # type -> (ts, v)
    last_seen: dict[int, list[int]] = field(default_factory=dict)  # type -> timestamps passed

    def __post_init__(self) -> None:
        t = now_us() - 10 * self.period_us
        for kind in (N.NVML_GPU_UTILIZATION_SAMPLES, N.NVML_MEMORY_UTILIZATION_SAMPLES):
            self.buffers[kind] = [(t + k * self.period_us, self.history) for k in range(5)]
            self.last_seen[kind] = []

    def push(self, kind: int, samples: list[tuple[int, int]]) -> None:
        """Append (timestamp us, value) samples to the driver's buffer of ``kind``."""
        self.buffers[kind].extend(samples)

    def _generate(self, kind: int) -> None:
        buf, value = self.buffers[kind], self.util if kind == 1 else self.mem_util
        while self.auto_samples and buf[-1][0] + self.period_us <= now_us():
            buf.append((buf[-1][0] + self.period_us, value))


def _handle(h: object) -> int:
    return ctypes.cast(h, ctypes.c_void_p).value or 0


def _set_handle(arg: object, address: int) -> None:
    ctypes.c_void_p.from_buffer(arg._obj).value = address


def _device(fn):
    """A device call: look the GPU up, record the call, fail it as configured."""

    @functools.wraps(fn)
    def call(self: FakeNvml, handle: object, *args: object) -> int:
        gpu = self.gpus[_handle(handle) - _BASE]
        self.calls.append((fn.__name__, gpu.index, gpu.lost))
        if gpu.lost:
            return N.NVML_ERROR_GPU_IS_LOST
        if fn.__name__ in gpu.errors:
            return gpu.errors[fn.__name__]
        return fn(self, gpu, *args)

    return call


def _error_string(code: int) -> bytes:  # a plain function: pynvml sets .restype on it
    return b"fake NVML error %d" % code


class FakeNvml:
    """The fake library; ``calls`` lists (C function, GPU index, lost) of every device call."""

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None):
        self.gpus, self.init_error = gpus, init_error
        for i, g in enumerate(gpus):
            g.index = i
        self.calls: list[tuple[str, int, bool]] = []
        self.inits = self.shutdowns = 0
        self.gpm_taken: dict[int, tuple[int, float]] = {}  # sample address -> (gpu, time)
        self.gpm_gaps: list[float] = []  # seconds between the two samples of each pair read
        self._next_sample = 0x100000
        self._proc_pending: list = []
        self.nvmlErrorString = _error_string

    def install(self, monkeypatch) -> FakeNvml:
        monkeypatch.setattr(N, "nvmlLib", self)
        monkeypatch.setattr(N, "_nvmlGetFunctionPointer_cache", {})
        monkeypatch.setattr(N, "_nvmlLib_refcount", 0)
        return self

    def called(self, name: str, gpu: int | None = None) -> int:
        return sum(c[0] == name and (gpu is None or c[1] == gpu) for c in self.calls)

    # -- library
    def nvmlInitWithFlags(self, flags: int) -> int:
        self.inits += 1
        return self.init_error or OK

    def nvmlShutdown(self) -> int:
        self.shutdowns += 1
        return OK

    def nvmlDeviceGetCount_v2(self, count) -> int:
        count._obj.value = len(self.gpus)
        return OK

    def nvmlDeviceGetHandleByIndex_v2(self, index, device) -> int:
        if index.value >= len(self.gpus):
            return N.NVML_ERROR_INVALID_ARGUMENT
        _set_handle(device, _BASE + index.value)
        return OK

    def nvmlDeviceGetHandleByUUID(self, uuid, device) -> int:
        hits = [g.index for g in self.gpus if g.uuid.encode() == uuid.value]
        if not hits:
            return N.NVML_ERROR_NOT_FOUND
        _set_handle(device, _BASE + hits[0])
        return OK

    # -- description
    @_device
    def nvmlDeviceGetUUID(self, gpu, buf, size) -> int:
        buf.value = gpu.uuid.encode()
        return OK

    @_device
    def nvmlDeviceGetName(self, gpu, buf, size) -> int:
        buf.value = gpu.name.encode()
        return OK

    @_device
    def nvmlDeviceGetCudaComputeCapability(self, gpu, major, minor) -> int:
        major._obj.value, minor._obj.value = (9, 0) if gpu.gpm else (8, 0)
        return OK

    @_device
    def nvmlDeviceGetMigMode(self, gpu, current, pending) -> int:
        current._obj.value = pending._obj.value = int(gpu.mig_gi is not None)
        return OK

    @_device
    def nvmlDeviceIsMigDeviceHandle(self, gpu, is_mig) -> int:
        is_mig._obj.value = int(gpu.mig_gi is not None)
        return OK

    @_device
    def nvmlDeviceGetGpuInstanceId(self, gpu, gi) -> int:
        gi._obj.value = gpu.mig_gi
        return OK

    @_device
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, gpu, device) -> int:
        _set_handle(device, _BASE + gpu.index)  # the fake's parent is the same GPU
        return OK

    # -- readings
    @_device
    def nvmlDeviceGetSamples(self, gpu, kind, last_seen, value_type, count, samples) -> int:
        if samples is None:  # pynvml's first call asks for the size
            gpu._generate(kind.value)
            gpu.last_seen[kind.value].append(last_seen.value)
        new = [s for s in gpu.buffers[kind.value] if s[0] > last_seen.value]
        if not new:
            return N.NVML_ERROR_NOT_FOUND
        value_type._obj.value = N.NVML_VALUE_TYPE_UNSIGNED_INT
        if samples is not None:
            for k, (ts, v) in enumerate(new[: count._obj.value]):
                samples[k].timeStamp, samples[k].sampleValue.uiVal = ts, v
        count._obj.value = min(len(new), count._obj.value) if samples is not None else len(new)
        return OK

    @_device
    def nvmlDeviceGetMemoryInfo_v2(self, gpu, mem) -> int:
        if mem._obj.version != N.nvmlMemory_v2:
            return N.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        mem._obj.total, mem._obj.used = 141 * 2**30, 3 * 2**30
        mem._obj.free = mem._obj.total - mem._obj.used
        return OK

    @_device
    def nvmlDeviceGetFieldValues(self, gpu, n, values) -> int:
        for k in range(n.value):
            fv = values._obj[k]
            if fv.fieldId == N.NVML_FI_DEV_POWER_INSTANT and gpu.power_instant_mw is not None:
                fv.nvmlReturn, fv.valueType = OK, N.NVML_VALUE_TYPE_UNSIGNED_INT
                fv.value.uiVal = gpu.power_instant_mw
            else:
                fv.nvmlReturn = N.NVML_ERROR_NOT_SUPPORTED
        return OK

    @_device
    def nvmlDeviceGetPowerUsage(self, gpu, mw) -> int:
        mw._obj.value = gpu.power_avg_mw
        return OK

    @_device
    def nvmlDeviceGetTotalEnergyConsumption(self, gpu, mj) -> int:
        mj._obj.value = 10**9 + now_us() // 4  # 250 W
        return OK

    @_device
    def nvmlDeviceGetClockInfo(self, gpu, kind, mhz) -> int:
        mhz._obj.value = 1980 if kind.value == N.NVML_CLOCK_SM else 2619
        return OK

    @_device
    def nvmlDeviceGetTemperature(self, gpu, sensor, celsius) -> int:
        celsius._obj.value = 45
        return OK

    @_device
    def nvmlDeviceGetPcieThroughput(self, gpu, counter, kb_s) -> int:
        kb_s._obj.value = 3000 if counter.value == N.NVML_PCIE_UTIL_RX_BYTES else 1000
        return OK

    @_device
    def nvmlDeviceGetProcessUtilization(self, gpu, samples, count, last_seen) -> int:
        if samples is None:  # size query: take one record per process, now
            t = now_us()
            self._proc_pending = [
                (pid, t, sm) for pid, sm in gpu.procs.items() if t > last_seen.value
            ]
            count._obj.value = len(self._proc_pending)
            return N.NVML_ERROR_INSUFFICIENT_SIZE if self._proc_pending else N.NVML_ERROR_NOT_FOUND
        for k, (pid, t, sm) in enumerate(self._proc_pending[: count._obj.value]):
            samples[k].pid, samples[k].timeStamp, samples[k].smUtil = pid, t, sm
        return OK

    # -- GPM
    @_device
    def nvmlGpmQueryDeviceSupport(self, gpu, support) -> int:
        if support._obj.version != N.NVML_GPM_SUPPORT_VERSION:
            return N.NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        support._obj.isSupportedDevice = int(gpu.gpm)
        return OK

    def nvmlGpmSampleAlloc(self, sample) -> int:
        self._next_sample += 16
        _set_handle(sample, self._next_sample)
        return OK

    def nvmlGpmSampleFree(self, sample) -> int:
        self.gpm_taken.pop(_handle(sample), None)
        return OK

    @_device
    def nvmlGpmSampleGet(self, gpu, sample) -> int:
        if gpu.mig_gi is not None:
            return N.NVML_ERROR_NOT_SUPPORTED  # a MIG GPU: only per-instance samples
        self.gpm_taken[_handle(sample)] = (gpu.index, time.monotonic())
        return OK

    @_device
    def nvmlGpmMigSampleGet(self, gpu, gi, sample) -> int:
        if gi != gpu.mig_gi:
            return N.NVML_ERROR_INVALID_ARGUMENT
        self.gpm_taken[_handle(sample)] = (gpu.index, time.monotonic())
        return OK

    def nvmlGpmMetricsGet(self, metrics_get) -> int:
        mg = metrics_get._obj
        s1, s2 = (self.gpm_taken.get(_handle(s)) for s in (mg.sample1, mg.sample2))
        if mg.version != N.NVML_GPM_METRICS_GET_VERSION or not s1 or not s2:
            return N.NVML_ERROR_INVALID_ARGUMENT
        gpu = self.gpus[s2[0]]
        self.gpm_gaps.append(s2[1] - s1[1])
        for k in range(mg.numMetrics):
            m = mg.metrics[k]
            m.nvmlReturn = gpu.gpm_errors.get(m.metricId, OK)
            m.value = 0.0 if m.nvmlReturn else gpu.gpm_values.get(m.metricId, 0.0)
        return OK
