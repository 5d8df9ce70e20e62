"""Lottery tickets in parallel: ``python -m hvdsgd.lottery --compare-serial`` as a bench record.

    python bench/lottery.py            # cnn on digits, 4 sparsities x 3 reset steps, 2 workers
    python bench/lottery.py --quick    # a reduced form, for the test suite

One run of ``hvdsgd.lottery`` that trains the tickets both serially and over ``--workers``
processes (the dense run, Amdahl's serial fraction, is shared): test accuracy by sparsity and
reset step, the serial and parallel times, the speed-up and efficiency against Amdahl's law
for the measured serial fraction, and whether every ticket came out identical in both runs.
Writes ``bench/results/lottery.{json,md,png}`` (``--quick``: ``lottery-quick.*``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import command_line, machine, parser, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hvdsgd.lottery import table  # noqa: E402  (this checkout's hvdsgd: ROOT goes on sys.path first)


def render(s: dict) -> str:
    lines = [
        f"Dense `{s['model']}` on {s['dataset']}: {100 * s['dense']['test_accuracy']:.2f}% "
        f"test accuracy in {s['serial_phase_s']:.1f} s; {s['tasks']} tickets, "
        f"{s['rounds']} round(s) of {s['config']['epochs']} epoch(s) each.",
        "",
        table(s["sparsities"], s["reset_steps"], s["per_task"]),
    ]
    ser = s["serial"]
    lines += [
        "",
        "| run | tickets (s) | whole run (s) | speed-up | efficiency | Amdahl S(N) "
        "| mean CPU utilisation (%) |",
        "|---|---|---|---|---|---|---|",
        f"| serial | {ser['tickets_s']:.1f} | {ser['wall_time_s']:.1f} | 1.00 | | "
        f"| {ser['cpu_util_mean']:.0f} |",
        f"| {s['workers']} workers | {s['parallel_phase_s']:.1f} | {s['wall_time_s']:.1f} "
        f"| {s['speedup']:.2f} | {100 * s['efficiency']:.0f}% | {s['amdahl_speedup']:.2f} "
        f"| {s['cpu_util_mean']:.0f} |",
        "",
        f"Serial fraction f = {s['serial_fraction']:.3f}; Amdahl's S({s['workers']}) = "
        f"{s['amdahl_speedup']:.2f} ({s['amdahl_speedup_whole_tasks']:.2f} with "
        f"{s['tasks']} whole tasks); measured/Amdahl = "
        f"{s['speedup'] / s['amdahl_speedup']:.2f}; per-ticket results identical serial "
        f"vs parallel: {s['identical_per_task']}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__, "mlp, 2 x 2 tickets, 1 epoch")
    p.add_argument("--model", default="cnn", help="model")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95", help="comma-separated")
    p.add_argument("--reset-steps", default="0,20,100", help="comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="pruning rounds per ticket")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the dense run and each round")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.sparsities, args.reset_steps, args.rounds, args.epochs = (
            "mlp",
            "0.5,0.9",
            "0,10",
            1,
            1,
        )
    info = machine(gpu=False)
    print(
        f"lottery: {args.model} on digits, {args.workers} workers on {info['cores']} cores",
        flush=True,
    )
    name = "lottery-quick" if args.quick else "lottery"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "hvdsgd.lottery",
            "--compare-serial",
            "--no-progress",
            "--model",
            args.model,
            "--workers",
            str(args.workers),
            "--sparsities",
            args.sparsities,
            "--reset-steps",
            args.reset_steps,
            "--rounds",
            str(args.rounds),
            "--epochs",
            str(args.epochs),
            "--overwrite",
            "--out",
            tmp,
        ]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=1800,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if proc.returncode != 0:
            sys.exit(
                f"bench/lottery.py: hvdsgd.lottery failed:\n{(proc.stdout + proc.stderr)[-2000:]}"
            )
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        md = render(summary)
        print("\n" + md)
        stem = write_results(
            args.out,
            name,
            {
                "command": command_line("lottery.py", argv),
                "machine": info,
                "config": vars(args),
                "summary": summary,
            },
            md,
        )
        shutil.copy(Path(tmp) / "accuracy.png", stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
