"""Elastic training: the same epoch loop inside Horovod's ``hvd.elastic.run``.

    horovodrun -np 2 --min-np 1 --max-np 4 --host-discovery-script ./discover.sh \\
        python -m hvdsgd.train

Horovod sets ``HOROVOD_ELASTIC=1`` for the workers of such a launch, and ``hvdsgd.train``
then trains through :class:`TrainState`: the model, the strategy's state (optimizer,
scheduler, AMP scaler) and the :class:`Progress` (epoch, position in it, metrics so far) are
committed to memory every ``--commit-every`` steps and at every epoch end. A commit costs
one collective: the check for host changes rides in the allreduce of the metrics so far.

- A rank is lost: the others fail in their next collective, roll back to the last commit
  (at most ``--commit-every`` steps redone), and go on as soon as Horovod has re-formed the
  ring without the lost host.
- A host is added (or removed) by the discovery script: every rank stops at its next commit
  (nothing redone) and the new world starts from there.

Either way rank 0's state is broadcast to every rank, new ones included; the rest of the
epoch's samples are split over the new ranks (``data.EpochSampler``), and the learning rate
and gradient average follow the new world size (``Allreduce.resize``). Only this module
imports Horovod's elastic machinery; a fixed-size run never loads it.
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from horovod.common.elastic import State
from horovod.common.exceptions import HostsUpdatedInterrupt
from horovod.runner.elastic.worker import HostUpdateResult

from . import dist
from .engine import Progress


class TrainState(State):
    """Horovod's elastic ``State`` over hvdsgd's model, strategy and :class:`Progress`.

    ``on_reset(event)`` runs on every surviving rank once Horovod has re-formed the ring
    (before the broadcast): it adapts the run to the new world; ``event`` is the reset's
    record, also appended to ``progress.resets``.
    """

    def __init__(
        self, model: torch.nn.Module, strategy, progress: Progress, on_reset: Callable[[dict], None]
    ):
        hvd = dist.hvd()
        super().__init__(bcast_object=hvd.broadcast_object, get_rank=hvd.rank)
        self.model, self.strategy, self.progress = model, strategy, progress
        self._on_reset, self._redone = on_reset, None
        self.save()

    def save(self) -> None:
        """Copy the state to memory (``commit()`` is this, then a check for host changes)."""
        self._saved = (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.strategy.state_dict()),
            copy.deepcopy(self.progress),
        )

    def restore(self) -> None:
        """A collective failed (a rank was lost): back to the last commit."""
        model, strategy, progress = copy.deepcopy(self._saved)
        self._redone = self.progress.step - progress.step
        self.model.load_state_dict(model)
        self.strategy.load_state_dict(strategy)
        self.progress = progress

    def host_view(self) -> torch.Tensor:
        """Rank 0's (last checked, latest, kinds) of the host changes the driver announced, as
        float64; zeros on the other ranks, so the sum over ranks is rank 0's view. Upstream's
        ``check_host_updates`` broadcasts the same with ``broadcast_object`` (a pickle and two
        broadcasts); summed inside an allreduce that runs anyway, it costs nothing."""
        prev = latest = self._last_updated_timestamp
        kinds = HostUpdateResult.no_update
        while not self._host_messages.empty():
            timestamp, update = self._host_messages.get()
            if timestamp > latest:
                latest, kinds = timestamp, kinds | update
        view = [prev, latest, int(kinds)] if dist.rank() == 0 else [0, 0, 0]
        return torch.tensor(view, dtype=torch.float64)

    def check_host_updates(self, summed: torch.Tensor | None = None) -> None:
        """Raise ``HostsUpdatedInterrupt`` on every rank at once if hosts were added or removed.
        ``summed``: the sum over ranks of ``host_view()``; None reduces it here."""
        if summed is None:
            # Horovod: rank 0's view of the host changes, the same on every rank.
            summed = dist.allreduce_sum(self.host_view(), name="hvdsgd.elastic.hosts")
        prev, self._last_updated_timestamp, kinds = summed.tolist()
        if self._last_updated_timestamp > prev:
            raise HostsUpdatedInterrupt(HostUpdateResult(int(kinds)) == HostUpdateResult.removed)

    def sync(self) -> None:
        """Every rank takes rank 0's state (at the start, and after every reset)."""
        hvd = dist.hvd()
        # Horovod: rank 0's weights, optimizer state and progress for every rank.
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        strategy, self.progress = hvd.broadcast_object(
            (self.strategy.state_dict(), self.progress), root_rank=0, name="hvdsgd.elastic.sync"
        )
        self.strategy.load_state_dict(strategy)
        self.save()

    def reset(self) -> None:
        """Horovod re-formed the ring (after a lost rank, or hosts added or removed)."""
        p, size = self.progress, dist.size()
        cause = (
            "rank lost"
            if self._redone is not None
            else "host added"
            if size > p.world
            else "host removed"
            if size < p.world
            else "hosts changed"
        )
        event = {
            "time_s": round(time.time() - p.began, 3),
            "cause": cause,
            "from": p.world,
            "to": size,
            "epoch": p.epoch + 1,
            "step": p.step,
            "steps_redone": self._redone or 0,
        }
        p.resets.append(event)
        p.world, self._redone = size, None
        self._on_reset(event)


def run(fit: Callable[[TrainState], dict], state: TrainState) -> dict:
    """``fit(state)`` under ``hvd.elastic.run``: re-entered after every reset."""
    return dist.hvd().elastic.run(fit)(state)
