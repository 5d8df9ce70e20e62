"""Atomic checkpoints: written to a temporary file, flushed, then renamed over the old one.

A crash mid-write leaves the previous good checkpoint in place, never a partial one; a write
that fails (a full disk, a read-only file system, a directory in the way) is one UsageError
naming the path and the cause, and the last good checkpoint stays. A checkpoint records what
it was trained for (model, data set, parameter shapes), so resuming with other flags is refused
with a clear message instead of a shape error.

A checkpoint holds only tensors, plain containers, numbers and strings, and is read with
``torch.load(weights_only=True)``: a pickle that would run code (``os.system`` in a
``__reduce__``) is refused before any of it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

FORMAT = 1
NAME = "checkpoint.pt"


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        os.replace(tmp, path)
        os.chmod(path, 0o666 & ~_umask())  # mkstemp's 0600, widened as the user's umask allows
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save on a full disk: RuntimeError
            cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0]
            kept = "the last good checkpoint is kept" if path.is_file() else "no checkpoint kept"
            raise UsageError(
                f"cannot write checkpoint {path} ({cause}); {kept}; free space or "
                "fix the path, then --resume"
            ) from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint and check that it was written for ``identity`` (model, data, shapes)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(
            f"--resume: no checkpoint at {path}; train without --resume first "
            "or point --out at the run to continue"
        )
    try:
        # weights_only: tensors and plain data only; a pickle carrying code is refused unrun.
        with warnings.catch_warnings():  # a foreign pickle's protocol: the refusal says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e) and "Unsupported global" not in str(e):
            raise UsageError(
                f"checkpoint {path} is corrupt, truncated or not a checkpoint "
                "(it does not unpickle as tensors and plain data); delete it to "
                "start over, or resume from another --out"
            ) from None
        raise UsageError(
            f"refusing to load checkpoint {path}: it holds objects other than "
            "tensors and plain data, which could run code; resume only from "
            "checkpoints hvdsgd wrote"
        ) from None
    except Exception as e:
        raise UsageError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
            "delete it to start over, or resume from another --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UsageError(f"{path} is not an hvdsgd checkpoint; delete it or use another --out")
    saved = state.get("identity", {})
    diff = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
        for k, v in identity.items()
        if saved.get(k) != v
    ]
    if diff:
        raise UsageError(
            f"checkpoint {path} does not match this run ({'; '.join(diff)}); "
            "use the flags it was trained with or another --out"
        )
    return state


def resolve(resume: str, out: Path) -> Path:
    """The checkpoint ``--resume`` names: ``--out``'s (``--resume`` alone), a file, or the
    ``checkpoint.pt`` of a run directory."""
    from .config import RESUME_OUT

    path = Path(out) if resume == RESUME_OUT else Path(resume)
    return path / NAME if path.is_dir() or resume == RESUME_OUT else path


def identity(cfg, model: torch.nn.Module, input_shape, num_classes: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed."""
    return {
        "model": cfg.model,
        "dataset": "synthetic" if cfg.synthetic else cfg.dataset,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "optimizer": cfg.optimizer,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
