"""Synchronous data-parallel SGD: Horovod ring-allreduce of the gradients every step.

The Horovod recipe (Sergeev & Del Balso 2018; horovod/examples/pytorch): scale the learning
rate by the world size with a linear warm-up, broadcast the parameters from
rank 0, and start the allreduces from backward hooks while the backward pass runs.

- GPU (and ``--adasum``): ``hvd.DistributedOptimizer``, per-tensor allreduces that Horovod
  fuses (NCCL, Adasum).
- CPU: ``GradientBuckets``, DDP's gradient-as-bucket-view over Horovod's collectives. Each
  bucket of ``--bucket-mb`` is one flat tensor whose slices *are* the ``.grad`` tensors, so
  Horovod allreduces one tensor per bucket in place: no copy into and out of its fusion buffer
  (2 passes over the gradients), and the average is a 1/N loss scale, not a pass of its own.
- One plain process (no horovodrun): the local optimizer alone, no Horovod.

``--gradient-predivide-factor f`` (Horovod's option): gradients are divided by ``f`` before
the allreduce and by ``ranks / f`` after it. Unset, the CPU buckets divide by the number of
ranks before it (the loss scale), which needs no pass of its own.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .. import dist, schedule
from ..config import TrainConfig
from ..engine import make_optimizer
from ..errors import UsageError


def gradient_buckets(model: torch.nn.Module, cap_bytes: float) -> list[list[torch.Tensor]]:
    """Parameters in reverse order (roughly the order backward produces their gradients), cut
    into groups of at least ``cap_bytes`` (the last may be smaller), as DDP buckets them."""
    groups, current, size = [], [], 0
    for p in reversed([p for p in model.parameters() if p.requires_grad]):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= cap_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def _view_of(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """The slice of ``flat`` at ``offset`` shaped and strided as ``p`` (channels-last too)."""
    if p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last):
        return flat.as_strided(p.shape, p.stride(), offset)
    return flat[offset : offset + p.numel()].view_as(p)


class GradientBuckets:
    """Gradients as views into flat per-bucket tensors, each allreduced (summed) by Horovod as
    soon as the backward pass has produced all of its gradients.

    The caller scales the loss by 1/world size, so the sum is the average. ``arm(final)``
    before each backward pass: only the pass that ends a step (``final``) starts allreduces;
    the others accumulate into the same views. ``synchronize()`` waits for them all (and
    starts any bucket whose parameters got no gradient this step, as every rank does).
    """

    def __init__(
        self, model: torch.nn.Module, cap_bytes: float, compression, postscale: float = 1.0
    ):
        self.hvd, self.compression, self.postscale = dist.hvd(), compression, postscale
        self.flats, self._sizes, self._owner = [], [], {}
        for group in gradient_buckets(model, cap_bytes):
            # One dtype per flat tensor: a group of mixed dtypes becomes one bucket per dtype.
            for dtype in dict.fromkeys(p.dtype for p in group):
                params = [p for p in group if p.dtype == dtype]
                flat = torch.zeros(
                    sum(p.numel() for p in params), dtype=dtype, device=params[0].device
                )
                offset = 0
                for p in params:
                    p.grad = _view_of(flat, offset, p)
                    offset += p.numel()
                    self._owner[p] = len(self.flats)
                    p.register_post_accumulate_grad_hook(self._ready)
                self.flats.append(flat)
                self._sizes.append(len(params))  # parameters per bucket
        self._left = list(self._sizes)
        self._handles: dict[int, tuple] = {}
        self._final = True

    def arm(self, final: bool) -> None:
        """Call before each backward pass; ``final``: this pass completes the step."""
        self._final = final

    def _ready(self, p: torch.Tensor) -> None:
        if not self._final:
            return
        i = self._owner[p]
        self._left[i] -= 1
        if self._left[i] == 0:
            self._start(i)

    def _start(self, i: int) -> None:
        tensor, ctx = self.compression.compress(self.flats[i])
        # Horovod: one in-place ring-allreduce per bucket, named alike on every rank.
        handle = self.hvd.allreduce_async_(tensor, op=self.hvd.Sum, name=f"hvdsgd.bucket.{i}")
        self._handles[i] = (handle, tensor, ctx)

    def synchronize(self) -> None:
        """Wait until every bucket holds the gradient summed over all ranks."""
        for i in range(len(self.flats)):
            if i not in self._handles:
                self._start(i)
        for i, (handle, tensor, ctx) in sorted(self._handles.items()):
            self.hvd.synchronize(handle)
            if tensor is not self.flats[i]:  # compressed (fp16): back to the gradients' dtype
                self.flats[i].copy_(self.compression.decompress(tensor, ctx))
            if self.postscale != 1.0:
                self.flats[i].mul_(self.postscale)
        self.reset()

    def reset(self) -> None:
        """Forget the step's allreduces (done, or dead with an elastic run's old world)."""
        self._handles.clear()
        self._left = list(self._sizes)

    def zero_(self) -> None:
        """Clear every gradient: one ``zero_`` per bucket (the views stay in place)."""
        for flat in self.flats:
            flat.zero_()


class Allreduce:
    """Horovod synchronous SGD; implements the engine's ``Updater``."""

    name = "allreduce"

    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        device: torch.device,
        steps_per_epoch: int,
        broadcast: bool = True,
    ):
        hvd = dist.library()  # None: one plain process, no Horovod
        self.cfg, self.model = cfg, model
        if cfg.adasum and (
            hvd is None or not (hvd.mpi_enabled() or (device.type == "cuda" and hvd.nccl_built()))
        ):
            raise UsageError(
                "--adasum needs Horovod with MPI (CPU) or NCCL (GPU), and this run "
                "has neither (Gloo has no Adasum); drop --adasum"
            )
        size = hvd.size() if hvd is not None else 1
        optimizer = make_optimizer(cfg, model, cfg.lr * self._scale(size))
        self.buckets, self.distributed = None, False
        if hvd is None:
            self.optimizer = optimizer
        else:
            if broadcast:  # (an elastic run's state broadcasts them at every (re)start instead)
                # Horovod: start every rank from rank 0's weights. The optimizer has no state
                # yet, and --resume hands every rank rank 0's; hvd.broadcast_optimizer_state
                # would create it with a zero-gradient step, which moves the weights by the
                # weight decay (and an elastic run would not match a fixed one).
                hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            # Horovod: average gradients with ring-allreduce; fp16 compression halves the bytes.
            compression = hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none
            if device.type == "cpu" and not cfg.adasum:
                # CPU: per-tensor allreduces only contend with the backward pass when every core
                # computes; a flat bucket is one negotiation and one in-place allreduce, and the
                # first one still overlaps the rest of the backward pass on large models.
                self.optimizer = optimizer
                self.buckets = GradientBuckets(model, cfg.bucket_mb * 2**20, compression)
            else:
                self.optimizer = hvd.DistributedOptimizer(
                    optimizer,
                    named_parameters=model.named_parameters(),
                    compression=compression,
                    backward_passes_per_step=cfg.accum_steps,
                    op=hvd.Adasum if cfg.adasum else hvd.Average,
                    gradient_predivide_factor=cfg.gradient_predivide_factor or 1.0,
                )
                self.distributed = True
        self._passes, self._synced = 0, False
        self._set_world(size)
        self.scheduler = self._schedule(steps_per_epoch)
        # fp16 autocast needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    def _scale(self, size: int) -> float:
        # Horovod: scale the learning rate by the number of ranks (Adasum adapts by itself).
        return 1.0 if self.cfg.adasum or dist.library() is None else float(size)

    def _set_world(self, size: int) -> None:
        """The factors that depend on the number of ranks: the learning-rate scale, and the
        CPU buckets' loss scale and post-allreduce scale."""
        self.world_scale, self.loss_scale = self._scale(size), 1.0
        if self.buckets:
            pre = self.cfg.gradient_predivide_factor or size  # the buckets sum: 1/pre, then
            self.buckets.postscale = pre / size  # pre/N, is the average
            self.loss_scale = 1.0 / pre

    def _schedule(self, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        for group in self.optimizer.param_groups:  # the peak rate of this world size
            group["lr"] = group["initial_lr"] = self.cfg.lr * self.world_scale
        return schedule.build(
            self.optimizer,
            self.cfg.scheduler,
            total_steps=self.cfg.epochs * steps_per_epoch,
            warmup_steps=round(self.cfg.warmup_epochs * steps_per_epoch),
            world_scale=self.world_scale,
        )

    def resize(self, size: int, steps_per_epoch: int, epochs_done: float) -> None:
        """After an elastic reset to ``size`` ranks: drop the half-done step (its allreduces
        died with the old world), re-scale the gradient average and the learning rate (the
        Horovod recipe), and lay the schedule over the new steps per epoch at the same point
        of training (``epochs_done``, fractional)."""
        if self.buckets:
            self.buckets.reset()
            self.buckets.zero_()
        else:
            if self.distributed:  # Horovod: forget the old world's pending handles
                self.optimizer._handles.clear()
                self.optimizer.set_backward_passes_per_step(self.cfg.accum_steps)
            self.optimizer.zero_grad()
        self._passes, self._synced = 0, False
        self._set_world(size)
        self.scheduler = self._schedule(steps_per_epoch)
        self._goto(round(epochs_done * steps_per_epoch))

    def _goto(self, step: int) -> None:
        """Put the schedule at optimizer step ``step`` with this run's peak rate."""
        self.scheduler.last_epoch = step
        peak = self.cfg.lr * self.world_scale
        self.scheduler.base_lrs = [peak] * len(self.optimizer.param_groups)
        for group, factor in zip(
            self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = peak * factor(step)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        self._passes += 1
        if self.buckets:
            self.buckets.arm(final=self._passes >= self.cfg.accum_steps)
            loss = loss * self.loss_scale
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def synchronize(self) -> None:
        """Wait for the allreduces: every rank's ``.grad`` then holds the average."""
        if not self._synced and (self.buckets or self.distributed):
            # Horovod: finish the allreduce first, so unscaling and clipping see the average.
            (self.buckets or self.optimizer).synchronize()
        self._synced = True

    def update(self) -> None:
        opt = self.optimizer
        if self.buckets or self.scaler or self.cfg.grad_clip:
            self.synchronize()
        if self.scaler:
            self.scaler.unscale_(opt)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        # hvd.DistributedOptimizer: step() would synchronize again after an explicit one.
        with opt.skip_synchronize() if self._synced and self.distributed else nullcontext():
            if self.scaler:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
        if self.buckets:
            self.buckets.zero_()  # the views stay; zero_grad() would set them to None
        else:
            opt.zero_grad()
        self._passes, self._synced = 0, False
        self.scheduler.step()

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        # This run's --lr, --epochs and world size set the rate from here on; with the same
        # flags this recomputes exactly the rate that was saved.
        self._goto(state["scheduler"]["last_epoch"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
