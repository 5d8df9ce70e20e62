"""hvdsgd.profiler: the real pynvml over a ctypes-level fake NVML (tests/fake_nvml.py), psutil,
and the CLI around short child commands. No GPU needed except for the `gpu` test."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pynvml as N
import pytest
from conftest import ROOT
from fake_nvml import FakeGpu, FakeNvml

from hvdsgd.errors import UsageError
from hvdsgd.profiler import Profiler, parse_cuda_visible_devices, read_csv, summarize, visible_gpus
from hvdsgd.profiler.nvml import GpuSampler, resolve

UTIL, MEM = N.NVML_GPU_UTILIZATION_SAMPLES, N.NVML_MEMORY_UTILIZATION_SAMPLES
UUID0, UUID1 = (
    "GPU-aaaa0000-0000-0000-0000-000000000000",
    "GPU-bbbb1111-1111-1111-1111-111111111111",
)


@pytest.fixture
def fake_nvml(monkeypatch):
    """make(*FakeGpu, **kw) installs a FakeNvml in place of libnvidia-ml."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return lambda *gpus, **kw: FakeNvml(list(gpus), **kw).install(monkeypatch)


def profile(tmp_path, seconds=0.45, during=None, **kw):
    """Run a Profiler (interval 0.05, no PNG) for ``seconds``; returns it and its CSV columns."""
    with Profiler(tmp_path, interval=kw.pop("interval", 0.05), plot=False, **kw) as prof:
        time.sleep(seconds / 2)
        if during:
            during()
        time.sleep(seconds / 2)
    return prof, read_csv(prof.csv_path)


def values(cols, name):
    return [v for v in cols[name] if v is not None]


# ------------------------------------------------------------------ NVML, through the fake


@pytest.mark.unit
def test_buffered_samples_are_each_read_once(fake_nvml):
    gpu = FakeGpu(UUID0, auto_samples=False)  # holds 5 samples of 99 from before the start
    fake_nvml(gpu)
    N.nvmlInit()
    ((ref, handle),) = resolve(None)[0]
    sampler = GpuSampler("gpu0_", ref, handle)  # the first read skips the driver's history
    t0 = gpu.buffers[UTIL][-1][0]
    gpu.push(UTIL, [(t0 + 1, 10), (t0 + 2, 30)])
    assert sampler.read(set(), 1.0)["util"] == 20  # mean of the new samples
    gpu.push(UTIL, [(t0 + 3, 70)])
    assert sampler.read(set(), 2.0)["util"] == 70  # only the newer one
    assert sampler.read(set(), 3.0)["util"] is None  # nothing new: blank, not repeated
    assert sampler.raw["util"] == [10, 30, 70]  # none lost, none twice, no history
    assert gpu.last_seen[UTIL] == [0, t0, t0 + 2, t0 + 3]  # the last seen timestamp passed
    N.nvmlShutdown()


@pytest.mark.unit
def test_profiler_records_gpu_and_cpu_metrics(tmp_path, fake_nvml):
    other_pid = 999_999  # another user's process on the same GPU
    fake = fake_nvml(FakeGpu(UUID0, procs={os.getpid(): 30, other_pid: 50}))
    prof, cols = profile(tmp_path)
    s = json.loads(prof.json_path.read_text())
    assert fake.inits == 1 and fake.shutdowns == 1
    assert values(cols, "gpu0_util") and set(values(cols, "gpu0_util")) == {
        40
    }  # history of 99 skipped
    assert s["metrics"]["gpu0_util"]["max"] == 40 and s["gpu_idle_share"]["gpu0"] == 0.0
    assert s["metrics"]["gpu0_mem_util"]["mean"] == 20
    assert values(cols, "gpu0_mem_used_mib")[0] == 3 * 1024
    assert values(cols, "gpu0_mem_total_mib")[0] == 141 * 1024
    assert set(values(cols, "gpu0_power_w")) == {250}  # the instant field, not the 1-s average
    energy = values(cols, "gpu0_energy_j")
    assert energy[0] > 0 and energy == sorted(energy)  # joules since the start
    assert set(values(cols, "gpu0_proc_sm_util")) == {30}  # our process only
    assert values(cols, "gpu0_sm_clock_mhz")[0] == 1980 and values(cols, "gpu0_temp_c")[0] == 45
    assert values(cols, "gpu0_pcie_rx_mb_s")[0] == 3 and values(cols, "gpu0_pcie_tx_mb_s")[0] == 1
    assert values(cols, "cpu_util") and len(values(cols, "cpu0_util")) == len(cols["elapsed_s"])
    assert s["devices"][0]["uuid"] == UUID0 and s["devices"][0]["gpm_supported"]
    assert s["samples"] == len(cols["elapsed_s"]) >= 5 and s["interval_s"] == 0.05
    assert s["unsupported"] == {} and s["warnings"] == []


