"""Training techniques on and off: AMP, gradient accumulation, pinned memory, channels-last.

    python bench/techniques.py           # resnet50, efficientnet_b0, vit x 6 settings
    python bench/techniques.py --quick   # vit, baseline and all, a tiny budget, for the tests
    python bench/techniques.py --models vit --settings baseline,amp,accum --repeats 2

Settings: ``baseline`` (fp32, NCHW, pageable memory); ``amp`` (bf16 autocast; on a GPU also
``amp-fp16`` with loss scaling); ``accum`` (2 micro-batches of half the batch per update: the same
samples per update, half the activations at a time); ``pin`` (page-locked batches copied
asynchronously; on a GPU the data stays on the host behind 2 loader workers in every setting; on
CPU nothing is copied: noted, not run); ``channels-last`` (NHWC batches); ``all`` (all four,
bf16). Each (model, setting) is a fresh process training with hvdsgd's own code (``Batches``,
``engine.train_step``, the ``Allreduce`` updater at one rank, as plain ``python -m hvdsgd.train``;
SGD, momentum 0.9, lr 0.01) on one budget per model, same order and seed in every setting: on CPU
one pass over digits at 32x32 (1,437 images; resnet50, several times dearer per image: 256), on a
GPU 10 passes at batch 64; then the 360 test images. Samples/s leaves out ``--warmup`` updates.
Peak memory is what training adds: on CPU the peak RSS (VmHWM, reset just before) less the RSS
before; on a GPU ``max_memory_allocated`` less the allocated before. These budgets leave resnet50
and vit near chance, efficientnet_b0 at 40-85% (the seed decides): accuracies compare settings
under one budget and seed (repeat r: seed r), not models.
Writes ``bench/results/techniques[-quick].{json,md,png}`` (``techniques-gpu.*`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, mean_ci, parser, save_figure, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# setting -> the TrainConfig fields it changes from the baseline
SETTINGS = {
    "baseline": {},
    "amp": {"amp": "bf16"},
    "amp-bf16": {"amp": "bf16"},
    "amp-fp16": {"amp": "fp16"},
    "accum": {"accum_steps": 2},
    "pin": {"pin_memory": True},
    "channels-last": {"channels_last": True},
    "all": {"amp": "bf16", "accum_steps": 2, "pin_memory": True, "channels_last": True},
}
DEFAULT_SETTINGS = "baseline,amp,accum,pin,channels-last,all"
# Training images per pass on CPU where not all 1,437: resnet50 trains at ~18 samples/s on 2
# cores against ~80 (efficientnet_b0) and ~100 (vit), and the full run should fit in ~8 minutes.
CPU_BUDGET = {"resnet50": 256}
NOT_ON_CPU = {
    "pin": "no effect without a GPU (nothing is copied to a device): not run",
    "amp-fp16": "fp16 autocast needs a GPU (hvdsgd refuses it on CPU): not run",
}


# -------------------------------------------------------------------------------- worker


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS: resident now, VmHWM: its peak) in bytes."""
    return 1024 * int(
        re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]
    )


