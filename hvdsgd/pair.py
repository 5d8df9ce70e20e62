"""One training task on two worker processes, with the same bits as on one.

When a task pool has fewer tasks left than workers (5 folds on 2 workers: the fifth fold
would run alone while a core idles), :mod:`hvdsgd.tasks` can give the last task to a pair of
workers. With ``--accum-steps`` >= 2 a step is a sequence of micro-batches whose gradients
autograd adds up in order, ``g = (g_1 + ... + g_{a-1}) + g_a``; the *owner* computes the
first ``a - 1`` micro-batches and the *helper* the last one, each on its own core, and both
form ``g`` with that one final addition. IEEE addition of two floats is commutative, so the
sum, and every update after it, is bit for bit what one process computes: per-task results
stay identical between serial, pooled and Horovod runs.

Each step the two exchange their partial gradients (and the helper its loss and logits, for
the owner's training metrics) through shared memory, double-buffered by step parity, with one
barrier wait. Both apply the same update to their own copy of the model. This is only exact
when a forward pass neither draws random numbers (dropout) nor updates buffers (batch-norm
statistics), since the helper's forward would then see a different state than the serial
one; :func:`splittable` checks that on the model itself, and other models run whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch

BARRIER_TIMEOUT_S = 600.0  # a partner that died (or never came) fails the task, not a hang
PARTNER_STOPPED = "the other half of this split task stopped"  # tasks: not this half's fault


@dataclass
class PairLink:
    """What one half of a split task holds: its role and the pair's barrier and segment."""

    role: int  # 0: owner (returns the task's result), 1: helper
    barrier: "threading.Barrier"  # a multiprocessing.Barrier(2) shared by the two halves
    name: str  # the shared-memory segment, created by the owner

    def wait(self) -> None:
        try:
            self.barrier.wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"{PARTNER_STOPPED} (its worker failed or died); run with "
                "--workers 1 to see its own error"
            ) from None


def splittable(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether a training-mode forward of ``model`` on ``x`` leaves the global RNG and every
    buffer as they were (no dropout, no batch-norm statistics) and its backward reaches every
    trainable parameter; checked on a copy."""
    import copy

    probe = copy.deepcopy(model).train()
    before = [b.clone() for b in probe.buffers()]
    rng = torch.get_rng_state()
    probe(x).float().sum().backward()
    same = torch.equal(rng, torch.get_rng_state())
    torch.set_rng_state(rng)
    return (
        same
        and all(torch.equal(a, b) for a, b in zip(before, probe.buffers(), strict=True))
        and all(p.grad is not None for p in probe.parameters() if p.requires_grad)
    )


class Exchange:
    """The shared segment: per step parity, each role's flat gradient, and the helper's
    micro-batch loss and logits."""

    def __init__(self, link: PairLink, n_grad: int, max_logits: int):
        self.link, self.n = link, n_grad
        per_parity = 2 * n_grad + 1 + max_logits
        size = 2 * per_parity * 4
        from multiprocessing import resource_tracker

        if link.role == 0:
            self.shm = shared_memory.SharedMemory(name=link.name, create=True, size=size)
        link.wait()  # the owner has created it
        if link.role == 1:
            self.shm = shared_memory.SharedMemory(name=link.name)
        # Python < 3.13 registers every segment with the resource tracker, which warns of a
        # leak at exit when a worker was killed. The owner unlinks it in close(), and the pool
        # (hvdsgd.tasks.unlink_segments) unlinks what a killed owner left.
        resource_tracker.unregister(self.shm._name, "shared_memory")
        flat = torch.from_numpy(np.ndarray((2, per_parity), dtype=np.float32, buffer=self.shm.buf))
        self.grads = flat[:, : 2 * n_grad].view(2, 2, n_grad)  # [parity, role, n]
        self.loss = flat[:, 2 * n_grad]  # [parity]
        self.logits = flat[:, 2 * n_grad + 1 :]  # [parity, max_logits]

    def close(self) -> None:
        self.grads = self.loss = self.logits = None
        self.link.wait()  # both are done with it
        self.shm.close()
        if self.link.role == 0:
            self.shm.unlink()


def _set_grads(params: list, flat: torch.Tensor) -> None:
    """Every ``p.grad`` becomes its slice of ``flat`` (copied: the segment is reused)."""
    offset = 0
    for p in params:
        g = flat[offset : offset + p.numel()].view_as(p)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += p.numel()


def train_epoch(
    model, batches, updater, amp: str, accum_steps: int, tally, link: PairLink, exchange: Exchange
) -> None:
    """One epoch as :func:`hvdsgd.engine.train_epoch`, split between the pair. The owner's
    ``tally`` receives every micro-batch, in serial order."""
    from .engine import forward_backward, grouped

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cpu = torch.device("cpu")
    for group in grouped(batches, accum_steps):
        n = sum(len(y) for _, y in group)
        parity = updater.step % 2  # the segment half this step writes
        split = len(group) >= 2
        mine = (
            (group[:-1] if link.role == 0 else group[-1:])
            if split
            else (group if link.role == 0 else [])
        )
        for x, y in mine:
            loss, logits = forward_backward(model, x, y, n, updater, cpu, amp)
            if link.role == 0:
                tally.add(loss, logits, y)
            else:
                exchange.loss[parity] = loss.detach()
                exchange.logits[parity, : logits.numel()] = logits.detach().reshape(-1)
        if mine:
            torch.cat([p.grad.reshape(-1) for p in params], out=exchange.grads[parity, link.role])
        link.wait()  # both partial gradients are in place
        first, last = exchange.grads[parity, 0], exchange.grads[parity, 1]
        if split:
            _set_grads(params, first + last)  # the one addition autograd makes, in its order
            if link.role == 0:
                y = group[-1][1]
                logits = exchange.logits[parity, : len(y) * tally.k].view(len(y), tally.k).clone()
                tally.add(exchange.loss[parity].clone(), logits, y)
        elif link.role == 1:
            _set_grads(params, first)  # the owner computed the whole (one micro-batch) step
        updater.update()