@pytest.mark.unit
def test_gpm_pairs_are_100ms_apart_at_a_shorter_interval(tmp_path, fake_nvml):
    fake = fake_nvml(FakeGpu(UUID0))
    prof, cols = profile(tmp_path, interval=0.03)
    assert len(fake.gpm_gaps) >= 2 and min(fake.gpm_gaps) >= 0.0995
    sm = cols["gpu0_sm_util"]
    assert sm.count(None) > len(sm) / 3 and set(values(cols, "gpu0_sm_util")) == {60}
    assert len(values(cols, "cpu_util")) == len(sm)  # the rest at the 30-ms interval
    dcgm = prof.summary["dcgm"]["gpu0"]
    assert dcgm["sm_active"]["mean"] == pytest.approx(0.60)
    assert dcgm["sm_occupancy"]["mean"] == pytest.approx(0.30)
    assert dcgm["pipe_tensor_active"]["mean"] == pytest.approx(0.25)
    assert dcgm["dram_active"]["mean"] == pytest.approx(0.15)


@pytest.mark.unit
def test_gpm_metric_error_blanks_only_that_metric(tmp_path, fake_nvml):
    fake_nvml(FakeGpu(UUID0, gpm_errors={5: N.NVML_ERROR_NOT_SUPPORTED, 13: N.NVML_ERROR_UNKNOWN}))
    prof, cols = profile(tmp_path)
    assert values(cols, "gpu0_tensor_util") == [] and values(cols, "gpu0_fp16_util") == []
    assert set(values(cols, "gpu0_sm_occupancy")) == {30} and set(
        values(cols, "gpu0_fp32_util")
    ) == {5}
    assert "Not Supported" in prof.summary["unsupported"]["gpu0_tensor_util"]
    assert "gpu0_fp16_util" not in prof.summary["unsupported"]  # transient: blank, asked again
    assert "pipe_tensor_active" not in prof.summary["dcgm"]["gpu0"]


@pytest.mark.unit
def test_refused_counters_are_recorded_and_not_asked_again(tmp_path, fake_nvml):
    fake = fake_nvml(
        FakeGpu(
            UUID0,
            power_instant_mw=None,
            errors={
                "nvmlDeviceGetPcieThroughput": N.NVML_ERROR_NO_PERMISSION,
                "nvmlDeviceGetTotalEnergyConsumption": N.NVML_ERROR_NOT_SUPPORTED,
            },
        )
    )
    prof, cols = profile(tmp_path)
    why = prof.summary["unsupported"]
    assert (
        "Insufficient Permissions" in why["gpu0_pcie_rx_mb_s"]
        and "Insufficient Permissions" in why["gpu0_pcie_tx_mb_s"]
    )
    assert "Not Supported" in why["gpu0_energy_j"]
    assert fake.called("nvmlDeviceGetPcieThroughput") == 2  # once per direction, then never
    assert values(cols, "gpu0_pcie_rx_mb_s") == [] and values(cols, "gpu0_energy_j") == []
    assert set(values(cols, "gpu0_power_w")) == {200}  # fell back to nvmlDeviceGetPowerUsage
    assert prof.summary["devices"][0]["power_source"] == "average"
    assert set(values(cols, "gpu0_util")) == {40}  # everything else still works


@pytest.mark.unit
def test_gpu_without_gpm(tmp_path, fake_nvml):
    fake = fake_nvml(FakeGpu(UUID0, name="NVIDIA A100", gpm=False))
    prof, cols = profile(tmp_path)
    dev = prof.summary["devices"][0]
    assert dev["gpm_supported"] is False and "Hopper" in dev["gpm_reason"]
    assert "Hopper" in prof.summary["unsupported"]["gpu0_sm_occupancy"]
    assert fake.called("nvmlGpmSampleGet") == 0 and values(cols, "gpu0_sm_util") == []
    assert set(values(cols, "gpu0_util")) == {40}


