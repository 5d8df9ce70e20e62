"""K-fold cross-validation in parallel: hvdsgd.kfold against serial folds and a joblib pool.

    python bench/kfold.py                 # 5-fold cnn on digits, 3 repeats; bench/results/kfold.*
    python bench/kfold.py --accum-steps 1 --batch-size 64   # whole folds only (ceiling 5/3)
    python bench/kfold.py --quick         # a reduced form, for the test suite

Per repeat, in this order (alternating between repeats):
- ``python -m hvdsgd.kfold --compare-serial``: the same folds serially in one process and
  then over ``--workers`` task processes, in one run (the speed-up, efficiency and the
  accuracy of both, fold by fold);
- a joblib process pool running one fold per job on the same model, folds, seeds and
  training code: the pattern of scikit-learn's ``cross_val_score(n_jobs=2)`` (loky workers,
  data pickled to them, one compute thread each; the pool is started cold every repeat, as a
  fresh script would).
Times are wall-clock seconds for all the folds, including starting the workers.
Targets: speed-up >= 1.8 with mean accuracy within 0.5 points; hvdsgd no slower than joblib.
Whole folds cannot reach it: 5 equal folds on 2 workers take at least 3 fold-times, a speed-up
of 5/3. A step of 2 micro-batches (``--batch-size 32 --accum-steps 2``, 64 samples a step) lets
hvdsgd split the fifth fold over both workers, bit for bit as serial (``hvdsgd.pair``); joblib
runs the same configuration, whole folds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, machine, mean_ci, parser, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_hvdsgd(args, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "hvdsgd.kfold",
        "--model",
        args.model,
        "--folds",
        str(args.folds),
        "--epochs",
        str(args.epochs),
        "--workers",
        str(args.workers),
        "--compare-serial",
        "--batch-size",
        str(args.batch_size),
        "--accum-steps",
        str(args.accum_steps),
        "--no-progress",
        "--overwrite",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"bench/kfold.py: {' '.join(cmd[2:])} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {
        "serial_s": s["serial"]["wall_time_s"],
        "parallel_s": s["wall_time_s"],
        "serial_accuracy": s["serial"]["test_accuracy"]["mean"],
        "parallel_accuracy": s["test_accuracy"]["mean"],
        "identical": s["identical_per_fold"],
        "cpu_serial": s["serial"]["cpu_util_mean"],
        "cpu_parallel": s["cpu_util_mean"],
    }


def joblib_fold(cfg: dict, fold: int, x, y, num_classes: int, tr, te, seed: int) -> dict:
    """One joblib job: what cross_val_score's _fit_and_score does, with hvdsgd's fit."""
    import torch

    from hvdsgd import models
    from hvdsgd.kfold import KFoldConfig
    from hvdsgd.strategies.local import fit

    torch.set_num_threads(1)
    torch.default_generator.manual_seed(seed)
    c = KFoldConfig(**cfg)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    model = models.build(c.model, tuple(x.shape[1:]), num_classes)
    return fit(c, model, (x[tr], y[tr]), (x[te], y[te]), num_classes, seed)


def run_joblib(args) -> dict:
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    from hvdsgd import kfold

    cfg = kfold.KFoldConfig(
        model=args.model,
        folds=args.folds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        accum_steps=args.accum_steps,
    )
    x, y, classes = kfold.pooled(cfg)
    folds = kfold.split(y.numpy(), cfg.folds, cfg.seed, classes)
    t = time.perf_counter()
    out = Parallel(n_jobs=args.workers)(
        delayed(joblib_fold)(cfg.to_dict(), k + 1, x, y, len(classes), tr, te, cfg.seed + k)
        for k, (tr, te) in enumerate(folds)
    )
    wall = time.perf_counter() - t
    get_reusable_executor().shutdown(wait=True)  # the next repeat starts cold, as a new script
    return {"joblib_s": wall, "joblib_accuracy": statistics.mean(r["test_accuracy"] for r in out)}


def main(argv=None) -> None:
    p = parser(__doc__, "mlp, 3 folds, 1 repeat")
    p.add_argument("--model", default="cnn", help="model of every fold")
    p.add_argument("--folds", type=int, default=5, help="folds")
    p.add_argument("--epochs", type=int, default=10, help="epochs per fold")
    p.add_argument("--workers", type=int, default=2, help="worker processes (hvdsgd and joblib)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per micro-batch")
    p.add_argument(
        "--accum-steps",
        type=int,
        default=2,
        help="micro-batches per step (>= 2: the uneven tail of folds is split)",
    )
    p.add_argument("--repeats", type=int, default=3, help="repeats, order alternating")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.folds, args.epochs, args.repeats = "mlp", 3, 2, 1
    info = machine(gpu=False)
    print(
        f"kfold: {args.folds}-fold {args.model} on digits, {args.epochs} epochs per fold, "
        f"{args.workers} workers on {info['cores']} cores; {args.repeats} repeats",
        flush=True,
    )
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            row = {}
            for kind in ("hvdsgd", "joblib") if rep % 2 == 0 else ("joblib", "hvdsgd"):
                row.update(
                    run_hvdsgd(args, Path(tmp) / f"kfold-{rep}")
                    if kind == "hvdsgd"
                    else run_joblib(args)
                )
            runs.append(row)
            print(
                f"  repeat {rep + 1}: serial {row['serial_s']:.2f} s, "
                f"hvdsgd {row['parallel_s']:.2f} s "
                f"(x{row['serial_s'] / row['parallel_s']:.2f}), joblib {row['joblib_s']:.2f} s; "
                f"accuracy {100 * row['serial_accuracy']:.2f} / "
                f"{100 * row['parallel_accuracy']:.2f} "
                f"/ {100 * row['joblib_accuracy']:.2f}%",
                flush=True,
            )
    agg = {k: mean_ci([r[k] or 0.0 for r in runs]) for k in runs[0] if k != "identical"}
    speedups = [r["serial_s"] / r["parallel_s"] for r in runs]
    vs_joblib = [r["joblib_s"] / r["parallel_s"] for r in runs]
    result = {
        "machine": info,
        "config": vars(args),
        "runs": runs,
        "speedup": mean_ci(speedups),
        "efficiency": statistics.mean(speedups) / args.workers,
        "joblib_over_hvdsgd": mean_ci(vs_joblib),
        "ceiling": args.folds / -(-args.folds // args.workers),  # whole folds
        "split_tail": args.accum_steps >= 2 and args.folds % args.workers != 0,
        "accuracy_gap_points": 100 * abs(agg["serial_accuracy"][0] - agg["parallel_accuracy"][0]),
        "identical_per_fold": all(r["identical"] for r in runs),
    }
    md = render(result, agg)
    print("\n" + md)
    result["command"] = command_line("kfold.py", argv)
    write_results(args.out, "kfold-quick" if args.quick else "kfold", result, md)


def render(r: dict, agg: dict) -> str:
    a = r["config"]

    def f(k: str, s: float = 1.0, d: int = 2) -> str:
        return f"{s * agg[k][0]:.{d}f} ± {s * agg[k][1]:.{d}f}"

    sp, vj = r["speedup"], r["joblib_over_hvdsgd"]
    lines = [
        f"| {a['folds']}-fold {a['model']}, {a['epochs']} epochs, {a['accum_steps']} x "
        f"{a['batch_size']} per step | wall time (s) | speed-up "
        "over serial | mean test accuracy (%) | mean CPU utilisation (%) |",
        "|---|---|---|---|---|",
        f"| serial (one process) | {f('serial_s')} | 1.00 | {f('serial_accuracy', 100)} "
        f"| {f('cpu_serial', 1, 0)} |",
        f"| hvdsgd.kfold, {a['workers']} workers | {f('parallel_s')} | {sp[0]:.2f} ± {sp[1]:.2f} "
        f"| {f('parallel_accuracy', 100)} | {f('cpu_parallel', 1, 0)} |",
        f"| joblib, {a['workers']} jobs (cross_val_score pattern) | {f('joblib_s')} "
        f"| {agg['serial_s'][0] / agg['joblib_s'][0]:.2f} | {f('joblib_accuracy', 100)} | |",
        "",
        f"Parallel efficiency {100 * r['efficiency']:.0f}% (ceiling for {a['folds']} whole folds "
        f"on {a['workers']} workers: speed-up {r['ceiling']:.2f}"
        + ("; hvdsgd split the last fold over two workers" if r["split_tail"] else "")
        + "); accuracy gap serial vs "
        f"parallel {r['accuracy_gap_points']:.2f} points, per-fold results identical: "
        f"{r['identical_per_fold']}; joblib / hvdsgd wall time {vj[0]:.2f} ± {vj[1]:.2f}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
