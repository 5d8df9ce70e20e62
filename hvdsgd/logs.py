"""hvdsgd's log: one ``hvdsgd`` logger, plain lines on stdout, rank 0 alone at INFO."""

from __future__ import annotations

import logging
import sys


def setup(main: bool) -> None:
    """Rank 0 (``main``) logs progress at INFO; the other ranks only errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("hvdsgd")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if main else logging.ERROR)
    root.propagate = False
