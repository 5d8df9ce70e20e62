"""Shared test helpers, fixtures, and the tier check (every test carries exactly one tier marker).

Test modules import the helpers as ``from conftest import NAME``, never from another test
module: pytest's default import mode puts tests/ on sys.path (it holds no __init__.py), which
also makes tests/fake_nvml.py importable; nothing here or in a test module edits sys.path."""

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")

# ------------------------------------------------------------------------------ tiers

# Registered in pyproject.toml; `make test-fast` runs `-m unit`, `make test` every tier.
TIERS = ("unit", "e2e", "dist", "multihost", "bench", "gpu")


# The files that take longest (seconds under `make test`'s 2 xdist workers on 2 cores, session 5),
# collected first: a long file started last leaves one worker idle while the other finishes it.
LONGEST_FIRST = (
    "test_bench.py",  # 330: make bench-quick, one test per script (SPLIT_FILES)
    "test_distributed.py",  # 284
    "test_hogwild.py",  # 138
    "test_elastic.py",  # 122
    "test_run_lifecycle.py",  # 114
    "test_task_faults.py",  # 107
    "test_nccl_build.py",  # 69 (where the NCCL wheel is cached; skipped in CI)
    "test_tasks.py",  # 53
    "test_multihost.py",  # 48
    "test_hogwild_run.py",  # 47
    "test_rendezvous.py",  # 42
    "test_lottery.py",  # 42
    "test_profiler.py",  # 34
)
# Files whose tests are independent runs (no module-scoped run shared between them): each test is
# its own unit of xdist work, so that both workers share them.
SPLIT_FILES = ("test_bench.py",)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (a file's tests on one worker: its module-scoped runs are made once) in
    collection order, which puts LONGEST_FIRST first; stock xdist orders files by their number
    of tests, which here started the 5-minute test_bench.py last. SPLIT_FILES go test by test."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            config.option.loadscopereorder = False  # keep the collection order

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if Path(path).name in SPLIT_FILES else path

    return LongestFirst(config, log)


@pytest.hookimpl(tryfirst=True)  # before -m and -k deselect: `-m unit` checks every test too
def pytest_collection_modifyitems(config, items):
    """Stop the run before any test when a test has no tier marker or more than one; then put
    the longest files first."""
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) == 1:
            continue
        wrong.append(f"  {item.nodeid}: {' + '.join(tiers) or 'no tier'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) need exactly one tier marker of {', '.join(TIERS)}: "
            "set pytestmark = pytest.mark.TIER in the module, or mark each test\n"
            + "\n".join(wrong)
        )
    last = len(LONGEST_FIRST)  # the longest files first; a stable sort keeps each file's order
    items.sort(
        key=lambda it: LONGEST_FIRST.index(it.path.name) if it.path.name in LONGEST_FIRST else last
    )


TIER_TIMES: dict = {}  # tier -> [tests, seconds of setup + call + teardown]


def pytest_runtest_logreport(report):
    tier = next((t for t in TIERS if t in report.keywords), None)
    if tier is not None:
        tests, seconds = TIER_TIMES.get(tier, (0, 0.0))
        TIER_TIMES[tier] = (tests + (report.when == "call"), seconds + report.duration)


def pytest_terminal_summary(terminalreporter):
    """One line of time per tier (the README's Tests table comes from it)."""
    if TIER_TIMES:
        terminalreporter.write_line(
            "tier times: "
            + ", ".join(
                f"{t} {TIER_TIMES[t][0]} tests {TIER_TIMES[t][1]:.1f} s"
                for t in TIERS
                if t in TIER_TIMES
            )
        )