def worker(args) -> None:
    """One (model, setting) run in this fresh process; writes its figures to ``args.result``."""
    import resource

    import torch

    from hvdsgd import data, dist, models
    from hvdsgd.config import TrainConfig
    from hvdsgd.engine import evaluate, grouped, seed, train_step
    from hvdsgd.metrics import Tally
    from hvdsgd.strategies.allreduce import Allreduce

    device = dist.init("auto", threads=0)  # one rank, all cores (as `python -m hvdsgd.train`)
    cuda = device.type == "cuda"
    on = SETTINGS[args.worker]
    accum = on.get("accum_steps", 1)
    cfg = TrainConfig(
        model=args.model,
        epochs=1,
        batch_size=args.batch_size // accum,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=0.9,
        scheduler="constant",
        warmup_epochs=0,
        amp=on.get("amp", "off"),
        accum_steps=accum,
        channels_last=on.get("channels_last", False),
        pin_memory=on.get("pin_memory", False),
        loader_workers=2 if cuda else 0,
    )
    ds = data.resize(data.load("digits"), models.input_size(args.model))  # stays on the host
    n = args.train_samples or len(ds.train_y)
    x, y = ds.train_x[:n], ds.train_y[:n]
    m = args.test_samples or len(ds.test_y)
    torch.manual_seed(args.seed)  # initial weights: the repeat's seed, the same in every setting
    model = models.build(args.model, ds.input_shape, ds.num_classes).to(device)
    sampler = data.ShardSampler(n, 0, 1, seed=args.seed)  # the same order in every setting
    batches = data.Batches(
        x, y, cfg.batch_size, sampler, device, cfg.loader_workers, cfg.pin_memory, cfg.channels_last
    )
    updater = Allreduce(cfg, model, device, steps_per_epoch=-(-len(batches) // accum))
    tally = Tally(ds.num_classes, device)

    # Memory before training: the data, the model and the libraries; training adds the rest.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the RSS now
        before = status_bytes("VmRSS")
    steps, timed, t0 = 0, 0, None
    for epoch in range(args.epochs):
        seed(args.seed + 1000 * epoch, device)  # dropout, stochastic depth
        sampler.set_epoch(epoch)
        model.train()
        for group in grouped(batches, accum):  # engine.train_epoch, with a clock per update
            if steps == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            train_step(model, group, updater, device, cfg.amp, tally)
            steps += 1
            timed += sum(len(b[1]) for b in group) if steps > args.warmup else 0
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0 if t0 is not None else float("nan")  # nan: all warm-up
    peak = torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")
    test_batches = data.Batches(
        ds.test_x[:m], ds.test_y[:m], 64, range(m), device, 0, False, cfg.channels_last
    )
    test = evaluate(model, test_batches, device, cfg.amp, Tally(ds.num_classes, device)).local()
    Path(args.result).write_text(
        json.dumps(
            {
                "samples_per_sec": timed / seconds,
                "timed_samples": timed,
                "timed_s": seconds,
                "updates": steps,
                "peak_mib": (peak - before) / 2**20,
                "before_mib": before / 2**20,
                "process_peak_mib": (
                    torch.cuda.max_memory_allocated()
                    if cuda
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                )
                / 2**20,
                "test_accuracy": test.accuracy,
                "test_macro_f1": test.macro_f1,
                "train_loss": tally.local().loss,
                "device": device.type,
            }
        )
    )


# -------------------------------------------------------------------------------- driver


def run(model: str, setting: str, rep: int, args, result: Path) -> dict:
    """One fresh process for (model, setting); its figures, or exit with its output's tail."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        setting,
        "--model",
        model,
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--optimizer",
        args.optimizer,
        "--epochs",
        str(args.epochs),
        "--train-samples",
        str(args.train_samples or args.budget.get(model, 0)),
        "--test-samples",
        str(args.test_samples),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(rep),
        "--result",
        str(result),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout
    )
    if proc.returncode != 0:
        sys.exit(
            f"bench/techniques.py: {model} / {setting} failed (exit {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    return json.loads(result.read_text())


def summarise(model: str, setting: str, runs: list[dict], base: dict | None, note: str) -> dict:
    """Mean (± 95% CI for samples/s) over the repeats, and the ratios to the model's baseline."""
    row = {"model": model, "setting": setting, "note": note, "runs": runs}
    if not runs:
        return row
    sps, ci = mean_ci([r["samples_per_sec"] for r in runs])
    avg = {
        k: sum(r[k] for r in runs) / len(runs)
        for k in ("peak_mib", "process_peak_mib", "test_accuracy", "test_macro_f1")
    }
    row.update(samples_per_sec=sps, samples_per_sec_ci95=ci, **avg)
    if base is not None:
        row["speed_ratio"] = sps / base["samples_per_sec"]
        row["memory_ratio"] = avg["peak_mib"] / base["peak_mib"]
    return row


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "—"


def render(rows: list[dict]) -> str:
    lines = [
        "| model | setting | samples/s | × baseline | peak memory (MiB) | × baseline "
        "| test accuracy (%) | macro-F1 | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "samples_per_sec" not in r:
            lines.append(f"| {r['model']} | {r['setting']} | — | — | — | — | — | — | {r['note']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['samples_per_sec']:,.1f} ± "
            f"{r['samples_per_sec_ci95']:,.1f} | {_ratio(r, 'speed_ratio')} | {r['peak_mib']:,.0f} "
            f"| {_ratio(r, 'memory_ratio')} | {100 * r['test_accuracy']:.1f} "
            f"| {r['test_macro_f1']:.3f} | {r['note']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Samples/s and peak memory per (model, setting): two horizontal bar charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "samples_per_sec" in r]
    names = [f"{r['model']} {r['setting']}" for r in done]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.35 * len(done) + 1.5), sharey=True)
    colors = [f"C{sorted({r['model'] for r in done}).index(r['model'])}" for r in done]
    a.barh(names, [r["samples_per_sec"] for r in done], color=colors)
    a.set_xlabel("samples/s")
    a.invert_yaxis()
    b.barh(names, [r["peak_mib"] for r in done], color=colors)
    b.set_xlabel("peak memory added by training (MiB)")
    save_figure(fig, path, dpi=100)


def main(argv=None) -> None:
    p = parser(
        __doc__,
        "vit, baseline and all, 1 repeat; on CPU 24 training images at batch 8 and 16 test "
        "images (on a GPU 48 and 40 at batch 64)",
    )
    p.add_argument("--models", default="resnet50,efficientnet_b0,vit", help="comma-separated")
    p.add_argument(
        "--settings", default=DEFAULT_SETTINGS, help="comma-separated, of: " + ", ".join(SETTINGS)
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each (model, setting), seed = repeat, order alternating",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per update (None: 16 on CPU, 64 on a GPU)",
    )
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="optimizer")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (constant; momentum 0.9)")
    p.add_argument("--epochs", type=int, default=None, help="passes (None: 1 on CPU, 10 on a GPU)")
    p.add_argument(
        "--train-samples",
        type=int,
        default=0,
        help="training images per pass (0: all 1,437, but on CPU "
        + ", ".join(f"{m} {n}" for m, n in CPU_BUDGET.items())
        + ")",
    )
    p.add_argument("--test-samples", type=int, default=0, help="test images (0: all 360)")
    p.add_argument("--warmup", type=int, default=2, help="updates left out of samples/s")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--worker", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the repeat's
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    info = machine()
    gpu = info["gpu"] is not None
    if args.quick:
        # On CPU, vit being the zoo's dearest per image: 3 updates of 8 (2 warm-up, 1 timed) and
        # 16 test images; on a GPU 48 training and 40 test images at batch 64.
        args.models, args.settings, args.repeats = "vit", "baseline,all", 1
        args.train_samples = args.train_samples or (48 if gpu else 24)
        args.test_samples = args.test_samples or (40 if gpu else 16)
        args.batch_size = args.batch_size or (64 if gpu else 8)
    args.batch_size = args.batch_size or (64 if gpu else 16)
    args.epochs = args.epochs or (10 if gpu else 1)
    args.budget = {} if gpu else CPU_BUDGET
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown or args.batch_size % 2:
        p.error(
            f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}"
            if unknown
            else "--batch-size must be even (accum splits it into 2 micro-batches)"
        )
    # On a GPU, "amp" is two rows (bf16 and fp16); on CPU, the rows that need a GPU are noted.
    settings = [
        t
        for s in args.settings.split(",")
        for t in (("amp-bf16", "amp-fp16") if s == "amp" and gpu else (s,))
    ]
    notes = (
        {"amp": "bf16 autocast", "all": "amp-bf16 + accum + pin + channels-last"}
        if gpu
        else {
            **NOT_ON_CPU,
            "amp": "bf16 autocast",
            "all": "amp (bf16) + accum + channels-last (pin: no effect)",
        }
    )
    models = args.models.split(",")
    print(
        f"techniques: {', '.join(models)} on digits (32x32), batch {args.batch_size}, "
        f"{args.epochs} epoch(s), {info['description']}; {args.repeats} repeat(s)",
        flush=True,
    )

    runs = {(m, s): [] for m in models for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for m in models:
                for s in settings if rep % 2 == 0 else reversed(settings):
                    if not gpu and s in NOT_ON_CPU:
                        continue
                    t0 = time.time()
                    r = run(m, s, rep, args, Path(tmp) / "result.json")
                    runs[m, s].append(r)
                    print(
                        f"  {m:>15} {s:>13} run {rep + 1}: {r['samples_per_sec']:8.1f} samples/s, "
                        f"peak +{r['peak_mib']:,.0f} MiB, "
                        f"test accuracy {100 * r['test_accuracy']:.1f}%, "
                        f"macro-F1 {r['test_macro_f1']:.3f} ({time.time() - t0:.0f} s)",
                        flush=True,
                    )
    rows = []
    for m in models:
        base = summarise(m, "baseline", runs.get((m, "baseline"), []), None, "")
        base = base if "samples_per_sec" in base else None
        rows += [summarise(m, s, runs[m, s], base, notes.get(s, "")) for s in settings]
    md = render(rows)
    print("\n" + md, flush=True)
    name = "techniques-quick" if args.quick else "techniques"
    budget = {m: args.train_samples or args.budget.get(m) or "all 1,437" for m in models}
    stem = write_results(
        args.out,
        name,
        {  # out/name, or out/name-gpu on a GPU machine
            "command": command_line("techniques.py", argv),
            "machine": info,
            "config": {
                k: v for k, v in vars(args).items() if k not in ("worker", "model", "result")
            },
            "train_samples": budget,
            "rows": rows,
        },
        f"Batch {args.batch_size} per update, {args.epochs} pass(es) over digits training images ("
        + ", ".join(f"{m}: {n}" for m, n in budget.items())
        + f"), {args.test_samples or 'all 360'} "
        "test images; samples/s ± 95% CI, peak memory added by training.\n\n" + md,
    )
    plot(rows, Path(f"{stem}.png"))


if __name__ == "__main__":
    main()
