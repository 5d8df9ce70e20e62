"""Build the patched Horovod into this Python's environment: ``python -m hvdsgd.build_horovod``.

Horovod 0.28.1, its last release, does not build against current torch. The patches and the
cached build are one bash script: ``scripts/build_horovod.sh`` in the source tree, shipped
inside the wheel as ``hvdsgd/build_horovod.sh`` (setup.py copies it there). This module finds
the script, checks the tools the build needs, and runs it for ``sys.executable`` with that
environment's ``bin`` first on PATH (where the script puts PyPI's cmake when there is none).
The exit status is the script's: 0 once ``horovodrun --check-build`` lists PyTorch and Gloo.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

from .errors import UsageError, exit_on_usage_error

SCRIPT = "build_horovod.sh"
COMPILERS = ("c++", "g++", "clang++")


def script_path() -> Path:
    """The build script: in the installed package, else in ``scripts/`` of a source checkout."""
    package = Path(__file__).resolve().parent
    for path in (package / SCRIPT, package.parent / "scripts" / SCRIPT):
        if path.is_file():
            return path
    raise UsageError(
        f"{SCRIPT} is missing from {package} (an incomplete install); reinstall "
        "hvdsgd with pip install --force-reinstall, or run scripts/build_horovod.sh "
        "from a source checkout"
    )


def build_env() -> dict[str, str]:
    """The environment for the script: this interpreter's ``bin`` first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", os.defpath)])
    return env


def check_tools(env: dict[str, str]) -> None:
    """Raise a UsageError naming the first tool the build needs that is not on PATH. cmake is
    not checked: the script installs PyPI's cmake into the environment when there is none."""
    cxx = env.get("CXX", "").split()[:1]  # CMake takes $CXX when it is set
    compiler = (
        f"the C++ compiler {cxx[0]} ($CXX)" if cxx else "a C++ compiler (c++, g++ or clang++)"
    )
    for what, names in (("bash", ["bash"]), ("make", ["make"]), (compiler, cxx or COMPILERS)):
        if not any(shutil.which(name, path=env["PATH"]) for name in names):
            raise UsageError(
                f"building Horovod needs {what}, and it is not on PATH; install it "
                "(Debian/Ubuntu: apt-get install bash make g++ cmake) and run "
                "python -m hvdsgd.build_horovod again"
            )


def build(python: str = sys.executable) -> int:
    """Run the script for ``python``; return its exit status (128 + N if killed by signal N).

    The script runs in its own process group, so Ctrl-C or SIGTERM stops the whole build
    (pip, cmake, the compilers), not just the shell."""
    env = build_env()
    check_tools(env)
    proc = subprocess.Popen(
        [shutil.which("bash", path=env["PATH"]), str(script_path()), python],
        env=env,
        start_new_session=True,
    )
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    return rc if rc >= 0 else 128 - rc


def parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m hvdsgd.build_horovod",
        allow_abbrev=False,
        description="Build Horovod 0.28.1, patched for current torch, and install it into this\n"
        "Python's environment. The wheel is cached: a second build takes seconds.\n\n"
        f"runs: bash {script_path()} {sys.executable}",
        epilog="environment:\n"
        "  HVDSGD_CACHE        cache root (default: ~/.cache/hvdsgd)\n"
        "  HVDSGD_HOROVOD_GPU  1 = NCCL GPU operations, 0 = CPU only (default: auto)\n"
        "  HVDSGD_BUILD_JOBS   parallel compile jobs (default: all cores)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


@exit_on_usage_error
def main(argv=None) -> int:
    parser().parse_args(argv)
    return build()


if __name__ == "__main__":
    sys.exit(main())
