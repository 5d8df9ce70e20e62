"""Several hosts: horovodrun reaches simulated hosts (scripts/sim_hosts.sh) through real ssh.

`-H 127.0.0.1:1,127.0.0.2:1`: rank 0 runs here, rank 1 on 127.0.0.2 under that host's sshd.
Run as a script (``python tests/test_multihost.py REPORTS TRAIN-ARGS``), this file is the rank
side of the training test: it trains with ``hvdsgd.train.main`` and writes what the rank saw.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import sim_hosts_script, sim_hosts_unavailable, write_mnist

pytestmark = pytest.mark.multihost

SPEC = "127.0.0.1:1,127.0.0.2:1"  # two hosts, one rank each
# The cheapest training that stays >= 97% on digits at 2 ranks (measured: 97.2-97.8% over
# seeds 0-3 from 5 epochs on; 4 epochs sit at the edge).
TRAIN = ("--model", "cnn", "--epochs", "6", "--no-progress")


def not_on_a_rank_stdout(proc):
    return [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and not re.match(r"\[\d+\]<stdout>:", line)
    ]


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def gone(p: psutil.Process) -> bool:
    """Exited (a zombie waiting for init to reap it has exited too)."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def processes_writing(out):
    """Processes (here or on a simulated host) whose command line names ``out``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(out) in a for a in p.info["cmdline"] or []) and not gone(p):
                found.append(p)
        except psutil.Error:
            pass
    return found


# --------------------------------------------------------------------------- the script


def edit_known_hosts(edit) -> None:
    """``edit(lines)`` on ~/.ssh/known_hosts under scripts/sim_hosts.sh's lock: another set of
    hosts (another test worker's) may be editing the file too."""
    import fcntl

    known = Path.home() / ".ssh" / "known_hosts"
    lock = Path(os.environ.get("TMPDIR", "/tmp")) / "hvdsgd-sim-hosts.known_hosts.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        lines = known.read_text().splitlines() if known.exists() else []
        known.write_text("".join(f"{line}\n" for line in edit(lines)))


def test_sim_hosts_up_is_idempotent_and_down_leaves_nothing(tmp_path):
    state, known = tmp_path / "state", Path.home() / ".ssh" / "known_hosts"
    # A line nobody else writes: down must leave it (and every other line not its own) alone.
    sentinel = "[192.0.2.1]:22 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIhvdsgdSentinelLineOfThisTest"
    (Path.home() / ".ssh").mkdir(mode=0o700, exist_ok=True)
    edit_known_hosts(lambda lines: [*lines, sentinel])
    host, left, ours = None, [], None
    up = sim_hosts_script(state, "up", "1")
    try:
        if up.returncode != 0:
            sim_hosts_unavailable(up)
        first = (state / "env").read_text()
        ours = " ".join((state / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        assert any(ours in line for line in known.read_text().splitlines())  # up wrote its key
        host = psutil.Process(int((state / "sshd-127.0.0.2.pid").read_text()))  # its unshare
        values = dict(line.split("=", 1) for line in first.splitlines())
        assert values["SIM_HOSTS"] == "127.0.0.2"
        assert (
            f"--ssh-port {values['SIM_SSH_PORT']} --ssh-identity-file {values['SIM_SSH_KEY']}"
            in up.stdout
        )
        # Key login, on the host's own address, as a host of its own name.
        ssh = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-p",
            values["SIM_SSH_PORT"],
            "-i",
            values["SIM_SSH_KEY"],
            "127.0.0.2",
        ]
        said = subprocess.run(
            ssh + ["hostname; echo $SSH_CONNECTION"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        assert said[0] == "hvdsgd-sim-2" and said[3] == "127.0.0.2", said
        # A process left running on the host (a rank horovodrun could not stop) goes with it.
        subprocess.run(
            ssh + ["setsid sleep 1000 </dev/null >/dev/null 2>&1 &"], timeout=30, check=True
        )
        wait_until(
            lambda: any(c.name() == "sleep" for c in host.children(recursive=True)),
            10,
            "the sleep did not start on 127.0.0.2",
        )
        left = [c for c in host.children(recursive=True) if c.name() == "sleep"]
        # up again: nothing restarted, the same flags; up 2 adds 127.0.0.3, up 1 stops it
        again = sim_hosts_script(state, "up", "1")
        assert again.returncode == 0, again.stderr
        assert (state / "env").read_text() == first and not gone(host)
        assert sim_hosts_script(state, "up", "2").returncode == 0
        assert (state / "env").read_text() == first.replace("127.0.0.2", "127.0.0.2,127.0.0.3", 1)
        third = psutil.Process(int((state / "sshd-127.0.0.3.pid").read_text()))
        assert sim_hosts_script(state, "up", "1").returncode == 0
        assert (state / "env").read_text() == first and gone(third) and not gone(host)
    finally:
        down = sim_hosts_script(state, "down")
        after = known.read_text().splitlines() if known.exists() else []
        edit_known_hosts(lambda lines: [line for line in lines if line != sentinel])
    assert down.returncode == 0, down.stderr
    assert host is not None and gone(host) and left and all(gone(p) for p in left)
    # Exactly what up added is gone: no line of this set's host key, the sentinel kept.
    assert ours and sentinel in after and not any(ours in line for line in after), after
    assert not state.exists()
    assert sim_hosts_script(state, "down").returncode == 0


# --------------------------------------------------------------------------- training on 2 hosts


def test_two_hosts_train_in_step_and_rank_0_alone_writes(sim_hosts, tmp_path):
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    here = os.sched_getaffinity(0)
    one_cpu = {min(here)}
    # horovodrun (and so rank 0) on one CPU here; rank 1 has its sshd's CPUs: the threads each
    # rank computes with must follow its own host. nic=None: Horovod finds the interfaces itself
    # through ssh, as on a cluster.
    proc = sim_hosts.horovodrun(
        SPEC,
        __file__,
        str(reports),
        "--out",
        str(out),
        *TRAIN,
        nic=None,
        preexec_fn=lambda: os.sched_setaffinity(0, one_cpu),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]

    # Rank 1 ran on 127.0.0.2, started by that host's sshd; rank 0 here, without ssh.
    assert r1["horovod_hostname"] == "127.0.0.2" and r1["hostname"] == "hvdsgd-sim-2"
    assert r1["ssh_connection"] is not None and r1["ssh_connection"].split()[2] == "127.0.0.2"
    assert r1["parent"] == "sshd"
    assert r0["horovod_hostname"] == "127.0.0.1" and r0["hostname"] == socket.gethostname()
    assert r0["ssh_connection"] is None and r0["parent"] != "sshd"

    assert r0["params"] == r1["params"]  # every rank holds the same parameters
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_accuracy"] >= 0.97, summary["test_accuracy"]

    # Compute threads: that host's CPUs // its local size (1 rank per host).
    for r in (r0, r1):
        assert r["local_size"] == 1 and r["threads"] == r["cpus"] // r["local_size"], r
    assert r0["cpus"] == 1 and r1["cpus"] == len(here)

    # Rank 0 alone writes the run directory: rank 1 wrote nothing there, and rank 0 wrote every
    # file in it (so the audit hook saw the writes).
    assert r1["writes"] == []
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert {"summary.json", "metrics.jsonl", "checkpoint.pt"} <= files
    assert files <= {path for _, path in r0["writes"]}, files - {p for _, p in r0["writes"]}


# --------------------------------------------------------------------------- failures


def test_a_host_without_the_data_dir_is_named_in_one_line(sim_hosts, tmp_path):
    # The data set is on 127.0.0.1 only: the host-local directory is empty on 127.0.0.2.
    data = write_mnist(sim_hosts.local_dir / tmp_path.name)
    assert sim_hosts.ssh("127.0.0.2", f"test -e {data}").returncode == 1
    out, status = tmp_path / "run", tmp_path / "status"
    status.mkdir()
    train = (
        f"{sys.executable} -m hvdsgd.train --dataset mnist --data-dir {data} --model mlp "
        f"--epochs 1 --no-progress --out {out}"
    )
    # sh records each rank's own exit status (horovodrun sees only the first).
    proc = sim_hosts.horovodrun(
        SPEC,
        "sh",
        "-c",
        f"{train}; s=$?; echo $s >{status}/$HOROVOD_RANK; exit $s",
        python=False,
        timeout=120,
    )
    assert not_on_a_rank_stdout(proc) == [
        f"[0]<stderr>:hvdsgd: error: rank 1 on 127.0.0.2: --data-dir {data} does not exist; "
        f"create it and put the mnist files in {data}/MNIST/raw, or pass --download"
    ]
    assert proc.returncode == 2
    # Every rank exits, non-zero; none is left running, here or on 127.0.0.2.
    wait_until(lambda: (status / "1").exists(), 30, "rank 1 on 127.0.0.2 did not exit")
    assert int((status / "0").read_text()) == 2 and int((status / "1").read_text()) != 0
    wait_until(lambda: not processes_writing(out), 10, f"left running: {processes_writing(out)}")
    assert not out.exists()  # a run that never started leaves no run directory


def test_an_unreachable_host_is_one_line_from_the_launcher(sim_hosts, tmp_path):
    # No sshd listens on 127.0.0.9. Needs the launcher patch in scripts/build_horovod.sh.
    t0 = time.monotonic()
    proc = sim_hosts.horovodrun(
        "127.0.0.1:1,127.0.0.9:1",
        "-m",
        "hvdsgd.train",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    p, key = sim_hosts.port, sim_hosts.identity
    assert not_on_a_rank_stdout(proc) == [
        f"horovodrun: cannot ssh to 127.0.0.9 (ssh: connect to host 127.0.0.9 port {p}: "
        "Connection refused); this must work without a password: "
        f"ssh -p {p} -i {key} 127.0.0.9 true"
    ]
    assert proc.returncode == 1 and proc.stdout == ""
    assert elapsed < 30, elapsed


# --------------------------------------------------------------------------- the rank side

_WRITE_EVENTS = {
    "os.mkdir",
    "os.rename",
    "os.remove",
    "os.rmdir",
    "shutil.rmtree",
    "os.truncate",
    "os.link",
    "os.symlink",
    "os.chmod",
    "os.chown",
    "os.utime",
    "shutil.copyfile",
    "shutil.move",
    "shutil.copytree",
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def rank_main(reports: str, argv: list[str]) -> None:
    """Train as ``python -m hvdsgd.train ARGV`` would, recording every write under --out (an
    audit hook: opens for writing, mkdir, rename, remove ...), then write this rank's report to
    ``REPORTS/rank<R>.json``: host, ssh session, threads, a hash of the parameters, the writes."""
    import torch

    import hvdsgd.models
    from hvdsgd import dist
    from hvdsgd.train import main

    out = os.path.abspath(argv[argv.index("--out") + 1])
    writes = []

    def under_out(arg):
        if isinstance(arg, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(arg))
            if path == out or path.startswith(out + os.sep):
                return os.path.relpath(path, out)
        return None

    def hook(event, args):
        try:
            if event == "open":
                paths = [args[0]] if isinstance(args[2], int) and args[2] & _WRITE_FLAGS else []
            elif event in _WRITE_EVENTS:
                paths = args
            else:
                return
            writes.extend((event, p) for p in map(under_out, paths) if p is not None)
        except Exception:  # an audit hook must never fail the call it watches
            pass

    built = []
    build = hvdsgd.models.build

    def recording_build(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    hvdsgd.models.build = recording_build
    sys.addaudithook(hook)
    main(argv)

    digest = hashlib.sha256()
    for name, t in built[-1].state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h = dist.library()
    report = {
        "rank": h.rank(),
        "local_size": h.local_size(),
        "hostname": socket.gethostname(),
        "horovod_hostname": os.environ.get("HOROVOD_HOSTNAME"),
        "ssh_connection": os.environ.get("SSH_CONNECTION"),
        "parent": psutil.Process(os.getppid()).name(),
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)),
        "params": digest.hexdigest(),
        "writes": sorted(set(writes)),
    }
    Path(reports, f"rank{h.rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2:])
