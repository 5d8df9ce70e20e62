"""What every bench script reports with: mean ± spread, the machine, and the results files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START = time.monotonic()  # every bench script imports this module first: its run starts here


def mean_spread(xs: list[float]) -> tuple[float, float]:
    """Mean and 1.96 x standard deviation: where single runs fall."""
    return statistics.mean(xs), 1.96 * (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (1.96 x standard error)."""
    m = statistics.mean(xs)
    return m, (1.96 * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)


def parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """A bench script's argparse: the docstring's first paragraph, defaults shown in help,
    ``--quick`` (the reduced form, described by ``quick``) and ``--out`` (the results folder)."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"a reduced form: {quick}")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    return p


def horovodrun(np_: int, *args: str) -> list[str]:
    """``horovodrun -np N -H localhost:N --gloo PYTHON ARGS``: N ranks of this Python on this
    host over Gloo (the launcher next to this interpreter, else the one on PATH)."""
    exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    return [exe, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *args]


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write and close a matplotlib figure (every bench plot ends this way)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def machine(gpu: bool = True) -> dict:
    """Cores this process may use, the CPU and the first CUDA GPU (None without one, or when
    ``gpu`` is False: a script's CPU form), with a one-line description."""
    cores = len(os.sched_getaffinity(0))
    name = None
    if gpu:
        try:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a broken driver is "no GPU" for the record
            name = None
    return {
        "cores": cores,
        "cpu": platform.processor() or platform.machine(),
        "gpu": name,
        "description": f"{cores} cores ({platform.machine()}), " + (name or "no GPU"),
    }


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces this run, as the README shows it."""
    return " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])


def took(seconds: float) -> str:
    """A duration as the README writes it: ``42 s``, ``3 min 05 s``."""
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def write_results(out: str | Path, name: str, results: dict, md: str) -> Path:
    """``out/name.json`` (``results``, which must hold ``command`` and ``machine``, plus
    ``elapsed_s``: the script's run time so far) and ``out/name.md`` (a line with the command,
    the machine and the run time, then ``md``); a run on a GPU
    machine is ``name-gpu``, so that it stands beside the CPU record instead of replacing it.
    Returns ``out/name`` (without suffix), for the script's plot. The README's Results section
    is generated from the ``.md`` files (``python bench/readme.py``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if results["machine"].get("gpu"):
        name += "-gpu"
    results = {**results, "elapsed_s": round(time.monotonic() - START, 1)}
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{name}.md").write_text(
        f"`{results['command']}` on {results['machine']['description']}, "
        f"in {took(results['elapsed_s'])}\n\n{md.strip()}\n"
    )
    return out / name
