"""Synchronous data-parallel SGD: Horovod ring-allreduce of the gradients every step.

The Horovod recipe (Sergeev & Del Balso 2018; horovod/examples/pytorch): scale the learning
rate by the world size with a linear warm-up, broadcast parameters and optimizer state from
rank 0, and wrap the optimizer in ``hvd.DistributedOptimizer``, whose backward hooks start
the allreduces while the backward pass runs: per tensor on GPUs, per DDP-style bucket of
``--bucket-mb`` on CPUs.
"""
from __future__ import annotations

import torch

from .. import dist, schedule
from ..config import TrainConfig
from ..errors import UsageError


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """The local optimizer (SGD with momentum, or AdamW) at learning rate ``lr``."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(cfg.momentum, 0.999),
                                 weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


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


class Allreduce:
    """Horovod synchronous SGD; implements the engine's ``Updater``."""

    name = "allreduce"

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, device: torch.device,
                 steps_per_epoch: int):
        hvd = dist.hvd()
        self.cfg, self.model = cfg, model
        if cfg.adasum and not (hvd.mpi_enabled() or (device.type == "cuda" and hvd.nccl_built())):
            raise UsageError("--adasum needs Horovod with MPI (CPU) or NCCL (GPU), and this run "
                             "has neither (Gloo has no Adasum); drop --adasum")
        # Horovod: scale the learning rate by the number of ranks (Adasum adapts by itself).
        self.world_scale = 1.0 if cfg.adasum else float(hvd.size())
        optimizer = make_optimizer(cfg, model, cfg.lr * self.world_scale)
        # Horovod: start every rank from rank 0's weights and optimizer state.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        # Horovod: average gradients with ring-allreduce; fp16 compression halves the bytes.
        self.optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if cfg.fp16_allreduce else hvd.Compression.none,
            backward_passes_per_step=cfg.accum_steps,
            op=hvd.Adasum if cfg.adasum else hvd.Average,
            # CPU: per-tensor allreduces only contend with the backward pass when every core
            # computes; DDP-style buckets are one negotiation each, and the first one still
            # overlaps the rest of the backward pass on large models. GPU: Horovod's own.
            groups=(gradient_buckets(model, cfg.bucket_mb * 2**20)
                    if device.type == "cpu" and not cfg.adasum else None))
        self.scheduler = schedule.build(
            self.optimizer, cfg.scheduler, total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), world_scale=self.world_scale)
        # fp16 autocast needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def update(self) -> None:
        opt = self.optimizer
        if self.scaler or self.cfg.grad_clip:
            # Horovod: finish the allreduce first, so unscaling and clipping see the average.
            opt.synchronize()
            if self.scaler:
                self.scaler.unscale_(opt)
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            with opt.skip_synchronize():
                if self.scaler:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
        else:
            opt.step()
        opt.zero_grad()
        self.scheduler.step()

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # This run's --lr, --epochs and world size set the rate from here on; with the same
        # flags this recomputes exactly the rate that was saved.
        peak = self.cfg.lr * self.world_scale
        self.scheduler.base_lrs = [peak] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["lr"] = peak * factor(self.scheduler.last_epoch)
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
