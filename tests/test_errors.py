"""The entry-point wrapper: one line and the usual exit status, whatever ends the run."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

pytestmark = pytest.mark.e2e


def entry(body: str, env=None):
    code = (
        textwrap.dedent("""
        import multiprocessing, signal
        from hvdsgd.errors import UsageError, Terminated, exit_on_usage_error

        @exit_on_usage_error
        def main():
        """)
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "\nmain()\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def test_a_signal_wrapped_by_an_import_is_still_one_line():
    """SIGTERM inside an import (torch._dynamo's __set_name__) arrives as a RuntimeError."""
    proc = entry("""
        try:
            raise Terminated(signal.SIGTERM)
        except BaseException as e:
            raise RuntimeError("Error calling __set_name__ on '_Cache' instance") from e
        """)
    assert (proc.returncode, proc.stderr.splitlines()) == (143, ["hvdsgd: stopped by SIGTERM"])


def test_no_leaked_semaphore_warning_after_the_one_line():
    proc = entry("""
        lock = multiprocessing.get_context("spawn").Lock()
        raise UsageError("bad flag")
        """)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, ["hvdsgd: error: bad flag"])


@pytest.mark.parametrize("rank,lines", [("0", ["hvdsgd: error: bad flag"]), ("1", [])])
def test_under_another_launcher_only_rank_0_speaks_and_nobody_waits(rank, lines):
    proc = entry('raise UsageError("bad flag")\n', env={"RANK": rank, "WORLD_SIZE": "2"})
    assert (proc.returncode, proc.stderr.splitlines()) == (2, lines)


def test_files_are_never_world_writable_even_under_umask_0(tmp_path):
    proc = subprocess.run(
        [
            "sh",
            "-c",
            f'umask 000; {sys.executable} -c "from hvdsgd.errors import '
            f"exit_on_usage_error as w; w(lambda: open('{tmp_path}/g', 'w'))()\"",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert proc.returncode == 0
    assert not (tmp_path / "g").stat().st_mode & 0o002


def test_a_rank_that_loses_its_peers_unstopped_says_so_in_one_line():
    # No horovodrun stops it (a network failure, no rank died): after the grace time the rank
    # names the lost connection in one line instead of a traceback.
    proc = entry(
        'raise RuntimeError("gloo/transport/tcp/pair.cc:589 Read error: Connection reset by peer")',
        env={"HOROVOD_RANK": "1"},
    )
    assert proc.stderr.splitlines() == [
        "hvdsgd: error: rank 1 lost contact with the other ranks "
        "(gloo/transport/tcp/pair.cc:589 Read error: Connection reset by peer)"
    ], proc.stderr
    assert proc.returncode == 1
