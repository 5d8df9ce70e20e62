"""``python -m hvdsgd``: the entry points and launch lines, fast, without torch or Horovod."""

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import hvdsgd
from hvdsgd.__main__ import ENTRY_POINTS, LAUNCH


def hvdsgd_main(*args, python_flags=()):
    """``python [FLAGS] -m hvdsgd ARGS``; the CompletedProcess and its wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, *python_flags, "-m", "hvdsgd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    return proc, time.monotonic() - start


@pytest.mark.e2e
def test_lists_version_entry_points_and_launch_lines_without_torch():
    proc, seconds = hvdsgd_main(python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert (
        lines[0] == f"hvdsgd {hvdsgd.__version__}: parallel and distributed training with PyTorch"
    )
    for name, what in ENTRY_POINTS.items():  # one line each
        assert [line for line in lines if line.split()[:1] == [name]] == [f"  {name:<13}  {what}"]
    for command in [
        "horovodrun -np 4 python -m hvdsgd.train",
        "python -m hvdsgd.build_horovod",
        *LAUNCH,
    ]:
        assert sum(line.strip().startswith(command + " ") for line in lines) == 1, command
    imported = {
        line.split("|")[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "hvdsgd.__main__" in imported or "hvdsgd" in imported  # importtime did report
    heavy = sorted(m for m in imported if re.match(r"(torch|horovod)(\.|$)", m))
    assert heavy == [] and seconds < 5, (heavy, seconds)


@pytest.mark.unit
def test_every_entry_point_listed_runs_and_every_runnable_module_is_listed():
    runnable = {
        p.stem
        for p in (ROOT / "hvdsgd").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text() and p.stem != "__main__"
    }
    runnable |= {p.parent.name for p in (ROOT / "hvdsgd").glob("*/__main__.py")}
    assert set(ENTRY_POINTS) == runnable
    for name in ENTRY_POINTS:
        assert importlib.util.find_spec(f"hvdsgd.{name}") is not None, name
    for command in LAUNCH:  # every launch line runs a listed entry point
        assert re.search(r"python -m hvdsgd\.(\w+)", command).group(1) in ENTRY_POINTS, command


@pytest.mark.e2e
def test_version():
    proc, _ = hvdsgd_main("--version")
    assert proc.returncode == 0 and proc.stderr == ""
    assert re.fullmatch(
        rf"hvdsgd {re.escape(hvdsgd.__version__)} \(torch [^,]+, horovod [^)]+\)\n", proc.stdout
    ), proc.stdout


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, line",
    [
        (["--bogus"], "hvdsgd: error: unrecognized arguments: --bogus (see --help)"),
        (["train"], "hvdsgd: error: unrecognized arguments: train (see --help)"),
        (
            ["--vers"],
            "hvdsgd: error: unrecognized arguments: --vers (see --help)",
        ),  # no abbreviations
    ],
)
def test_unknown_arguments_are_one_line_and_exit_2(args, line):
    proc, _ = hvdsgd_main(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line + "\n")


@pytest.mark.e2e
def test_a_plain_process_reduces_metrics_without_importing_horovod():
    code = (
        "import sys, torch\n"
        "from hvdsgd.metrics import Tally\n"
        "t = Tally(2, torch.device('cpu'))\n"
        "t.add(torch.tensor(1.0), torch.eye(2), torch.tensor([0, 1]))\n"
        "assert t.reduce('m').accuracy == 1.0\n"
        "print('horovod' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
