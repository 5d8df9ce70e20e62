"""Training techniques on and off: AMP, gradient accumulation, pinned memory, channels-last.

    python bench/techniques.py           # 3 models x 4 settings x 2 seeds on CPU, to >= 90% first
    python bench/techniques.py --quick   # vit_tiny, baseline and all, a tiny budget, for the tests
    python bench/techniques.py --models vit_tiny --settings baseline,amp --repeats 3

Settings: ``baseline`` (fp32, NCHW, pageable memory); ``amp`` (bf16 autocast; on a GPU also
``amp-fp16`` with loss scaling); ``accum`` (2 micro-batches of half the batch per update: the
same samples per update, half the activations at a time); ``pin`` (page-locked batches copied
asynchronously; on a GPU the data stays on the host behind 2 loader workers in every setting;
on CPU nothing is copied: noted, not run); ``channels-last`` (NHWC batches); ``all`` (all four,
bf16; by default on a GPU only, see ``DEFAULT_SETTINGS``). Each (model, setting, seed) is a
fresh process training with hvdsgd's own code (``Batches``, ``engine.train_step``, the
``Allreduce`` updater at one rank, as plain ``python -m hvdsgd.train``) on the model's budget
(``CPU_BUDGETS``, ``GPU_BUDGETS``): epochs over the 1,437 digits training images at 32x32,
batch, optimiser and peak rate, a linear warm-up from near 0, then cosine to 0; same initial
weights and order in every setting of a seed. The budget is the cheapest found in which the
baseline passes 90% test accuracy on the 360 test images, so that the accuracy column says
whether a technique keeps it: each setting's mean over the seeds is compared with the
baseline's, and a loss of more than 1 point is marked. On CPU the paper's models run as
CPU-sized variants, named as such (ResNet-50's depth at an eighth of its width,
EfficientNet-B0's blocks at half width, a 4-layer ViT); a GPU runs them at full size. On CPU
the seeds of a setting run at once, one per core with one compute thread each (``--jobs``), so
samples/s is a one-core figure; a GPU runs one process at a time. Samples/s leaves out
``--warmup`` updates. Peak memory is what training adds: on CPU the peak RSS (VmHWM, reset just
before) less the RSS before; on a GPU ``max_memory_allocated`` less the allocated before.

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from common import command_line, machine, mean_ci, mean_spread, parser, save_figure, write_results

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
# The settings each model runs by default: the techniques one by one, and on a GPU also all of
# them at once. On CPU "all" is left out (--settings ...,all adds it): make bench's 30 minutes on
# 2 cores have no room for its 6 runs (85 s), and pin, half of it, does nothing there.
DEFAULT_SETTINGS = {
    "cpu": "baseline,amp,accum,pin,channels-last",
    "gpu": "baseline,amp,accum,pin,channels-last,all",
}


@dataclass(frozen=True)
class Budget:
    """How one model trains in every setting; its baseline must pass 90% on digits."""

    epochs: int  # passes over the 1,437 digits training images
    batch_size: int  # samples per update (accum: 2 micro-batches of half)
    optimizer: str  # sgd (momentum 0.9) or adamw (betas 0.9, 0.999)
    lr: float  # peak learning rate
    warmup_steps: int  # updates of linear warm-up from near 0 to the peak, then cosine to 0
    why: str  # how the budget was found (the results file shows it)


# Found on 2 cores with one seed (accuracy at the end of a run; "k of n epochs": after epoch k of
# an n-epoch cosine run): the cheapest budgets in which each baseline passed 90%.
CPU_BUDGETS = {
    "resnet50_narrow": Budget(
        3,
        16,
        "sgd",
        0.1,
        20,
        "Found: 94.2% in 3 epochs, 83.6% after 2 of 3; before its residual branches started at "
        "0, lr 0.05 reached 16.4% in 3 epochs.",
    ),
    "efficientnet_b0_narrow": Budget(
        2,
        16,
        "adamw",
        2e-3,
        40,
        "Found: 93.6% after 2 of 3 epochs; full-width B0 (with stochastic depth) reached 54.2% in "
        "2 epochs at AdamW 1e-3, at half the speed.",
    ),
    "vit_tiny": Budget(
        6,
        16,
        "adamw",
        1e-3,
        40,
        "Found: 92.8% after 6 of 8 epochs; in 4x4 patches (64 tokens) it reached 51.7% after 4 "
        "of 4 epochs, at half the speed.",
    ),
}
# The paper's models at full size on a GPU: 10 epochs at batch 64 (230 updates); not yet run on
# a GPU: the record will say whether each baseline passes 90%.
GPU_BUDGETS = {
    "resnet50": Budget(10, 64, "sgd", 0.05, 50, "resnet50_narrow's optimiser at half its rate."),
    "efficientnet_b0": Budget(10, 64, "adamw", 2e-3, 50, "efficientnet_b0_narrow's optimiser."),
    "vit": Budget(10, 64, "adamw", 1e-3, 50, "vit_tiny's optimiser."),
}
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

    from hvdsgd import data, dist, models, schedule
    from hvdsgd.config import TrainConfig
    from hvdsgd.engine import evaluate, grouped, seed, train_step
    from hvdsgd.metrics import Tally
    from hvdsgd.strategies.allreduce import Allreduce

    device = dist.init("auto", threads=args.threads)  # 0: all cores (`python -m hvdsgd.train`)
    cuda = device.type == "cuda"
    on = SETTINGS[args.worker]
    accum = on.get("accum_steps", 1)
    cfg = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size // accum,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=0.9,
        scheduler="cosine",
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
    steps_per_epoch = -(-len(batches) // accum)
    updater = Allreduce(cfg, model, device, steps_per_epoch=steps_per_epoch)
    # hvdsgd's warm-up runs from the base rate to the peak of N ranks (Goyal et al.), so none at
    # one rank; the budget's starts near 0 (deep models diverge at a peak rate from the first
    # update), then cosine to 0 over the budget's updates.
    updater.scheduler = torch.optim.lr_scheduler.LambdaLR(
        updater.optimizer,
        schedule.multiplier(
            "warm", args.epochs * steps_per_epoch, args.lr_warmup, 1 / max(1, args.lr_warmup)
        ),
    )
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


def start(model: str, setting: str, rep: int, budget: Budget, args, result: Path, threads: int):
    """A fresh process for (model, setting, seed ``rep``) on ``budget`` with ``threads`` compute
    threads (0: every core), writing its figures to ``result``."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        setting,
        "--model",
        model,
        "--batch-size",
        str(budget.batch_size),
        "--lr",
        str(budget.lr),
        "--optimizer",
        budget.optimizer,
        "--epochs",
        str(budget.epochs),
        "--lr-warmup",
        str(budget.warmup_steps),
        "--train-samples",
        str(args.train_samples),
        "--test-samples",
        str(args.test_samples),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(rep),
        "--result",
        str(result),
        "--threads",
        str(threads),
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, model: str, setting: str, result: Path, args) -> dict:
    """The figures of a run that ``start`` began, or exit with its output's tail."""
    try:
        out, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        sys.exit(f"bench/techniques.py: {model} / {setting} ran past --timeout {args.timeout} s")
    if proc.returncode != 0:
        sys.exit(
            f"bench/techniques.py: {model} / {setting} failed (exit {proc.returncode}):\n"
            + out[-3000:]
        )
    return json.loads(result.read_text())


