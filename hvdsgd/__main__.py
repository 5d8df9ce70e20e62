"""``python -m hvdsgd``: the version, the entry points and how to launch each.

It imports neither torch nor Horovod, so it answers at once on any machine, with or without
them installed; ``--version`` adds the installed torch and Horovod versions from the package
metadata.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from .config import version_line
from .errors import ArgumentParser, exit_on_usage_error

# module under hvdsgd -> what it does, in one line
ENTRY_POINTS = {
    "train": "data-parallel SGD on Horovod; HOGWILD and parameter-server strategies on CPU",
    "kfold": "stratified K-fold cross-validation, the folds trained in parallel",
    "lottery": "lottery tickets by iterative magnitude pruning, the tickets trained in parallel",
    "profiler": "GPU (NVML, DCGM-style GPM) and per-core CPU sampling around a command",
    "build_horovod": "build the patched Horovod into this Python environment",
}
# command -> what it runs
LAUNCH = {
    "horovodrun -np 4 python -m hvdsgd.train": "4 ranks on this host",
    "horovodrun -np 8 -H host1:4,host2:4 python -m hvdsgd.train": "8 ranks on 2 hosts",
    "python -m hvdsgd.train --dry-run": "1 process, no horovodrun",
    "python -m hvdsgd.train --strategy hogwild --workers 4": "HOGWILD on CPU",
    "python -m hvdsgd.kfold --folds 5 --workers 2": "folds on 2 processes",
    "horovodrun -np 2 python -m hvdsgd.kfold": "folds on 2 ranks",
    "python -m hvdsgd.lottery --workers 2": "tickets on 2 processes",
    "python -m hvdsgd.profiler --out runs/prof -- python -m hvdsgd.train": "profile a command",
    "python -m hvdsgd.build_horovod": "once, to add Horovod",
}


def overview() -> str:
    """The text ``python -m hvdsgd`` prints."""
    width = max(map(len, ENTRY_POINTS))
    lines = [
        f"hvdsgd {__version__}: parallel and distributed training with PyTorch",
        "",
        "entry points (python -m hvdsgd.NAME --help for each one's flags):",
    ]
    lines += [f"  {name:<{width}}  {what}" for name, what in ENTRY_POINTS.items()]
    lines += ["", "launch:"]
    width = max(map(len, LAUNCH))
    lines += [f"  {command:<{width}}  # {what}" for command, what in LAUNCH.items()]
    return "\n".join(lines)


@exit_on_usage_error
def main(argv: Sequence[str] | None = None) -> None:
    p = ArgumentParser(
        prog="python -m hvdsgd",
        description=overview(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_line(__version__))
    p.parse_args(sys.argv[1:] if argv is None else argv)
    print(overview())


if __name__ == "__main__":
    main()
