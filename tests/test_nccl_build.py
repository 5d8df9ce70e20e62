"""Horovod's NCCL build, on a CPU host: it lists NCCL, and the same wheel trains over Gloo.

The wheel comes from ``HVDSGD_HOROVOD_GPU=1 HVDSGD_HOROVOD_INSTALL=0 scripts/build_horovod.sh``
(a CUDA toolkit and the CUDA torch suffice; no GPU), cached under hvdsgd's cache with its own
key. That build takes over 10 minutes, so these tests run only where the cached wheel exists and
skip elsewhere (a fresh CI machine) with the command that makes it. The wheel is installed into
a temporary folder put first on PYTHONPATH: the environment's own (CPU) Horovod is untouched.

Also here, needing no wheel: ``scripts/gpu_check.sh`` (the GPU machine's one script) parses, and
refuses a wrong argument in one line.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, horovodrun, summary_of

from hvdsgd.data import cache_dir

BUILD = ROOT / "scripts" / "build_horovod.sh"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
MAKE_IT = "HVDSGD_HOROVOD_GPU=1 HVDSGD_HOROVOD_INSTALL=0 scripts/build_horovod.sh"


def nccl_wheel():
    """The cached NCCL wheel built by this checkout's build script for this torch and Python
    (its cache key: Horovod version, patch level, torch, Python, CUDA), or None."""
    text = BUILD.read_text()
    version = re.search(r"^HOROVOD_VERSION=(\S+)", text, re.M).group(1)
    level = re.search(r"^PATCH_LEVEL=(\d+)", text, re.M).group(1)
    cuda = (torch.version.cuda or "").replace(".", "")
    if not cuda:
        return None
    py = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    key = f"horovod-{version}-p{level}-torch{torch.__version__.split('+')[0]}-{py}-nccl-cu{cuda}"
    return next(iter(sorted((cache_dir() / "wheels" / key).glob("horovod-*.whl"))), None)


@pytest.fixture(scope="module")
def nccl_env(tmp_path_factory):
    """An environment whose ``import horovod`` is the cached NCCL wheel's."""
    wheel = nccl_wheel()
    if wheel is None:
        pytest.skip(f"no cached Horovod NCCL wheel for this torch; make it with: {MAKE_IT}")
    site = tmp_path_factory.mktemp("nccl") / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile"]
        + ["--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    return {"PYTHONPATH": f"{site}:{ROOT}", "PATH": f"{site}/bin:{os.environ['PATH']}"}


def run_py(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **env},
    )


@pytest.mark.e2e
def test_the_nccl_build_lists_nccl_and_gloo(nccl_env):
    proc = run_py(
        "import horovod, horovod.torch as hvd; "
        "print(horovod.__file__, hvd.nccl_built(), hvd.gloo_built(), hvd.cuda_built())",
        nccl_env,
    )
    assert proc.returncode == 0, proc.stderr
    where, nccl, gloo, cuda = proc.stdout.split()
    assert where.startswith(nccl_env["PYTHONPATH"].split(":")[0])  # the wheel's, not the venv's
    assert int(nccl) >= 2000 and (gloo, cuda) == ("True", "True")  # NCCL's version code, 2.x
    check = subprocess.run(
        [f"{nccl_env['PATH'].split(':')[0]}/horovodrun", "--check-build"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **nccl_env},
    )
    assert check.returncode == 0, check.stderr
    ticked = set(re.findall(r"\[X\] (\w+)", check.stdout))
    assert {"PyTorch", "Gloo", "NCCL"} <= ticked, check.stdout


@pytest.mark.dist
def test_the_nccl_build_trains_on_cpu_over_gloo(nccl_env, tmp_path):
    """One wheel for both kinds of host: with no GPU, the sync test's run over Gloo."""
    proc = horovodrun(
        2,
        "-c",
        "import horovod.torch as hvd, runpy, sys; assert hvd.nccl_built(); "
        "sys.argv = ['hvdsgd.train'] + sys.argv[1:]; runpy.run_module('hvdsgd.train', "
        "run_name='__main__')",
        "--model",
        "mlp",
        "--epochs",
        "8",
        "--out",
        str(tmp_path),
        "--no-progress",
        env=nccl_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(tmp_path)
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.9


@pytest.mark.e2e
def test_gpu_check_dry_run_stops_at_the_first_gpu_step(nccl_env, tmp_path):
    """The GPU machine's script, here: Horovod from the packed NCCL wheel into its own site,
    hvdsgd._C, then one line at the first step that needs a GPU, and exit 0."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "HVDSGD_GPU_PACK": str(tmp_path / "pack"),
    }
    pack = subprocess.run(
        ["bash", str(GPU_CHECK), "pack"], capture_output=True, text=True, env=env, timeout=120
    )
    assert pack.returncode == 0, pack.stderr
    assert list((tmp_path / "pack" / "wheels").glob("*-nccl-*/horovod-*.whl"))
    proc = subprocess.run(
        ["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check: stopped at the first GPU-only step: no CUDA device"), last
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "reusing cached" in log and "[X] NCCL" in log
    assert re.search(r"nccl_built=[1-9]\d+, gloo_built=True", log), log
    assert "torch " in (tmp_path / "out" / "versions.txt").read_text()


@pytest.mark.unit
def test_gpu_check_parses_and_refuses_a_wrong_argument():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    proc = subprocess.run(["bash", str(GPU_CHECK), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: unknown argument '--bogus'; use one of: pack, versions, --dry-run, "
        "or nothing (the check)"
    ]
