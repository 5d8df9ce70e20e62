"""The one path for bad input: a one-line message naming the fix, and a non-zero exit.

Everything the user can get wrong (a flag, a file, a checkpoint, a diverging loss) raises
:class:`UsageError`. Entry points wrap ``main`` in :func:`exit_on_usage_error`, which prints
``hvdsgd: error: <message>`` once (rank 0 only under Horovod) and exits with status 2 on every
rank, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time

EXIT_USAGE = 2
_GRACE_S = 3.0  # seconds the other ranks wait before exiting


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
        raise UsageError(f"cannot write to {flag} {path} ({e.strerror}); "
                         "choose a writable directory") from None


def _rank() -> int:
    # Horovod's launcher sets HOROVOD_RANK (gloo) / OMPI_COMM_WORLD_RANK (MPI) before init.
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def exit_on_usage_error(main):
    """Decorate an entry point: UsageError -> one line on rank 0, exit 2 on every rank."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        private_umask()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_terminated)
        try:
            return main(*args, **kwargs)
        except UsageError as e:
            if _rank() == 0:
                print(f"hvdsgd: error: {e}", file=sys.stderr, flush=True)
            else:
                # horovodrun stops every rank when the first one exits: let rank 0 speak first,
                # and leave quietly with the same status when horovodrun stops this one.
                signal.signal(signal.SIGTERM, lambda *_: os._exit(EXIT_USAGE))
                time.sleep(_GRACE_S)
            sys.stdout.flush()
            # os._exit: skip Horovod's atexit shutdown, which can block while peers still
            # wait in a collective; every rank reaches this point for the same error.
            os._exit(EXIT_USAGE)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            if _rank() == 0:
                what = "interrupted" if signum == signal.SIGINT else \
                    f"stopped by {signal.Signals(signum).name}"
                print(f"hvdsgd: {what}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)

    return wrapper