@pytest.mark.unit
def test_mig_instance_samples_its_gpu_instance(tmp_path, fake_nvml):
    fake = fake_nvml(FakeGpu(UUID0, mig_gi=3))
    prof, cols = profile(tmp_path)
    assert prof.summary["devices"][0]["mig"] is True
    assert fake.called("nvmlGpmMigSampleGet") >= 2 and fake.called("nvmlGpmSampleGet") == 0
    assert set(values(cols, "gpu0_sm_occupancy")) == {30}


@pytest.mark.unit
def test_gpu_lost_mid_run(tmp_path, fake_nvml, caplog):
    gpu = FakeGpu(UUID0)
    fake = fake_nvml(gpu)
    lost_at = []
    prof, cols = profile(
        tmp_path,
        seconds=0.6,
        during=lambda: (setattr(gpu, "lost", True), lost_at.append(time.time())),
    )
    assert prof.summary["devices"][0]["lost"] is True
    assert any("lost" in w and UUID0 in w for w in prof.summary["warnings"])
    after = [k for k, t in enumerate(cols["wall_time"]) if t > lost_at[0] + 0.06]
    assert len(after) >= 3  # the sampler kept going ...
    assert all(cols["cpu_util"][k] is not None for k in after)  # ... with the CPU
    assert all(cols["gpu0_util"][k] is None and cols["gpu0_power_w"][k] is None for k in after)
    assert sum(lost for _, _, lost in fake.calls) == 1  # the dead device is not polled again
    assert fake.shutdowns == 1 and "lost" in caplog.text


