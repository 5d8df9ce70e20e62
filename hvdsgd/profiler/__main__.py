"""Profile a command until it exits, or the machine for a while.

    python -m hvdsgd.profiler --interval 0.1 --out runs/prof -- python train.py --epochs 1
    python -m hvdsgd.profiler --duration 30 --out runs/idle [--pid PID]
    python -m hvdsgd.profiler --cuda-device 0 --rank 0 --out runs/prof -- python train.py

Exits with the command's status (128+N if a signal N killed it; 127 if it was not found), and
forwards SIGINT/SIGTERM to it. Bad input: one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import subprocess
import sys
import threading
from typing import Callable, Iterator, Sequence

from ..errors import EXIT_USAGE, ArgumentParser, UsageError
from .sampler import MAX_INTERVAL_S, Profiler

log = logging.getLogger("hvdsgd")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Every float flag: its largest value (seconds; all must be > 0 and finite) and an example.
FLOAT_FLAGS = {"interval": (MAX_INTERVAL_S, "0.1"), "duration": (365 * 86400.0, "30")}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options before ``--``, and the command after it."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = ArgumentParser(
        prog="python -m hvdsgd.profiler",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- COMMAND [ARGS...]  |  %(prog)s [options] --duration S",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=0.1,
        metavar="S",
        help=f"seconds between samples, at most {MAX_INTERVAL_S:.0f} (default: 0.1)",
    )
    p.add_argument(
        "--out", default="profile", metavar="DIR", help="output folder (default: ./profile)"
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="profile for S seconds instead of a command (at most a year)",
    )
    p.add_argument("--prefix", default="profile", help="file name prefix (default: profile)")
    p.add_argument("--rank", type=int, metavar="N", help="append -rankN to the file names")
    p.add_argument(
        "--cuda-device",
        type=int,
        metavar="K",
        help="watch only CUDA device K of the visible ones (default: all visible)",
    )
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="also watch this process tree (repeatable)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args, command = p.parse_args(argv[:cut]), argv[cut + 1 :]
    _check_floats(args)
    if command and args.duration is not None:
        raise UsageError("give either a command after -- or --duration, not both")
    if not command and args.duration is None:
        raise UsageError("nothing to profile: give a command after -- or --duration SECONDS")
    if (args.cuda_device or 0) < 0 or (args.rank or 0) < 0:
        raise UsageError("--cuda-device and --rank must be >= 0")
    return args, command


def _check_floats(args: argparse.Namespace) -> None:
    """Every float flag given is finite and in (0, its maximum], or one line naming it."""
    for name, (high, example) in FLOAT_FLAGS.items():
        value = getattr(args, name)
        if value is not None and not 0 < value <= high:  # NaN fails every comparison
            raise UsageError(
                f"--{name} must be > 0 and <= {high:.0f} seconds (got {value}); "
                f"e.g. --{name} {example}"
            )


@contextlib.contextmanager
def _on_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``handler(signum)`` for the duration of the block."""
    old = {s: signal.signal(s, lambda signum, _frame: handler(signum)) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_command(prof: Profiler, command: list[str]) -> int:
    try:
        child = subprocess.Popen(command)
    except OSError as e:
        raise UsageError(f"cannot run {command[0]!r} ({e.strerror}); check the command") from None
    prof.watch(child.pid)
    with _on_signals(child.send_signal):
        rc = child.wait()
    return 128 - rc if rc < 0 else rc  # killed by signal N: 128+N, as a shell reports it


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="hvdsgd: %(message)s")
    try:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        if command and shutil.which(command[0]) is None:
            print(
                f"hvdsgd.profiler: error: command not found: {command[0]} (check the name or PATH)",
                file=sys.stderr,
            )
            return 127
        prof = Profiler(
            args.out,
            args.interval,
            cuda_ordinal=args.cuda_device,
            pids=args.pid,
            prefix=args.prefix,
            rank=args.rank,
            plot=not args.no_plot,
        )
        with prof:
            if command:
                rc = _run_command(prof, command)
            else:
                done = threading.Event()
                with _on_signals(lambda _signum: done.set()):
                    done.wait(args.duration)
                rc = 0
    except UsageError as e:
        print(f"hvdsgd.profiler: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    log.info("profiler: wrote %s", ", ".join((prof.summary or {}).get("files", {}).values()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
