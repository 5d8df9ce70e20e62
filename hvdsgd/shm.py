"""The Python face of the C++ shared parameter buffer (``hvdsgd._C.SharedBuffer``).

A model's parameters live in one POSIX shared-memory segment; its floating-point buffers
(BatchNorm running statistics) in a second one, so that weight decay never touches them.
Each process binds its copy of the model to the segments: every parameter becomes a view
into the shared floats, so a forward pass reads the live weights and the C++ kernel's
updates are seen by every process at once, with no copy.

    shared = SharedModel.create(model, workers=4)       # parent: copies the weights in
    names = shared.names                                 # picklable, for the workers
    shared = SharedModel.attach(names, model)            # worker: model now views the segment
    shared.unlink()                                      # parent: once every worker attached

The segments are unlinked as soon as every worker has attached (the mappings live on until
the last process unmaps them), and again on every way out, so ``/dev/shm`` keeps nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _C
from .errors import UsageError


def float_buffers_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def bind(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Make each tensor a view into ``flat`` (in order), keeping its shape; no value is copied."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data = flat[offset : offset + n].view_as(t)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"the model has {offset} values but the buffer holds {flat.numel()}")


def copy_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the tensors' values into ``flat``, back to back."""
    offset = 0
    for t in tensors:
        flat[offset : offset + t.numel()].copy_(t.detach().reshape(-1))
        offset += t.numel()


def grad_buffer(model: torch.nn.Module) -> torch.Tensor:
    """One preallocated flat gradient buffer; every ``param.grad`` becomes a view into it.

    Autograd accumulates into an existing ``.grad`` in place, so backward writes straight
    into the flat buffer: no allocation per step, and one ``zero_()`` clears every gradient.
    """
    params = params_of(model)
    flat = torch.zeros(numel(params))
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


class SharedModel:
    """A model's parameters (segment ``params``) and float buffers (segment ``state``)."""

    def __init__(self, params: "_C.SharedBuffer", state: "_C.SharedBuffer | None"):
        self.params, self.state = params, state

    @property
    def names(self) -> dict:
        """What a worker needs to attach: segment names and sizes."""
        return {
            "params": self.params.name,
            "n": self.params.size,
            "state": self.state.name if self.state else None,
            "n_state": self.state.size if self.state else 0,
        }

    @property
    def flat(self) -> torch.Tensor:
        """The shared parameters as one writable float32 tensor (zero-copy)."""
        return torch.from_numpy(self.params.params())

    @classmethod
    def create(
        cls, model: torch.nn.Module, workers: int, shards: int = 1, slots: int = 0
    ) -> "SharedModel":
        """New segments holding ``model``'s current values; ``model`` is bound to them."""
        params, buffers = params_of(model), float_buffers_of(model)
        if any(p.dtype != torch.float32 for p in params + buffers):
            raise UsageError("the shared-buffer strategies need a float32 model")
        pbuf = _C.SharedBuffer.create(numel(params), workers=workers, shards=shards, slots=slots)
        sbuf = None
        try:
            copy_into(params, torch.from_numpy(pbuf.params()))
            if buffers:
                sbuf = _C.SharedBuffer.create(numel(buffers), workers=1)
                copy_into(buffers, torch.from_numpy(sbuf.params()))
        except BaseException:
            pbuf.unlink()
            if sbuf is not None:
                sbuf.unlink()
            raise
        shared = cls(pbuf, sbuf)
        shared.bind(model)
        return shared

    @classmethod
    def attach(cls, names: dict, model: torch.nn.Module | None = None) -> "SharedModel":
        """Attach to a parent's segments by name (and bind ``model`` to them)."""
        pbuf = _C.SharedBuffer.attach(names["params"], names["n"])
        sbuf = _C.SharedBuffer.attach(names["state"], names["n_state"]) if names["state"] else None
        shared = cls(pbuf, sbuf)
        if model is not None:
            shared.bind(model)
        return shared

    def bind(self, model: torch.nn.Module) -> None:
        """Make ``model``'s parameters and float buffers views into the segments."""
        bind(params_of(model), self.flat)
        if self.state is not None:
            bind(float_buffers_of(model), torch.from_numpy(self.state.params()))

    def snapshot(self) -> np.ndarray:
        """A private copy of the parameters (taken under the update lock)."""
        out = np.empty(self.params.size, np.float32)
        self.params.read(out, locked=True)
        return out

    def unlink(self) -> None:
        """Remove the segments' names (idempotent); mapped views stay valid."""
        self.params.unlink()
        if self.state is not None:
            self.state.unlink()
