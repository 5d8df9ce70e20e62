"""Atomic checkpoints: written to a temporary file, flushed, then renamed over the old one.

A crash mid-write leaves the previous good checkpoint in place, never a partial one. A
checkpoint records what it was trained for (model, data set, parameter shapes), so resuming
with other flags is refused with a clear message instead of a shape error.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

FORMAT = 1
NAME = "checkpoint.pt"


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and check that it was written for ``identity`` (model, data, shapes)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path}; train without --resume first "
                         "or point --out at the run to continue")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                         "delete it to start over, or resume from another --out")
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UsageError(f"{path} is not an hvdsgd checkpoint; delete it or use another --out")
    saved = state.get("identity", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in identity.items()
            if saved.get(k) != v]
    if diff:
        raise UsageError(f"checkpoint {path} does not match this run ({'; '.join(diff)}); "
                         "use the flags it was trained with or another --out")
    return state


def identity(cfg, model: torch.nn.Module, input_shape, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    return {"model": cfg.model, "dataset": "synthetic" if cfg.synthetic else cfg.dataset,
            "input_shape": list(input_shape), "num_classes": num_classes,
            "optimizer": cfg.optimizer,
            "parameters": sum(p.numel() for p in model.parameters())}

