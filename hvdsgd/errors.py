"""The one path for bad input: a one-line message naming the fix, and a non-zero exit.

Everything the user can get wrong (a flag, a file, a checkpoint, a diverging loss) raises
:class:`UsageError`. Entry points wrap ``main`` in :func:`exit_on_usage_error`, which prints
``hvdsgd: error: <message>`` once (rank 0 first under Horovod; another rank only if nobody stopped
it) and exits with status 2 on every rank, so no rank is left waiting in a collective.

Under horovodrun the launcher speaks for the job: a rank that is stopped (SIGTERM), or whose
collective failed because a peer died, leaves without a word or a traceback, and horovodrun
prints the one line ("rank 1 was lost (exit 137); stopping", "horovodrun: interrupted").
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import time
from typing import Any, NoReturn

EXIT_USAGE = 2
_GRACE_S = 3.0  # seconds a rank waits for horovodrun to stop it before it speaks itself
# What a collective raises when a peer rank died or the job is being stopped.
_PEER_LOST = re.compile(
    r"gloo|connection (reset|closed) by peer|broken pipe|"
    r"horovod has been shut down",
    re.I,
)


class UsageError(Exception):
    """Bad input from the user; the message says what to change."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) to an entry point: unwinds through every clean-up like Ctrl-C.

    A subclass of KeyboardInterrupt, so code that stops its workers on Ctrl-C does the same on
    SIGTERM; :func:`exit_on_usage_error` reports it in one line and exits 128 + the signal."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)


def _raise_terminated(signum, _frame) -> None:
    raise Terminated(signum)


def private_umask() -> None:
    """Never create world-writable files: add ``o-w`` to the process umask (the user's own
    choice for the group is kept). Entry points call this before they write anything."""
    old = os.umask(0o022)
    os.umask(old | 0o002)


def require_writable_dir(path, flag: str = "--out") -> None:
    """Create ``path`` and prove it writable, or raise a UsageError naming ``flag``."""
    from pathlib import Path

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to {flag} {path} ({e.strerror}); choose a writable directory"
        ) from None


def _rank() -> int:
    # Horovod's launcher sets HOROVOD_RANK (gloo) / OMPI_COMM_WORLD_RANK (MPI) before init.
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def _under_horovodrun() -> bool:
    """Started by horovodrun, which reports a lost rank and a stopped job itself."""
    return "HOROVOD_RANK" in os.environ


def _peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank is gone, or horovodrun is stopping the job."""
    return type(e).__name__ == "HorovodInternalError" or (
        isinstance(e, (RuntimeError, ConnectionError)) and bool(_PEER_LOST.search(str(e)))
    )


def _leave(status: int, line: str | None, wait: bool) -> NoReturn:
    """Exit with ``status`` (os._exit: Horovod's atexit shutdown can block while peers still
    wait in a collective). With ``wait``, first give horovodrun a moment to stop this rank: then
    it leaves quietly (another rank, or the launcher, has said why); else it prints ``line``."""
    if wait:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
        time.sleep(_GRACE_S)
    if line:
        print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    _release_semaphores()
    os._exit(status)


def _release_semaphores() -> None:
    """Unlink this process's multiprocessing semaphores as a normal exit would: os._exit skips
    their finalizers, and the resource tracker would then add a "leaked semaphore objects"
    warning after the one line."""
    from multiprocessing import synchronize, util

    for f in list((util._finalizer_registry or {}).values()):
        if getattr(f, "_callback", None) is synchronize.SemLock._cleanup:
            f()


def _interrupt_in(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or Terminated behind ``e``: a signal that lands inside an import or a
    ``__set_name__`` comes out wrapped in another exception."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _stopped(e: KeyboardInterrupt) -> NoReturn:
    """Ctrl-C or a stop signal: one line (none under horovodrun, which speaks for the job)."""
    signum = getattr(e, "signum", signal.SIGINT)
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    quiet = _under_horovodrun() or _rank() != 0
    _leave(128 + signum, None if quiet else f"hvdsgd: {what}", wait=False)


def exit_on_usage_error(main):
    """Decorate an entry point: UsageError -> one line, exit 2 on every rank; SIGINT, SIGTERM,
    SIGHUP -> one line, exit 128 + the signal; under horovodrun, a stopped rank or one that lost
    a peer exits without a word (horovodrun reports it)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        private_umask()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_terminated)
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            # Every rank meets the same error: rank 0 speaks first, and horovodrun stops the
            # others when it exits. A rank alone with its error speaks after the grace time.
            # Other launchers (torchrun, refused in one line) stop no one: only rank 0 speaks.
            if _rank() != 0 and not _under_horovodrun():
                _leave(EXIT_USAGE, None, wait=False)
            _leave(EXIT_USAGE, f"hvdsgd: error: {e}", wait=_rank() != 0)
        except KeyboardInterrupt as e:
            _stopped(e)
        except Exception as e:
            if _interrupt_in(e) is not None:
                _stopped(_interrupt_in(e))
            if not (_under_horovodrun() and _peer_lost(e)):
                raise
            # A peer died: horovodrun names it and stops this rank within the grace time.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _leave(
                1,
                f"hvdsgd: error: rank {_rank()} lost contact with the other ranks ({reason})",
                wait=True,
            )

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as one UsageError line instead of usage + exit; no
    abbreviations (``--epoch`` is not ``--epochs``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")