# ----------------------------------------------------------------------------- data sets


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path) -> Path:
    """A small MNIST under ``root/MNIST/raw`` in the original idx format: 60 train / 20 test
    images of 28x28; returns ``root`` (the --data-dir)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


@pytest.fixture
def mnist_dir(tmp_path):
    """A small MNIST in the original idx format: 60 train / 20 test images of 28x28."""
    return write_mnist(tmp_path)


@pytest.fixture
def cifar10_dir(tmp_path):
    """A small CIFAR-10 in the original python-pickle batches: 5 x 10 train, 10 test."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (10, 3072)).astype(np.uint8),
            "labels": list(range(10)),
            "batch_label": name,
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(
            {
                "label_names": [
                    "airplane",
                    "automobile",
                    "bird",
                    "cat",
                    "deer",
                    "dog",
                    "frog",
                    "horse",
                    "ship",
                    "truck",
                ]
            },
            fh,
        )
    return tmp_path


def horovodrun(np_, *args, timeout=240, cwd=None, env=None):
    """Run `horovodrun -np N -H localhost:N --gloo python ARGS` and return the CompletedProcess."""
    exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    cmd = [exe, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=full_env
    )
    if proc.returncode != 0:
        # Shown under "Captured stdout" when the test fails: the first lines that say what went
        # wrong (an assertion message shows only a tail, where the root cause rarely is).
        key = [
            line
            for line in (proc.stdout + proc.stderr).splitlines()
            if re.search(r"error|exception|timed? ?out|terminated|signal|abort", line, re.I)
        ]
        print(
            f"horovodrun -np {np_} exited {proc.returncode}; first lines naming an error:",
            *key[:40],
            sep="\n",
        )
    return proc


@pytest.fixture(autouse=True)
def _gpu_gate(request):
    """`gpu` tests skip without a CUDA GPU, and fail instead when HVDSGD_TEST_GPU=1."""
    if request.node.get_closest_marker("gpu") is None:
        return
    import torch

    if not torch.cuda.is_available():
        if os.environ.get("HVDSGD_TEST_GPU") == "1":
            pytest.fail("HVDSGD_TEST_GPU=1 but no CUDA GPU is visible")
        pytest.skip("needs an NVIDIA GPU (HVDSGD_TEST_GPU=1 makes this a failure)")


# ------------------------------------------------------- plain-process training runs


def train_cmd(out, *args) -> list[str]:
    """``python -m hvdsgd.train --model mlp --out OUT --no-progress --eval-interval 0.5 ARGS``."""
    return [
        sys.executable,
        "-m",
        "hvdsgd.train",
        "--model",
        "mlp",
        "--out",
        str(out),
        "--no-progress",
        "--eval-interval",
        "0.5",
        *args,
    ]