LOSS_POINTS = 1.0  # a setting whose mean test accuracy is this many points below the baseline's


def summarise(model: str, setting: str, runs: list[dict], base: dict | None, note: str) -> dict:
    """Means over the seeds (± 95% CI for samples/s, ± spread for accuracy), the ratios to the
    model's baseline and the accuracy against it (``loses_accuracy``: more than 1 point)."""
    row = {"model": model, "setting": setting, "note": note, "runs": runs}
    if not runs:
        return row
    sps, ci = mean_ci([r["samples_per_sec"] for r in runs])
    avg = {
        k: sum(r[k] for r in runs) / len(runs)
        for k in ("peak_mib", "process_peak_mib", "test_accuracy", "test_macro_f1")
    }
    _, acc_spread = mean_spread([r["test_accuracy"] for r in runs])
    row.update(samples_per_sec=sps, samples_per_sec_ci95=ci, test_accuracy_spread=acc_spread, **avg)
    if base is not None:
        row["speed_ratio"] = sps / base["samples_per_sec"]
        row["memory_ratio"] = avg["peak_mib"] / base["peak_mib"]
        row["accuracy_points"] = 100 * (avg["test_accuracy"] - base["test_accuracy"])
        row["loses_accuracy"] = row["accuracy_points"] < -LOSS_POINTS
    return row


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "—"


def _points(row: dict) -> str:
    """The accuracy against the baseline, in points; bold with ▼ past LOSS_POINTS."""
    if "accuracy_points" not in row or row["setting"] == "baseline":
        return "—"
    text = f"{row['accuracy_points']:+.1f}"
    return f"**{text} ▼**" if row["loses_accuracy"] else text


