"""Which settings fill the machine: training under hvdsgd.profiler over a sweep of settings.

    python bench/occupancy.py                      # GPU form on a GPU machine, else CPU form
    python bench/occupancy.py --parts overhead     # the profiler's own cost only
    python bench/occupancy.py --quick              # a reduced form, for the test suite

1. ``sweep``. On an NVIDIA GPU: ``python -m hvdsgd.train --profile`` (one rank, CUDA) with
   ``--model`` on synthetic CIFAR-shaped data over batch size, AMP (off / bf16), loader workers
   and pinned memory; the table gives samples/s, GPU utilisation (the driver's duty cycle,
   what ``nvidia-smi`` shows), SM activity and SM occupancy and tensor-pipe activity (GPM, as
   DCGM reports them) and memory. This is the "GPU occupancy from near 0% to near 100%"
   experiment: utilisation reads high long before the SMs are full. On a CPU-only machine it
   runs the CPU form and says so in its first line: HOGWILD (``--strategy hogwild``,
   ``mlp`` on digits) over the number of worker processes, with samples/s, CPU utilisation
   and busy cores.
2. ``overhead``: the step time of a training loop with the profiler sampling at 100 ms and
   without it, in adjacent pairs of blocks in one process (the order alternating); the
   slowdown is the mean of the pairs' ratios. Target: <= 1% slower.

Writes ``bench/results/occupancy[-quick].{json,md,png}`` and each run's profile (CSV, JSON,
PNG) under ``bench/results/occupancy/``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import command_line, machine, mean_ci, parser, save_figure, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------- settings


def gpu_settings(model: str, quick: bool) -> list[dict]:
    """One setting at a time away from a small baseline, then all the good ones together."""
    batches = [32, 256] if quick else [16, 64, 256, 1024]
    rows = [{"name": f"batch {b}", "args": ["--batch-size", str(b)]} for b in batches]
    big = str(batches[-1])
    rows.append({"name": f"batch {big} + bf16", "args": ["--batch-size", big, "--amp", "bf16"]})
    if not quick:
        rows.append(
            {
                "name": f"batch {big} + channels-last + bf16",
                "args": ["--batch-size", big, "--amp", "bf16", "--channels-last"],
            }
        )
        for workers, pin in ((4, False), (4, True)):
            rows.append(
                {
                    "name": f"batch {big} + bf16, {workers} loader workers"
                    + (" + pinned" if pin else ""),
                    "args": [
                        "--batch-size",
                        big,
                        "--amp",
                        "bf16",
                        "--loader-workers",
                        str(workers),
                        "--pin-memory" if pin else "--no-pin-memory",
                    ],
                }
            )
    for r in rows:
        r["args"] = [
            "--model",
            model,
            "--dataset",
            "synthetic",
            "--synthetic-samples",
            "2048" if quick else "16384",
            "--device",
            "cuda",
        ] + r["args"]
    return rows


def cpu_settings(quick: bool) -> list[dict]:
    cores = len(os.sched_getaffinity(0))
    counts = [1, 2] if quick else sorted({1, 2, cores, 2 * cores})
    return [
        {
            "name": f"{w} HOGWILD worker{'s' * (w > 1)}",
            "args": [
                "--model",
                "mlp",
                "--strategy",
                "hogwild",
                "--workers",
                str(w),
                "--lr",
                "0.05",
                "--eval-interval",
                "1",
            ],
            "workers": w,
        }
        for w in counts
    ]


# ------------------------------------------------------------------------------- sweep


def run_setting(setting: dict, epochs: int, interval: float, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "hvdsgd.train",
        *setting["args"],
        "--epochs",
        str(epochs),
        "--profile",
        "--profile-interval",
        str(interval),
        "--no-progress",
        "--no-plots",
        "--no-checkpoint",
        "--overwrite",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"bench/occupancy.py: {' '.join(cmd[2:])} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    prof = json.loads((out / "profile.json").read_text())

    def stat(column: str, key: str = "mean"):
        return (prof["metrics"].get(column) or {}).get(key)

    return {
        "setting": setting["name"],
        "samples_per_sec": s["samples_per_sec"],
        "test_accuracy": s["test_accuracy"],
        "gpu_util": stat("gpu0_util"),
        "sm_active": stat("gpu0_sm_util"),
        "sm_occupancy": stat("gpu0_sm_occupancy"),
        "tensor_active": stat("gpu0_tensor_util"),
        "dram_active": stat("gpu0_dram_bw_util"),
        "mem_used_mib": stat("gpu0_mem_used_mib", "max"),
        "power_w": stat("gpu0_power_w"),
        "cpu_util": stat("cpu_util"),
        "busy_cores": stat("cpu_busy_cores"),
        "gpu_idle_share": prof.get("gpu_idle_share"),
        "unsupported": prof.get("unsupported"),
        "profile_dir": str(out),
    }


def sweep(gpu: bool, args, profiles: Path) -> list[dict]:
    settings = gpu_settings(args.model, args.quick) if gpu else cpu_settings(args.quick)
    epochs = (
        args.epochs
        or {(True, True): 1, (True, False): 2, (False, True): 60, (False, False): 600}[
            (gpu, args.quick)
        ]
    )
    rows = []
    shutil.rmtree(profiles, ignore_errors=True)
    for i, setting in enumerate(settings):
        keep = (
            profiles
            / f"{i:02d}-{setting['name'].replace(' ', '_').replace('+', '').replace(',', '')}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            r = run_setting(setting, epochs, args.interval, Path(tmp))
            keep.mkdir(parents=True)
            for f in Path(tmp).glob("profile.*"):  # the profile is the result; the run is not
                shutil.copy(f, keep / f.name)
        r["profile_dir"] = str(keep)
        rows.append(r)
        print(
            f"  {r['setting']:<44} {r['samples_per_sec']:>10,.0f} samples/s  "
            + (
                f"GPU {r['gpu_util'] or 0:5.1f}%  SM occupancy {_pct(r['sm_occupancy'])}"
                if gpu
                else f"CPU {_pct(r['cpu_util'])}  busy cores {r['busy_cores'] or 0:.2f}"
            ),
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------- overhead


def overhead(args, profiles: Path) -> dict:
    """Step time with and without the profiler, interleaved blocks in this process."""
    import torch.nn.functional as F

    from hvdsgd import models
    from hvdsgd.profiler import Profiler

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    name, shape, batch = ("resnet18", (3, 32, 32), 256) if gpu else ("cnn", (1, 28, 28), 64)
    torch.manual_seed(0)
    model = models.build(name, shape, 10).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def block(steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps

    steps = 10 if args.quick else 50
    block(steps)  # warm-up
    # Pairs of adjacent blocks, in alternating order; the slowdown is the mean of the pairs'
    # ratios, so drifts of the machine's speed cancel within a pair.
    off, on, ratios, share = [], [], [], []
    for rep in range(2 if args.quick else args.repeats * 8):
        pair = {}
        for kind in ("off", "on") if rep % 2 == 0 else ("on", "off"):
            if kind == "off":
                pair[kind] = block(steps)
            else:
                with Profiler(profiles / "overhead", interval=0.1, plot=False, gpu=gpu) as prof:
                    pair[kind] = block(steps)
                share.append(prof.summary["sampler_cpu_s"] / (steps * pair[kind]))
        off.append(pair["off"])
        on.append(pair["on"])
        ratios.append(pair["on"] / pair["off"])
    (m_off, c_off), (m_on, c_on), (m_r, c_r) = mean_ci(off), mean_ci(on), mean_ci(ratios)
    print(
        f"  overhead ({name}, batch {batch}, {device.type}): step {1e3 * m_off:.3f} ± "
        f"{1e3 * c_off:.3f} ms without, {1e3 * m_on:.3f} ± {1e3 * c_on:.3f} ms with the "
        f"profiler at 100 ms: {100 * (m_r - 1):+.2f} ± {100 * c_r:.2f}% (paired); the "
        f"sampler thread used {100 * statistics.mean(share):.3f}% of one core",
        flush=True,
    )
    return {
        "model": name,
        "batch": batch,
        "device": device.type,
        "steps_per_block": steps,
        "step_ms_off": 1e3 * m_off,
        "step_ms_off_ci95": 1e3 * c_off,
        "step_ms_on": 1e3 * m_on,
        "step_ms_on_ci95": 1e3 * c_on,
        "slowdown_pct": 100 * (m_r - 1),
        "slowdown_pct_ci95": 100 * c_r,
        "pairs": len(ratios),
        "sampler_cpu_pct_of_core": 100 * statistics.mean(share),
    }


# ------------------------------------------------------------------------------ output


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}%"


def render(results: dict) -> str:
    parts = []
    if "sweep" in results:
        if results["machine"]["gpu"]:
            lines = [
                "| setting | samples/s | GPU util | SM active | SM occupancy | tensor active "
                "| DRAM active | peak memory (MiB) | power (W) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in results["sweep"]:
                lines.append(
                    f"| {r['setting']} | {r['samples_per_sec']:,.0f} | {_pct(r['gpu_util'])} "
                    f"| {_pct(r['sm_active'])} | {_pct(r['sm_occupancy'])} "
                    f"| {_pct(r['tensor_active'])} | {_pct(r['dram_active'])} "
                    f"| {r['mem_used_mib'] or 0:,.0f} | {r['power_w'] or 0:.0f} |"
                )
        else:
            lines = [
                "| setting | samples/s | CPU utilisation | busy cores | test accuracy |",
                "|---|---|---|---|---|",
            ]
            for r in results["sweep"]:
                lines.append(
                    f"| {r['setting']} | {r['samples_per_sec']:,.0f} | {_pct(r['cpu_util'])} "
                    f"| {r['busy_cores'] or 0:.2f} | {100 * r['test_accuracy']:.2f}% |"
                )
        parts.append("\n".join(lines))
    if "overhead" in results:
        o = results["overhead"]
        parts.append(
            "| loop | step without profiler (ms) | step with profiler at 100 ms (ms) "
            "| slower by (paired blocks) | sampler thread CPU (% of one core) |\n"
            "|---|---|---|---|---|\n"
            f"| {o['model']}, batch {o['batch']}, {o['device']} | {o['step_ms_off']:.3f} ± "
            f"{o['step_ms_off_ci95']:.3f} | {o['step_ms_on']:.3f} ± {o['step_ms_on_ci95']:.3f} "
            f"| {o['slowdown_pct']:+.2f} ± {o['slowdown_pct_ci95']:.2f}% "
            f"| {o['sampler_cpu_pct_of_core']:.3f} |"
        )
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, gpu = results["sweep"], results["machine"]["gpu"]
    names = [r["setting"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 2), sharey=True)
    a.barh(names, [r["samples_per_sec"] for r in rows], color="tab:blue")
    a.set_xlabel("samples/s")
    a.invert_yaxis()
    keys = (
        (
            ("gpu_util", "GPU utilisation"),
            ("sm_active", "SM active"),
            ("sm_occupancy", "SM occupancy"),
            ("tensor_active", "tensor active"),
        )
        if gpu
        else (("cpu_util", "CPU utilisation"),)
    )
    height = 0.8 / len(keys)
    for k, (key, label) in enumerate(keys):
        b.barh(
            [i + k * height for i in range(len(rows))],
            [r[key] or 0 for r in rows],
            height=height,
            label=label,
        )
    b.set_xlabel("%")
    b.set_xlim(0, 100)
    b.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"bench/occupancy.py on {results['machine']['description']}")
    save_figure(fig, path)


def main(argv=None) -> None:
    p = parser(__doc__, "seconds, CPU or GPU form as the machine has")
    p.add_argument("--parts", default="sweep,overhead", help="comma-separated parts to run")
    p.add_argument("--model", default="resnet18", help="GPU form: the model of the sweep")
    p.add_argument(
        "--epochs", type=int, default=0, help="epochs per setting (0: the form's default)"
    )
    p.add_argument("--interval", type=float, default=0.1, help="profiler interval, seconds")
    p.add_argument("--repeats", type=int, default=5, help="overhead: pairs of blocks / 8")
    p.add_argument("--cpu", action="store_true", help="the CPU form even on a GPU machine")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    info = machine(gpu=not args.cpu)
    gpu = info["gpu"] is not None
    form = (
        "GPU form on " + info["gpu"]
        if gpu
        else "CPU form (no GPU: HOGWILD workers against CPU use)"
    )
    print(f"occupancy: {form}; {info['cores']} cores", flush=True)
    out = Path(args.out)
    name = "occupancy-quick" if args.quick else "occupancy"
    profiles = out / (name + ("-gpu" if gpu else ""))  # each setting's profile, beside the record
    results: dict = {"machine": info}
    with tempfile.TemporaryDirectory() as tmp:
        if "sweep" in parts:
            results["sweep"] = sweep(gpu, args, profiles)
        if "overhead" in parts:
            results["overhead"] = overhead(args, Path(tmp))
    md = render(results)
    print("\n" + md)
    results["command"] = command_line("occupancy.py", argv)
    stem = write_results(out, name, results, md)
    if "sweep" in results:
        plot(results, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
