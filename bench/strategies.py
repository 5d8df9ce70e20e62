"""Update strategies side by side: Horovod allreduce, the parameter-server policies, HOGWILD.

    python bench/strategies.py             # mlp on digits, 2 workers, 2 repeats
    python bench/strategies.py --quick     # a reduced form, for the test suite

One table on the same model, data, batch per worker, learning rate and number of workers:
``allreduce`` is ``horovodrun -np N --gloo python -m hvdsgd.train`` (synchronous ring-
allreduce); the others are ``python -m hvdsgd.train --strategy S --workers N`` on the shared
buffer. The synchronous two (allreduce, ``sync``) scale the learning rate by N, as the
linear-scaling rule says. Columns: samples/s, time to 97% test accuracy (allreduce: training
time summed over the epochs up to the first at 97%; the shared-buffer strategies: wall time
since the start signal, evaluated by the clock), final test accuracy and mean staleness
(updates that landed between a worker's read of the weights and its write; 0 when synchronous).
Writes ``bench/results/strategies[-quick].{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import command_line, horovodrun, machine, mean_ci, parser, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = ("allreduce", "sync", "async-apply", "async-deferred", "hogwild", "sharded")


def run(strategy: str, args, out: Path) -> dict:
    common = [
        "-m",
        "hvdsgd.train",
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        "64",
        "--lr",
        str(args.lr),
        "--momentum",
        "0.9",
        "--scheduler",
        "constant",
        "--warmup-epochs",
        "0",
        "--no-progress",
        "--no-plots",
        "--no-checkpoint",
        "--overwrite",
        "--out",
        str(out),
    ]
    if strategy == "allreduce":
        cmd = horovodrun(args.workers, *common)
    else:
        cmd = [
            sys.executable,
            *common,
            "--strategy",
            strategy,
            "--workers",
            str(args.workers),
            "--eval-interval",
            "0.01",
        ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    if proc.returncode != 0:
        sys.exit(
            f"bench/strategies.py: {strategy} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        )
    s = json.loads((out / "summary.json").read_text())
    if strategy == "allreduce":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        elapsed, reached = 0.0, None
        for r in rows:
            elapsed += r["epoch_time_s"]
            if reached is None and r["test_accuracy"] >= 0.97:
                reached = elapsed
        staleness = 0.0
    else:
        reached, staleness = s["time_to_accuracy_s"]["0.97"], s["staleness_mean"]
    return {
        "samples_per_sec": s["samples_per_sec"],
        "test_accuracy": s["test_accuracy"],
        "time_to_97_s": reached,
        "staleness_mean": staleness,
    }


def aggregate(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = mean_ci(vals) if vals else None
        out[key + "_reached"] = f"{len(vals)}/{len(runs)}"
    return out


def render(rows: list[dict], args) -> str:
    def cell(v, scale=1.0, digits=0):
        return (
            "not reached"
            if v is None
            else f"{scale * v[0]:,.{digits}f} ± {scale * v[1]:,.{digits}f}"
        )

    lines = [
        f"| strategy ({args.workers} workers, {args.model}) | samples/s | time to 97% (s) "
        "| final test accuracy (%) | mean staleness |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {cell(r['samples_per_sec'])} "
            f"| {cell(r['time_to_97_s'], digits=2)} ({r['time_to_97_s_reached']} runs) "
            f"| {cell(r['test_accuracy'], 100, 2)} | {cell(r['staleness_mean'], digits=2)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__, "3 epochs, 1 repeat")
    p.add_argument("--model", default="mlp", help="model")
    p.add_argument("--workers", type=int, default=2, help="ranks / worker processes")
    p.add_argument("--epochs", type=int, default=30, help="epochs")
    p.add_argument("--lr", type=float, default=0.05, help="base learning rate per worker")
    p.add_argument("--repeats", type=int, default=2, help="repeats, order alternating")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats = 3, 1
    names = args.strategies.split(",")
    info = machine(gpu=False)
    print(
        f"strategies: {args.model} on digits, {args.workers} workers on {info['cores']} cores, "
        f"{args.epochs} epochs, {args.repeats} repeats",
        flush=True,
    )
    runs = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for n in names if rep % 2 == 0 else reversed(names):
                r = run(n, args, Path(tmp) / f"{n}-{rep}")
                runs[n].append(r)
                print(
                    f"  {n:>15}: {r['samples_per_sec']:>10,.0f} samples/s, "
                    f"{100 * r['test_accuracy']:.2f}%, 97% at {r['time_to_97_s']}",
                    flush=True,
                )
    rows = [{"strategy": n, **aggregate(runs[n]), "runs": runs[n]} for n in names]
    md = render(rows, args)
    print("\n" + md)
    write_results(
        args.out,
        "strategies-quick" if args.quick else "strategies",
        {
            "command": command_line("strategies.py", argv),
            "machine": info,
            "config": vars(args),
            "rows": rows,
        },
        md,
    )


if __name__ == "__main__":
    main()