def render(rows: list[dict]) -> str:
    lines = [
        "| model | setting | samples/s | × baseline | peak memory (MiB) | × baseline "
        "| test accuracy (%) | vs baseline (points) | macro-F1 | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "samples_per_sec" not in r:
            lines.append(f"| {r['model']} | {r['setting']} |" + " — |" * 7 + f" {r['note']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['samples_per_sec']:,.1f} ± "
            f"{r['samples_per_sec_ci95']:,.1f} | {_ratio(r, 'speed_ratio')} | {r['peak_mib']:,.0f} "
            f"| {_ratio(r, 'memory_ratio')} | {100 * r['test_accuracy']:.1f} ± "
            f"{100 * r['test_accuracy_spread']:.1f} | {_points(r)} "
            f"| {r['test_macro_f1']:.3f} | {r['note']} |"
        )
    return "\n".join(lines)


def budget_lines(budgets: dict[str, Budget], rows: list[dict]) -> str:
    """One line per model: its budget, why, and whether its baseline passed 90%."""
    base = {r["model"]: r.get("test_accuracy") for r in rows if r["setting"] == "baseline"}
    lines = []
    for m, b in budgets.items():
        acc = base.get(m)
        verdict = (
            ""
            if acc is None
            else f"; baseline {100 * acc:.1f}%" + ("" if acc >= 0.9 else " (**below 90%**)")
        )
        lines.append(
            f"- {m}: {b.epochs} epoch(s) at batch {b.batch_size}, {b.optimizer} at peak lr "
            f"{b.lr:g} ({b.warmup_steps} warm-up updates, then cosine){verdict}. {b.why}"
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


def run_seeds(model: str, setting: str, seeds: list[int], budget: Budget, args, tmp: Path):
    """(model, setting) for each seed at once, one compute thread each when more than one; their
    figures in seed order."""
    t0 = time.time()
    threads = 1 if len(seeds) > 1 else 0
    procs = [
        (rep, start(model, setting, rep, budget, args, tmp / f"{rep}.json", threads))
        for rep in seeds
    ]
    out = []
    try:
        for rep, proc in procs:
            r = finish(proc, model, setting, tmp / f"{rep}.json", args)
            out.append(r)
            print(
                f"  {model:>22} {setting:>13} seed {rep}: {r['samples_per_sec']:8.1f} samples/s, "
                f"peak +{r['peak_mib']:,.0f} MiB, test accuracy {100 * r['test_accuracy']:.1f}% "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    finally:
        for _, proc in procs:  # none outlives a failed one
            proc.kill()
    return out


def run_all(models: list[str], settings: list[str], budgets: dict, args, gpu: bool) -> dict:
    """(model, setting) -> its runs, one per seed: --jobs seeds at once, settings in alternating
    order from one batch of seeds to the next."""
    runs = {(m, s): [] for m in models for s in settings}
    seeds = list(range(args.repeats))
    batches = [seeds[i : i + args.jobs] for i in range(0, len(seeds), args.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        for b, batch in enumerate(batches):
            for m in models:
                for s in settings if b % 2 == 0 else reversed(settings):
                    if gpu or s not in NOT_ON_CPU:
                        runs[m, s] += run_seeds(m, s, batch, budgets[m], args, Path(tmp))
    return runs


def budgets_for(args, gpu: bool, p: argparse.ArgumentParser) -> dict[str, Budget]:
    """model -> its budget: the device's table, then what the command line overrides; --quick is
    a tiny budget that only checks the plumbing."""
    table = GPU_BUDGETS if gpu else CPU_BUDGETS
    if args.quick:  # 3 updates of 8 on CPU (2 warm-up, 1 timed); 1 timed update of 64 on a GPU
        table = {("vit" if gpu else "vit_tiny"): Budget(1, 64 if gpu else 8, "adamw", 1e-3, 1, "")}
    names = args.models.split(",") if args.models else list(table)
    from hvdsgd import models as zoo

    unknown = [m for m in names if m not in zoo.NAMES]
    if unknown:
        p.error(f"unknown --models {unknown}; choose from {', '.join(zoo.NAMES)}")
    default = next(iter(table.values()))  # a model outside the table trains as the first one
    given = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "warmup_steps": args.lr_warmup,
    }
    over = {k: v for k, v in given.items() if v is not None}
    bad = [k for k in ("epochs", "batch_size", "lr") if over.get(k, 1) <= 0]
    if bad:
        p.error(f"--{bad[0].replace('_', '-')} must be positive")
    if over.get("warmup_steps", 0) < 0:
        p.error("--lr-warmup must be 0 or more")
    if over.get("batch_size", 2) % 2:
        p.error("--batch-size must be even (accum splits it into 2 micro-batches)")
    out = {}
    for m in names:  # an overridden or borrowed budget was not found for m: no "why"
        why = {"why": ""} if over or m not in table else {}
        out[m] = replace(table.get(m, default), **over, **why)
    return out


def main(argv=None) -> None:
    p = parser(
        __doc__,
        "vit_tiny (a GPU: vit), baseline and all, 1 seed; on CPU 24 training images at batch 8 "
        "and 16 test images (on a GPU 48 and 40 at batch 64)",
    )
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated (None: "
        + ", ".join(CPU_BUDGETS)
        + " on CPU; "
        + ", ".join(GPU_BUDGETS)
        + " on a GPU)",
    )
    p.add_argument(
        "--settings",
        default=None,
        help=f"comma-separated, of: {', '.join(SETTINGS)} (None: {DEFAULT_SETTINGS['cpu']} on "
        f"CPU, {DEFAULT_SETTINGS['gpu']} on a GPU)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="seeds of each (model, setting): seed = repeat, order alternating",
    )
    p.add_argument("--epochs", type=int, default=None, help="override every model's budget")
    p.add_argument("--batch-size", type=int, default=None, help="override: samples per update")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adamw"), help="override")
    p.add_argument("--lr", type=float, default=None, help="override: peak learning rate")
    p.add_argument("--lr-warmup", type=int, default=None, help="override: warm-up updates")
    p.add_argument(
        "--train-samples", type=int, default=0, help="training images per pass (0: all 1,437)"
    )
    p.add_argument("--test-samples", type=int, default=0, help="test images (0: all 360)")
    p.add_argument("--warmup", type=int, default=2, help="updates left out of samples/s")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="seeds run at once, one compute thread each (None: one per core, up to --repeats, "
        "on CPU; 1 on a GPU)",
    )
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--worker", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # the worker's
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the repeat's
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    info = machine()
    gpu = info["gpu"] is not None
    args.settings = args.settings or DEFAULT_SETTINGS["gpu" if gpu else "cpu"]
    if args.quick:
        args.settings, args.repeats = "baseline,all", 1
        args.train_samples = args.train_samples or (48 if gpu else 24)
        args.test_samples = args.test_samples or (40 if gpu else 16)
    budgets = budgets_for(args, gpu, p)
    if args.jobs is None:
        args.jobs = 1 if gpu else max(1, min(info["cores"], args.repeats))
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
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
    models = list(budgets)
    print(
        f"techniques: {', '.join(models)} on digits (32x32), {info['description']}; "
        f"{args.repeats} seed(s)",
        flush=True,
    )

    runs = run_all(models, settings, budgets, args, gpu)
    rows = []
    for m in models:
        base = summarise(m, "baseline", runs.get((m, "baseline"), []), None, "")
        base = base if "samples_per_sec" in base else None
        rows += [summarise(m, s, runs[m, s], base, notes.get(s, "")) for s in settings]
    md = render(rows)
    print("\n" + md, flush=True)
    name = "techniques-quick" if args.quick else "techniques"
    samples = args.train_samples or "all 1,437"
    stem = write_results(
        args.out,
        name,
        {  # out/name, or out/name-gpu on a GPU machine
            "command": command_line("techniques.py", argv),
            "machine": info,
            "config": {
                k: v for k, v in vars(args).items() if k not in ("worker", "model", "result")
            },
            "budgets": {m: asdict(b) for m, b in budgets.items()},
            "rows": rows,
        },
        "Each model's budget ("
        + (
            "the cheapest found in which its baseline passes 90%"
            if all(b.why for b in budgets.values())
            else "as the command line sets it"
        )
        + f"), over "
        f"{samples} digits training images; {args.test_samples or 'all 360'} test images; "
        f"{args.repeats} seed(s) of every setting:\n\n"
        + budget_lines(budgets, rows)
        + "\n\nSamples/s ± 95% CI; peak memory added by training; test accuracy mean ± spread "
        f"(1.96 standard deviations) over the seeds, and against the baseline's mean: "
        f"**▼** marks a loss of more than {LOSS_POINTS:g} point.\n\n" + md,
    )
    plot(rows, Path(f"{stem}.png"))


if __name__ == "__main__":
    main()