@pytest.mark.unit
def test_cuda_visible_devices_reordered_picks_by_uuid(tmp_path, fake_nvml, monkeypatch):
    fake = fake_nvml(FakeGpu(UUID0), FakeGpu(UUID1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert [g.uuid for g in visible_gpus()] == [UUID1, UUID0]
    (picked,) = visible_gpus(cuda_ordinal=0)
    assert (picked.uuid, picked.nvml_index, picked.cuda_ordinal) == (UUID1, 1, 0)
    assert [g.uuid for g in visible_gpus(cuda_visible_devices="GPU-bbbb,GPU-aaaa")] == [
        UUID1,
        UUID0,
    ]
    assert [g.uuid for g in visible_gpus(cuda_visible_devices="0,7,1")] == [UUID0]  # ends at 7
    assert visible_gpus(cuda_visible_devices="GPU-") == []  # ambiguous prefix
    assert parse_cuda_visible_devices(None) is None and parse_cuda_visible_devices("") == []

    prof, cols = profile(tmp_path, cuda_ordinal=0)
    assert [d["uuid"] for d in prof.summary["devices"]] == [UUID1]
    assert fake.called("nvmlDeviceGetSamples", gpu=1) > 0
    assert fake.called("nvmlDeviceGetSamples", gpu=0) == 0
    assert not any(c.startswith("gpu1_") for c in cols)


@pytest.mark.unit
@pytest.mark.parametrize("broken", ["library", "driver", "no-gpu"])
def test_without_nvml_records_cpu_only(tmp_path, monkeypatch, caplog, fake_nvml, broken):
    if broken == "library":  # the real loading path: dlopen("libnvidia-ml.so.1") fails
        monkeypatch.setattr(N, "nvmlLib", None)
        monkeypatch.setattr(N, "_nvmlGetFunctionPointer_cache", {})
        monkeypatch.setattr(N, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
        reason = "Library Not Found"
    elif broken == "driver":
        fake_nvml(FakeGpu(UUID0), init_error=N.NVML_ERROR_DRIVER_NOT_LOADED)
        reason = "Driver Not Loaded"
    else:
        fake_nvml()
        reason = "no GPU"
    with caplog.at_level(logging.INFO, logger="hvdsgd"):
        prof, cols = profile(tmp_path, seconds=0.25)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "no GPU metrics" in said[0] and reason in said[0]
    assert reason in prof.summary["unsupported"]["gpu"] and prof.summary["devices"] == []
    assert not any(c.startswith("gpu") for c in cols) and values(cols, "cpu_util")


@pytest.mark.unit
def test_stop_is_prompt_and_sampling_errors_stay_in_the_thread(tmp_path, monkeypatch):
    prof = Profiler(tmp_path, interval=30, gpu=False, plot=False)
    prof.start()
    t = time.monotonic()
    prof.stop()
    assert time.monotonic() - t < 2  # an Event wait, not a 30-s sleep
    assert prof.stop() is prof.summary  # idempotent

    def broken(self):
        raise RuntimeError("psutil broke")

    monkeypatch.setattr("hvdsgd.profiler.cpu.CpuSampler.read", broken)
    prof = Profiler(tmp_path, interval=0.02, gpu=False, plot=False)
    with prof:
        time.sleep(0.15)
    assert prof.summary["warnings"] == ["sampling failed: RuntimeError('psutil broke')"]


@pytest.mark.unit
def test_summarize_statistics(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text(
        "wall_time,elapsed_s,gpu0_util,gpu0_sm_util,cpu_util\n"
        "1,0.1,0,40,10\n2,0.2,0,,30\n3,0.3,50,60,\n4,0.4,100,,20\n"
    )
    s = summarize(csv)
    assert s["metrics"]["gpu0_util"] == pytest.approx(
        {"mean": 37.5, "p50": 25, "p95": 92.5, "max": 100, "n": 4}
    )  # numpy's percentiles
    assert s["gpu_idle_share"]["gpu0"] == 0.5 and s["samples"] == 4 and s["duration_s"] == 0.4
    assert s["dcgm"]["gpu0"]["sm_active"]["mean"] == pytest.approx(0.5)
    assert s["metrics"]["cpu_util"]["n"] == 3
    raw = summarize(csv, raw={"gpu0_util": [0.0, 80.0, 90.0, 100.0]})  # driver samples win
    assert raw["metrics"]["gpu0_util"]["mean"] == 67.5 and raw["gpu_idle_share"]["gpu0"] == 0.25


def write_profile_csv(path, cores, gpu=False, rows=20):
    """A profile CSV with ``cores`` per-core columns (and one GPU's, with ``gpu``)."""
    cols = ["wall_time", "elapsed_s", "cpu_util"] + [f"cpu{k}_util" for k in range(cores)]
    cols += ["gpu0_util", "gpu0_power_w"] if gpu else []
    lines = [",".join(cols)]
    for i in range(rows):
        cpu = [100.0 * ((k + i) % 5) / 4 for k in range(cores)]
        lines.append(
            ",".join(
                map(
                    str,
                    [1000 + i / 10, i / 10, sum(cpu) / cores, *cpu, *([40, 250] if gpu else [])],
                )
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.unit
@pytest.mark.parametrize(
    "cores, gpu, ticks",
    [(3, False, [0, 1, 2]), (2, True, [0, 1]), (40, True, list(range(0, 40, 3)))],
)
def test_core_heat_map_has_integer_core_ticks_and_a_full_height_colour_bar(
    tmp_path, cores, gpu, ticks
):
    import matplotlib.pyplot as plt

    from hvdsgd.profiler.output import timeline_figure

    fig = timeline_figure(write_profile_csv(tmp_path / "p.csv", cores, gpu))
    try:
        fig.canvas.draw()  # constrained layout places the axes at draw time
        (bar,) = [ax for ax in fig.axes if ax.get_ylabel() == "CPU core %"]
        panels = [ax for ax in fig.axes if ax is not bar]
        heat = panels[-1]
        assert heat.get_ylabel() == "CPU core" and len(panels) == (3 if gpu else 1)
        assert list(heat.get_yticks()) == ticks  # whole cores, not -0.5, 0.5, ...
        assert [t.get_text() for t in heat.get_yticklabels()] == [f"cpu{k}" for k in ticks]
        assert heat.get_ylim() == (-0.5, cores - 0.5)  # row k centred on tick k
        h, b = heat.get_position(), bar.get_position()
        assert 0.9 < b.height / h.height <= 1.0  # the heat map's height, not a third of it
        px = bar.get_window_extent()
        assert b.x0 > h.x1 and 0.02 < px.width / px.height < 0.2  # a bar, beside the map
        assert [bar.get_ylim()] == [(0.0, 100.0)]
        for ax in panels:  # the GPU panels stay aligned with the heat map
            assert ax.get_position().x1 == pytest.approx(h.x1, abs=1e-3)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ the command line


def cli(*args, timeout=60, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "hvdsgd.profiler", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )


BURN_THEN_EXIT_3 = (
    "import sys, time\nt = time.time()\nwhile time.time() - t < 0.5: pass\nsys.exit(3)"
)


@pytest.mark.e2e
def test_cli_profiles_a_command_and_returns_its_exit_code(tmp_path):
    start = time.time()
    r = cli(
        "--interval", "0.05", "--out", str(tmp_path), "--", sys.executable, "-c", BURN_THEN_EXIT_3
    )
    assert r.returncode == 3, r.stderr
    cols = read_csv(tmp_path / "profile.csv")
    assert len(cols["elapsed_s"]) >= 6 and cols["elapsed_s"] == sorted(cols["elapsed_s"])
    assert all(start - 1 < t < time.time() for t in cols["wall_time"])
    assert max(values(cols, "rss_mib")) > 1  # the child's tree was measured
    cores = [c for c in cols if c.startswith("cpu") and c[3].isdigit()]
    assert max(max(values(cols, c)) for c in cores) > 80  # the burning core ...
    assert max(values(cols, "cpu_busy_cores")) >= 1  # ... counted busy
    s = json.loads((tmp_path / "profile.json").read_text())
    assert s["samples"] == len(cols["elapsed_s"]) and s["interval_s"] == 0.05
    for key in (
        "metrics",
        "devices",
        "unsupported",
        "warnings",
        "gpu_idle_share",
        "dcgm",
        "duration_s",
    ):
        assert key in s
    assert set(s["metrics"]["cpu_util"]) == {"mean", "p50", "p95", "max", "n"}
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_cli_duration_and_rank_file_names(tmp_path):
    r = cli(
        "--duration",
        "0.3",
        "--interval",
        "0.05",
        "--rank",
        "1",
        "--no-plot",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert len(read_csv(tmp_path / "profile-rank1.csv")["elapsed_s"]) >= 3
    assert (tmp_path / "profile-rank1.json").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, fix",
    [
        (["--interval", "0", "--", "true"], "--interval must be > 0"),
        (["--interval", "-1", "--", "true"], "--interval must be > 0"),
        (["--out", "x"], "give a command after -- or --duration"),
        (["--duration", "1", "--", "true"], "not both"),
        (["--interval", "fast", "--", "true"], "invalid float value"),
        (["--out", "{tmp}/file/sub", "--", "true"], "choose a writable directory"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, fix):
    (tmp_path / "file").write_text("")
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("hvdsgd.profiler: error:")
    assert fix in r.stderr and "Traceback" not in r.stderr


INTERVAL_RANGE = "--interval must be > 0 and <= 3600 seconds (got {}); e.g. --interval 0.1"
DURATION_RANGE = "--duration must be > 0 and <= 31536000 seconds (got {}); e.g. --duration 30"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, line",
    [
        (["--interval", "inf", "--", "true"], INTERVAL_RANGE.format("inf")),
        (["--interval", "nan", "--", "true"], INTERVAL_RANGE.format("nan")),
        (["--interval=-inf", "--", "true"], INTERVAL_RANGE.format("-inf")),
        (["--interval", "1e300", "--duration", "1"], INTERVAL_RANGE.format("1e+300")),
        (["--interval", "0", "--", "true"], INTERVAL_RANGE.format("0.0")),
        (["--duration", "inf"], DURATION_RANGE.format("inf")),
        (["--duration", "nan"], DURATION_RANGE.format("nan")),
        (["--duration", "1e300"], DURATION_RANGE.format("1e+300")),
        (["--duration", "0"], DURATION_RANGE.format("0.0")),
        (["--duration", "-2"], DURATION_RANGE.format("-2.0")),
        (["--dur", "1"], "unrecognized arguments: --dur 1 (see --help)"),
    ],
)
def test_cli_float_flags_must_be_finite_and_in_range(tmp_path, args, line):
    r = cli("--no-plot", "--out", str(tmp_path / "prof"), *args, timeout=20)
    assert (r.returncode, r.stderr, r.stdout) == (2, f"hvdsgd.profiler: error: {line}\n", "")
    assert not (tmp_path / "prof").exists()  # refused before anything was written


@pytest.mark.unit
@pytest.mark.parametrize("interval", [float("inf"), float("nan"), 0.0, 1e300])
def test_profiler_interval_must_be_finite_and_in_range(tmp_path, interval):
    with pytest.raises(UsageError, match=r"^the profiler interval must be > 0 and <= 3600 seconds"):
        Profiler(tmp_path, interval=interval)


@pytest.mark.e2e
def test_cli_command_not_found_exits_127(tmp_path):
    r = cli("--out", str(tmp_path), "--", "no-such-command-hvdsgd")
    assert r.returncode == 127
    assert r.stderr.strip() == (
        "hvdsgd.profiler: error: command not found: no-such-command-hvdsgd (check the name or PATH)"
    )


@pytest.mark.e2e
def test_cli_forwards_sigterm_to_the_command(tmp_path):
    child = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "print('ready', flush=True)\ntime.sleep(30)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hvdsgd.profiler",
            "--no-plot",
            "--out",
            str(tmp_path),
            "--",
            sys.executable,
            "-c",
            child,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 7  # the child got SIGTERM, and its status came back
    assert (tmp_path / "profile.json").exists()


# ------------------------------------------------------------------ a real GPU


@pytest.mark.gpu
def test_bf16_matmul_shows_on_a_real_gpu(tmp_path):
    import torch

    ordinal = torch.cuda.current_device()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    with Profiler(tmp_path, interval=0.1, cuda_ordinal=ordinal, plot=False) as prof:
        time.sleep(0.6)  # idle baseline
        t = time.time()
        while time.time() - t < 2.0:
            for _ in range(8):
                a @ b
            torch.cuda.synchronize()
        time.sleep(0.3)
    s, cols = prof.summary, read_csv(prof.csv_path)
    (dev,) = s["devices"]
    assert dev["uuid"] == f"GPU-{torch.cuda.get_device_properties(ordinal).uuid}"  # by UUID

    def rows(name, lo, hi):
        """Column ``name``'s values sampled between ``lo`` and ``hi`` seconds in."""
        pairs = zip(cols["elapsed_s"], cols[name], strict=True)
        return [v for t, v in pairs if lo < t < hi and v is not None]

    util_idle, util_busy = rows("gpu0_util", 0, 0.5), rows("gpu0_util", 0.9, 2.7)
    assert util_busy and max(util_busy) > 50 and max(util_busy) > max(util_idle, default=0)
    assert max(rows("gpu0_power_w", 0.9, 2.7)) > max(rows("gpu0_power_w", 0, 0.5))
    if torch.cuda.get_device_capability(ordinal)[0] == 9:  # Hopper: GPM must come back
        assert dev["gpm_supported"], dev["gpm_reason"]
        tensor_idle, tensor_busy = (
            rows("gpu0_tensor_util", 0, 0.5),
            rows("gpu0_tensor_util", 0.8, 2.6),
        )
        assert tensor_busy and max(tensor_busy) > 10 + max(tensor_idle, default=0)
        assert s["dcgm"]["gpu0"]["sm_active"]["max"] > 0.5
        assert s["dcgm"]["gpu0"]["sm_occupancy"]["max"] > 0
        assert not any(
            k.startswith("gpu0_") and k[5:] in ("sm_util", "tensor_util", "sm_occupancy")
            for k in s["unsupported"]
        )


# ------------------------------------------------------------ --profile in training


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["allreduce", "hogwild"])
def test_train_profile_records_the_run(tmp_path, strategy):
    extra = (
        ["--strategy", "hogwild", "--workers", "2", "--lr", "0.05"] if strategy == "hogwild" else []
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvdsgd.train",
            "--model",
            "mlp",
            "--epochs",
            "10",
            "--profile",
            "--profile-interval",
            "0.02",
            "--no-progress",
            "--no-checkpoint",
            "--out",
            str(tmp_path),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cols = read_csv(tmp_path / "profile.csv")
    assert len(cols["elapsed_s"]) >= 2
    prof = json.loads((tmp_path / "summary.json").read_text())["profile"]
    assert prof["files"]["csv"] == str(tmp_path / "profile.csv")
    assert prof["mean"]["cpu_util"] > 10  # training kept a core busy
    assert prof["mean"]["rss_mib"] > 50  # torch's process tree was measured
    if strategy == "hogwild":  # the workers are the parent's children
        assert max(v for v in cols["cpu_busy_cores"] if v is not None) >= 1
    assert (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_train_profile_interval_must_be_positive(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvdsgd.train",
            "--profile",
            "--profile-interval",
            "0",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hvdsgd: error: --profile-interval must be > 0 (got 0.0)"
    ]
