"""Horovod synchronous SGD on digits: time per iteration and test accuracy against workers
and batch.

    python bench/scaling.py             # mlp and cnn, 2 repeats: 20 launches
    python bench/scaling.py --repeats 1 # half of that
    python bench/scaling.py --quick     # a reduced form, for the test suite

Every run is ``horovodrun -np N -H localhost:N --gloo python -m hvdsgd.train`` (synchronous
ring-allreduce) for a fixed number of epochs, constant learning rate, momentum 0.9, one compute
thread per rank (``--threads``: one worker is one core, so workers are the only variable). Two
sweeps, for ``mlp`` and ``cnn``:

1. workers 1, 2, 4 at 64 samples per rank per step (weak scaling: the global batch grows with
   the workers). On a machine with fewer cores than ranks the ranks share cores (oversubscribed);
   the output says so.
2. batch size per rank 16, 64, 256 at 2 workers (the 2-worker, batch-64 run is shared with 1).

Learning-rate rule: a fixed base rate per rank (``--lr`` 0.02, both models) for every batch
size; Horovod multiplies it by the number of ranks (linear scaling in the workers, none in the
batch per rank), so larger batches take fewer steps per epoch and reach a lower accuracy in the
same epochs. Most of a launch's time is horovodrun's and Python's start-up, not the epochs;
that sets the run time.
Time per iteration is an epoch's training time over its steps (ceil(samples per rank / batch)),
the first epoch left out as warm-up; samples/s likewise; speed-up is samples/s over the 1-worker
figure. ± is 1.96 x the standard deviation over the repeats (where single runs fall).
Writes ``bench/results/scaling[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    command_line,
    horovodrun,
    machine,
    mean_spread,
    parser,
    save_figure,
    write_results,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(model: str, workers: int, batch: int, args, out: Path) -> dict:
    """One horovodrun launch; time per iteration and samples/s over the epochs after the first."""
    cmd = horovodrun(
        workers,
        "-m",
        "hvdsgd.train",
        "--model",
        model,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(batch),
        "--lr",
        str(args.lr),
        "--momentum",
        "0.9",
        "--scheduler",
        "constant",
        "--warmup-epochs",
        "0",
        "--seed",
        str(args.seed),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--no-progress",
        "--no-plots",
        "--no-checkpoint",
        "--overwrite",
        "--out",
        str(out),
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    launch_s = time.perf_counter() - t  # the whole launch, start-up included
    if proc.returncode != 0:
        sys.exit(
            f"bench/scaling.py: {model}, {workers} workers, batch {batch} failed:\n"
            f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        )
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    samples = sum(r["samples_per_sec"] * r["epoch_time_s"] for r in rows)  # all ranks, padded
    seconds = sum(r["epoch_time_s"] for r in rows)
    # Each rank takes ceil(its shard / batch) steps an epoch (DistributedSampler pads the shards).
    steps = len(rows) * math.ceil(round(samples / len(rows) / workers) / batch)
    return {
        "iter_ms": 1000 * seconds / steps,
        "samples_per_sec": samples / seconds,
        "test_accuracy": s["test_accuracy"],
        "test_macro_f1": s["test_macro_f1"],
        "launch_s": launch_s,
    }


def aggregate(runs: list[dict]) -> dict:
    return {key: mean_spread([r[key] for r in runs]) for key in runs[0]}


def render(results: dict) -> str:
    def cell(v: tuple[float, float], scale: float = 1.0, digits: int = 1) -> str:
        return f"{scale * v[0]:,.{digits}f} ± {scale * v[1]:,.{digits}f}"

    cfg, cores = results["config"], results["machine"]["cores"]
    out = [
        f"{cfg['epochs']} epochs on digits (1,437 train / 360 test), the first left out of the "
        f"timing; {cfg['threads']} compute thread(s) per rank; lr {cfg['lr']:g} per rank x workers "
        f"(Horovod), the same for every batch size; "
        f"{cfg['repeats']} repeat(s), ± 1.96 x std."
    ]
    if max(cfg["workers"]) > cores:
        out[0] += f" More ranks than the {cores} cores: those runs are oversubscribed."
    for model in cfg["models"]:
        rows = [r for r in results["workers"] if r["model"] == model]
        out += [
            "",
            f"| {model}: workers (batch {cfg['batch']} per rank) | time / iteration (ms) "
            "| samples/s | speed-up over 1 worker | test accuracy (%) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            over = " (oversubscribed)" if r["workers"] > cores else ""
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
            out.append(
                f"| {r['workers']}{over} | {cell(r['iter_ms'], digits=2)} "
                f"| {cell(r['samples_per_sec'], digits=0)} | {speedup} "
                f"| {cell(r['test_accuracy'], 100, 2)} |"
            )
        rows = [r for r in results["batch"] if r["model"] == model]
        out += [
            "",
            f"| {model}: batch per rank ({cfg['batch_workers']} workers) "
            "| time / iteration (ms) | samples/s | test accuracy (%) |",
            "|---|---|---|---|",
        ]
        for r in rows:
            out.append(
                f"| {r['batch']} | {cell(r['iter_ms'], digits=2)} | "
                f"{cell(r['samples_per_sec'], digits=0)} | {cell(r['test_accuracy'], 100, 2)} |"
            )
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    # (panel, sweep = x, y key, y scale, y label): one line per model, error bars ± spread.
    panels = (
        (axes[0, 0], "workers", "iter_ms", 1, "time / iteration (ms)"),
        (axes[0, 1], "batch", "iter_ms", 1, "time / iteration (ms)"),
        (axes[1, 0], "batch", "test_accuracy", 100, "test accuracy (%)"),
        (axes[1, 1], "workers", "test_accuracy", 100, "test accuracy (%)"),
    )
    for ax, x, key, scale, ylabel in panels:
        ax.set_title(
            f"{ylabel.split(' (')[0]} against {'batch size' if x == 'batch' else x}", fontsize=10
        )
        for model in cfg["models"]:
            rows = [r for r in results[x] if r["model"] == model]
            ax.errorbar(
                [r[x] for r in rows],
                [scale * r[key][0] for r in rows],
                yerr=[scale * r[key][1] for r in rows],
                marker="o",
                capsize=3,
                label=model,
            )
        if x == "batch":
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"batch size per rank ({cfg['batch_workers']} workers)")
        else:
            ax.set_xlabel(f"workers (batch {cfg['batch']} per rank)")
        ax.set_xticks(cfg["batches"] if x == "batch" else cfg["workers"])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylabel(ylabel)
        if key == "test_accuracy":
            ax.set_ylim(top=100.5)  # the ± bars of a noisy point may not pass 100%
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bench/scaling.py: Horovod SGD on digits, {results['machine']['description']}")
    save_figure(fig, path)


def main(argv=None) -> None:
    p = parser(__doc__, "mlp, workers 1,2 at batch 32 (batch sweep: 32), 5 epochs, 1 repeat")
    p.add_argument("--models", default="mlp,cnn", help="comma-separated models")
    p.add_argument("--workers", default="1,2,4", help="sweep 1: numbers of ranks")
    p.add_argument("--batch", type=int, default=64, help="sweep 1: batch size per rank")
    p.add_argument("--batches", default="16,64,256", help="sweep 2: batch sizes per rank")
    p.add_argument("--batch-workers", type=int, default=2, help="sweep 2: number of ranks")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run (the first is warm-up)")
    p.add_argument("--lr", type=float, default=0.02, help="base learning rate per rank")
    p.add_argument("--seed", type=int, default=42, help="seed of the first repeat (+1 each)")
    p.add_argument("--device", default="cpu", help="device of every rank (cpu, cuda)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads per rank: fixed, so that the ranks are the only variable",
    )
    p.add_argument("--repeats", type=int, default=2, help="repeats, order alternating")
    args = p.parse_args(argv)
    if args.quick:
        # Two launches (horovodrun's start-up, not the epochs, is most of a run's time): the
        # batch sweep is the one point it shares with the workers sweep.
        args.models, args.workers, args.batch, args.batches = "mlp", "1,2", 32, "32"
        args.epochs, args.repeats = 5, 1
    if args.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is left out of the timing")
    models = args.models.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    cores = len(os.sched_getaffinity(0))
    # The (workers, batch) points of both sweeps, each run once per repeat.
    points = list(
        dict.fromkeys(
            [(w, args.batch) for w in workers] + [(args.batch_workers, b) for b in batches]
        )
    )
    jobs = [(m, w, b) for m in models for w, b in points]
    print(
        f"scaling: {','.join(models)} on digits, workers {workers} at batch {args.batch}, "
        f"batch {batches} at {args.batch_workers} workers, {cores} cores, {args.epochs} epochs, "
        f"{args.repeats} repeat(s): {len(jobs) * args.repeats} launches",
        flush=True,
    )
    runs = {j: [] for j in jobs}
    with tempfile.TemporaryDirectory() as tmp:
        args_rep = argparse.Namespace(**vars(args))
        for rep in range(args.repeats):
            args_rep.seed = args.seed + rep
            for m, w, b in jobs if rep % 2 == 0 else reversed(jobs):
                r = run(m, w, b, args_rep, Path(tmp) / f"{m}-{w}-{b}-{rep}")
                runs[(m, w, b)].append(r)
                over = " (oversubscribed)" if w > cores else ""
                print(
                    f"  {m:>4} {w} worker(s){over}, batch {b:>3}: "
                    f"{r['iter_ms']:7.2f} ms/iteration, "
                    f"{r['samples_per_sec']:>8,.0f} samples/s, {100 * r['test_accuracy']:.2f}%, "
                    f"launch {r['launch_s']:.1f} s",
                    flush=True,
                )

    def row(m: str, w: int, b: int) -> dict:
        rs = runs[(m, w, b)]
        return {"model": m, "workers": w, "batch": b, **aggregate(rs), "runs": rs}

    by_workers = [row(m, w, args.batch) for m in models for w in workers]
    for r in by_workers:  # throughput over the 1-worker run's (None without one)
        one = next((o for o in by_workers if o["model"] == r["model"] and o["workers"] == 1), None)
        r["speedup"] = r["samples_per_sec"][0] / one["samples_per_sec"][0] if one else None
    config = {**vars(args), "models": models, "workers": workers, "batches": batches}
    results = {
        "command": command_line("scaling.py", argv),
        "machine": machine(gpu=args.device != "cpu"),
        "config": config,
        "workers": by_workers,
        "batch": [row(m, args.batch_workers, b) for m in models for b in batches],
    }
    md = render(results)
    print("\n" + md)
    name = "scaling-quick" if args.quick else "scaling"
    plot(results, write_results(args.out, name, results, md).with_suffix(".png"))


if __name__ == "__main__":
    main()