def run_module(*argv, timeout=240) -> subprocess.CompletedProcess:
    """``python ARGV...`` (e.g. ``-m hvdsgd.kfold ...``) in one plain process from the repository
    root, to its end; text stdout and stderr."""
    return subprocess.run(
        [sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def run_train(out, *args, timeout=240) -> subprocess.CompletedProcess:
    """:func:`train_cmd` run to its end in one plain process; text stdout and stderr."""
    return subprocess.run(
        train_cmd(out, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def summary_of(out) -> dict:
    """The run directory's summary.json."""
    return json.loads((Path(out) / "summary.json").read_text())


def shm_segments(pid: int) -> list[str]:
    """Shared-memory segments of the run whose parent is ``pid`` still named in /dev/shm."""
    return sorted(p.name for p in SHM.glob(f"hvdsgd-{pid}-*"))


def workers_of(pid: int, n: int, timeout=60.0) -> list:
    """The ``n`` shared-buffer worker processes (multiprocessing spawn children) of ``pid``,
    once all have started; AssertionError after ``timeout`` seconds."""

    def is_worker(c) -> bool:
        try:
            return any("spawn_main" in part for part in c.cmdline())
        except psutil.Error:  # a short-lived child already gone (or a zombie not yet reaped)
            return False

    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = [c for c in psutil.Process(pid).children() if is_worker(c)]
        if len(kids) == n:
            return kids
        time.sleep(0.2)
    raise AssertionError("workers did not start")


def wait_started(pid: int, timeout=60.0) -> None:
    """Return once the shared-buffer run whose parent is ``pid`` has given its workers the
    start signal: the parent unlinks the segments (all workers have mapped them) just before.
    Unlike :func:`wait_training` this does not wait for a metrics row, which the evaluator
    writes in batches (every 2 s), by which time a short run may have ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not shm_segments(pid):
            return
        time.sleep(0.02)
    raise AssertionError("the workers were not started")


def wait_training(out, timeout=60.0) -> None:
    """Return once the run in ``out`` has written its first metrics row."""
    deadline = time.time() + timeout
    metrics = Path(out) / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().strip():
            return
        time.sleep(0.1)
    raise AssertionError("training did not start")


# ----------------------------------------------------------------------- simulated hosts

SIM_HOSTS_SCRIPT = ROOT / "scripts" / "sim_hosts.sh"


def sim_hosts_script(state: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``scripts/sim_hosts.sh ARGS`` with its state in ``state``."""
    return subprocess.run(
        [str(SIM_HOSTS_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HVDSGD_SIM_DIR": str(state)},
    )


class SimHosts:
    """Simulated hosts from ``scripts/sim_hosts.sh``: sshd on 127.0.0.2, 127.0.0.3, ... that
    horovodrun reaches through real ssh (see the script). ``hosts``: their addresses;
    ``ssh_args``: horovodrun's --ssh-port and --ssh-identity-file for them; ``local_dir``: the
    one host-local directory (what a test puts there on 127.0.0.1 is missing on every
    simulated host); ``port``, ``identity``: the ssh port and key."""

    def __init__(self, state: Path):
        self.state = state
        self._read()

    def _read(self) -> None:
        env = dict(
            line.split("=", 1)
            for line in (self.state / "env").read_text().splitlines()
            if "=" in line
        )
        self.hosts = env["SIM_HOSTS"].split(",")
        self.port = int(env["SIM_SSH_PORT"])
        self.identity = env["SIM_SSH_KEY"]
        self.local_dir = Path(env["SIM_LOCAL_DIR"])
        self.ssh_args = ["--ssh-port", str(self.port), "--ssh-identity-file", self.identity]

    def up(self, n: int) -> None:
        """Resize to ``n`` hosts, 127.0.0.2 .. 127.0.0.(n+1): the missing ones start, the
        extra ones stop with everything they run; the port and key stay. The fixture is shared
        by the session: a test that resizes puts it back to 2 when it ends."""
        proc = sim_hosts_script(self.state, "up", str(n))
        if proc.returncode != 0:
            raise RuntimeError(f"sim_hosts.sh up {n}: {proc.stderr.strip()}")
        self._read()

    def command(
        self,
        spec: str | None,
        *args: str,
        np_: int | None = None,
        flags=(),
        nic: str | None = "lo",
        python: bool = True,
    ) -> list[str]:
        """``horovodrun -np N [-H spec] --gloo <ssh args> [--network-interface nic] FLAGS
        [python] ARGS``. N defaults to the slots in ``spec``. ``nic=None`` lets Horovod find the
        interfaces itself: an ssh round trip per host, about 2.5 s (cached for an hour per host
        set and port); ``lo`` skips it. ``flags`` go to horovodrun (--min-np, --host-discovery-
        script ...); ``python=False`` runs ARGS as the command instead of ``python ARGS``."""
        exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
        if np_ is None:
            np_ = sum(int(h.rpartition(":")[2]) for h in spec.split(","))  # type: ignore[union-attr]
        cmd = [
            exe,
            "-np",
            str(np_),
            *(["-H", spec] if spec else []),
            "--gloo",
            *self.ssh_args,
            *(["--network-interface", nic] if nic else []),
            *flags,
        ]
        return cmd + ([sys.executable] if python else []) + list(args)

    @staticmethod
    def env(env=None) -> dict[str, str]:
        """The launch environment (horovodrun passes it to every rank): the repository on
        PYTHONPATH, unbuffered output; the caller's own ssh session variables left out, so a
        rank on a simulated host sees the ones its sshd set."""
        base = {
            k: v
            for k, v in os.environ.items()
            if k not in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY", "SSH_AUTH_SOCK")
        }
        return {**base, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}

    def popen(
        self,
        spec: str | None,
        *args: str,
        np_: int | None = None,
        flags=(),
        nic: str | None = "lo",
        python: bool = True,
        env=None,
        cwd=None,
        **kwargs,
    ) -> subprocess.Popen:
        """Start horovodrun (see :meth:`command`) and return the Popen; ``kwargs`` go to Popen
        (stdout=, stderr=, text=, preexec_fn= ...). The caller waits for it and stops it."""
        return subprocess.Popen(
            self.command(spec, *args, np_=np_, flags=flags, nic=nic, python=python),
            cwd=cwd or ROOT,
            env=self.env(env),
            **kwargs,
        )

    def horovodrun(
        self,
        spec: str | None,
        *args: str,
        np_: int | None = None,
        flags=(),
        nic: str | None = "lo",
        python: bool = True,
        timeout: float = 240,
        env=None,
        cwd=None,
        **kwargs,
    ) -> subprocess.CompletedProcess:
        """Run horovodrun (see :meth:`command`) to its end; a CompletedProcess with text stdout
        and stderr. Past ``timeout`` horovodrun is stopped (SIGTERM: it stops its ranks, here
        and on the simulated hosts) and TimeoutExpired is raised."""
        proc = self.popen(
            spec,
            *args,
            np_=np_,
            flags=flags,
            nic=nic,
            python=python,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            finally:
                proc.kill()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if proc.returncode != 0:
            key = [
                line
                for line in (out + err).splitlines()
                if re.search(r"error|exception|timed? ?out|terminated|signal|abort|ssh", line, re.I)
            ]
            print(
                f"horovodrun -H {spec} exited {proc.returncode}; first lines naming an error:",
                *key[:40],
                sep="\n",
            )
        return result

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a shell command on a simulated host through ssh, as horovodrun does."""
        return subprocess.run(
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-p",
                str(self.port),
                "-i",
                self.identity,
                host,
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def sim_hosts_unavailable(up: subprocess.CompletedProcess) -> None:
    """`scripts/sim_hosts.sh up` failed: skip with its reason, or fail when
    HVDSGD_TEST_MULTIHOST=1."""
    why = (up.stderr.strip().splitlines() or [f"exit status {up.returncode}"])[-1]
    if os.environ.get("HVDSGD_TEST_MULTIHOST") == "1":
        pytest.fail(f"HVDSGD_TEST_MULTIHOST=1 but the simulated hosts did not start: {why}")
    pytest.skip(
        f"simulated hosts unavailable ({why}); HVDSGD_TEST_MULTIHOST=1 makes this a failure"
    )


@pytest.fixture(scope="session")
def sim_hosts(tmp_path_factory):
    """Two simulated hosts (127.0.0.2, 127.0.0.3) for the session: ``scripts/sim_hosts.sh up 2``
    on first use, ``down`` at the end. Skips, with the script's reason, when sshd cannot start;
    fails instead when HVDSGD_TEST_MULTIHOST=1."""
    state = tmp_path_factory.mktemp("sim-hosts")
    try:
        up = sim_hosts_script(state, "up", "2")
    except (OSError, subprocess.TimeoutExpired) as e:
        up = subprocess.CompletedProcess([], 1, "", f"sim_hosts: {e}")
    try:
        if up.returncode != 0:
            sim_hosts_unavailable(up)
        yield SimHosts(state)
    finally:
        sim_hosts_script(state, "down", timeout=120)


# ------------------------------------------------------------------------------ kernels


def reference(p, g, buf, lr, momentum, wd, first):
    """The NumPy reference of one SGD step (torch.optim.SGD's arithmetic, no dampening, no
    Nesterov), in float64: one step on ``p`` (and ``buf`` when ``momentum``) in place."""
    g = g + wd * p
    if momentum:
        buf[:] = g if first else momentum * buf + g
        d = buf
    else:
        d = g
    p -= lr * d
