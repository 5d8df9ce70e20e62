"""`pip install .` gives a working tool: the Horovod build ships in the package, the wheel and
sdist hold what they are built from, and the metadata pins the tested torch/torchvision pair.

Fast checks only (setup.py's own commands, no wheel build); the full install as a user does it
is measured in the README's install section.
"""

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from hvdsgd import build_horovod
from hvdsgd.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_horovod.sh"

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


def run(*args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, **kwargs
    )


@pytest.mark.e2e
def test_wheel_holds_the_horovod_build_script(tmp_path):
    """setup.py's build step (what a wheel is made from) copies scripts/build_horovod.sh into
    the package, byte for byte."""
    proc = run("setup.py", "-q", "build_py", "--build-lib", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    shipped = tmp_path / "hvdsgd" / "build_horovod.sh"
    assert shipped.read_bytes() == SCRIPT.read_bytes()
    assert (tmp_path / "hvdsgd" / "build_horovod.py").is_file()


@pytest.mark.e2e
def test_sdist_holds_what_the_wheel_is_built_from(tmp_path):
    """The sdist's file list (SOURCES.txt, from MANIFEST.in) has the CMake build of hvdsgd._C
    and the Horovod build script: a wheel built from the sdist needs both."""
    proc = run("setup.py", "-q", "egg_info", "--egg-base", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    sources = set((tmp_path / "hvdsgd.egg-info" / "SOURCES.txt").read_text().split())
    needed = {
        "CMakeLists.txt",
        "scripts/build_horovod.sh",
        "hvdsgd/build_horovod.py",
        *(f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir()),
    }
    assert needed <= sources, f"missing from the sdist: {sorted(needed - sources)}"


@pytest.mark.e2e
def test_help_names_the_script_it_runs():
    proc = run("-m", "hvdsgd.build_horovod", "--help", timeout=30)
    assert proc.returncode == 0, proc.stderr
    script = build_horovod.script_path()
    assert f"runs: bash {script} {sys.executable}" in proc.stdout
    assert script.read_bytes() == SCRIPT.read_bytes()


def fake_layout(root: Path, in_package: bool, in_scripts: bool) -> Path:
    """A package directory beside a scripts/ directory, each with or without the script."""
    (root / "hvdsgd").mkdir(parents=True)
    (root / "scripts").mkdir()
    for holds, folder in ((in_package, "hvdsgd"), (in_scripts, "scripts")):
        if holds:
            (root / folder / "build_horovod.sh").write_text(f"# {folder}\n")
    return root / "hvdsgd" / "build_horovod.py"


@pytest.mark.unit
@pytest.mark.parametrize(
    "in_package, in_scripts, found",
    [
        (True, True, "hvdsgd"),  # an installed wheel: its own copy, whatever lies beside it
        (False, True, "scripts"),  # a source checkout or an editable install
    ],
)
def test_script_is_found_installed_or_in_a_checkout(
    tmp_path, monkeypatch, in_package, in_scripts, found
):
    monkeypatch.setattr(
        build_horovod, "__file__", str(fake_layout(tmp_path, in_package, in_scripts))
    )
    assert build_horovod.script_path() == tmp_path / found / "build_horovod.sh"


@pytest.mark.unit
def test_missing_script_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(build_horovod, "__file__", str(fake_layout(tmp_path, False, False)))
    with pytest.raises(UsageError, match="build_horovod.sh is missing .* reinstall hvdsgd"):
        build_horovod.script_path()


@pytest.mark.unit
def test_build_runs_the_script_for_this_python_and_forwards_its_status(tmp_path, monkeypatch):
    """The script gets sys.executable, this environment's bin first on PATH, and its exit
    status is the build's."""
    script = tmp_path / "build_horovod.sh"
    seen = tmp_path / "seen"
    script.write_text(f'printf "%s\\n%s\\n" "$1" "$PATH" > {seen}\nexit 7\n')
    monkeypatch.setattr(build_horovod, "script_path", lambda: script)
    assert build_horovod.build() == 7
    python, path = seen.read_text().splitlines()
    assert python == sys.executable
    assert path.split(os.pathsep)[0] == sysconfig.get_path("scripts")


@pytest.mark.e2e
def test_sigterm_stops_the_whole_build(tmp_path):
    """SIGTERM to python -m hvdsgd.build_horovod stops the script's children too (a real build
    runs pip, cmake and the compilers under bash), with one line and exit 128 + 15."""
    script, pid_file = tmp_path / "build_horovod.sh", tmp_path / "child.pid"
    script.write_text(f"sleep 60 & echo $! > {pid_file}\nwait\n")
    code = (
        "import sys; from pathlib import Path; from hvdsgd import build_horovod as b; "
        f"b.script_path = lambda: Path({str(script)!r}); sys.exit(b.main([]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not (pid_file.is_file() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "the script never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 5
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(child), "the build script's child outlived SIGTERM"
        assert proc.stderr.read() == "hvdsgd: stopped by SIGTERM\n"
    finally:
        proc.kill()
        proc.wait()
        if pid_file.is_file() and pid_alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize(
    "tools, missing",
    [
        ((), "bash"),
        (("bash",), "make"),
        (("bash", "make"), r"a C\+\+ compiler \(c\+\+, g\+\+ or clang\+\+\)"),
    ],
)
def test_a_missing_tool_is_one_line(tmp_path, tools, missing):
    """Without bash, make or a C++ compiler on PATH: one line naming it, exit 2, no build."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    env = {**os.environ, "PATH": str(bin_dir), "CXX": ""}
    proc = run("-m", "hvdsgd.build_horovod", env=env, timeout=30)
    assert proc.returncode == 2
    assert re.fullmatch(
        f"hvdsgd: error: building Horovod needs {missing}, and it is not on "
        r"PATH; install it .*\n",
        proc.stderr,
    )


@pytest.mark.unit
def test_console_script_runs_the_build():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["hvdsgd-build-horovod"] == "hvdsgd.build_horovod:main"


def requirement_pins(lines) -> dict:
    """{name: version} of the ``name==version`` lines."""
    return dict(
        m.groups() for line in lines if (m := re.fullmatch(r"\s*([\w.-]+)==(\S+)\s*", line))
    )


@pytest.mark.unit
def test_metadata_pins_the_tested_torch_pair():
    """pip install . resolves the pair requirements.txt pins (and make setup tests), not the
    newest torch; requires-python agrees with the pins and with config.py's tomllib/tomli."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    pinned = requirement_pins(deps)
    tested = requirement_pins((ROOT / "requirements.txt").read_text().splitlines())
    assert {k: pinned.get(k) for k in ("torch", "torchvision")} == {
        k: tested[k] for k in ("torch", "torchvision")
    }
    assert project["requires-python"] == ">=3.10"  # torch 2.14.0's oldest CPython
    assert "tomli; python_version < '3.11'" in deps  # config.py's tomllib fallback
    assert "tensorboard" in deps  # --tensorboard
