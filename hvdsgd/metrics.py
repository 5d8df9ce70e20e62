"""Running sums of loss, accuracy and the confusion matrix, reduced across ranks.

A :class:`Tally` accumulates on the training device without synchronising; ``reduce()``
sums every rank's tally with one Horovod allreduce and returns plain numbers.
"""

from __future__ import annotations

import torch

from . import dist


class Tally:
    """Loss sum, sample count and a confusion matrix (rows: true class, cols: predicted).

    ``add`` only keeps references to the batch's loss, logits and labels; every
    ``flush_every`` batches they are folded into the sums with a handful of tensor ops, so a
    training step does not pay a dozen small kernels for its metrics.
    """

    flush_every = 32

    def __init__(self, num_classes: int, device: torch.device):
        self.k = num_classes
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
        self._pending: list = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``loss`` is the batch-mean loss, ``logits`` (N, K), ``y`` (N,)."""
        self._pending.append((loss.detach(), logits.detach(), y))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Fold the pending batches into the loss sum and the confusion counts."""
        if not self._pending:
            return
        losses, logits, ys = zip(*self._pending, strict=True)
        self._pending = []
        sizes = torch.tensor([len(y) for y in ys], dtype=torch.float64, device=self.loss.device)
        self.loss += (torch.stack(losses).double() * sizes).sum()
        y = torch.cat(ys)
        pred = torch.cat(logits).argmax(1)
        self.confusion += torch.bincount(y * self.k + pred, minlength=self.k * self.k).double()

    def reduce(self, name: str, extra: torch.Tensor | None = None) -> "Summary":
        """Sum over all ranks (one allreduce) and summarise. ``extra`` (float64 values) is
        summed in the same allreduce; the sum comes back as the summary's ``extra``."""
        self.flush()
        parts = [self.loss[None], self.confusion]
        if extra is not None:
            parts.append(extra.to(self.loss))
        flat = dist.allreduce_sum(torch.cat(parts), name=name).cpu()
        n = 1 + self.k * self.k
        return Summary(
            flat[0].item(),
            flat[1:n].view(self.k, self.k).long(),
            flat[n:] if extra is not None else None,
        )

    def clear(self) -> None:
        """Back to zero (an elastic commit has taken the sums so far)."""
        self._pending = []
        self.loss.zero_()
        self.confusion.zero_()

    def local(self) -> "Summary":
        """This process's tally alone, summarised (no collective)."""
        self.flush()
        return Summary(self.loss.item(), self.confusion.cpu().view(self.k, self.k).long())


class Summary:
    """Metrics of a reduced tally."""

    def __init__(self, loss_sum: float, confusion: torch.Tensor, extra: torch.Tensor | None = None):
        self.loss_sum, self.confusion, self.extra = loss_sum, confusion, extra
        self.count = int(confusion.sum())
        self.loss = loss_sum / max(1, self.count)

    def __add__(self, other: "Summary | None") -> "Summary":
        """Both parts of an epoch together (``None`` is nothing)."""
        if other is None:
            return self
        return Summary(self.loss_sum + other.loss_sum, self.confusion + other.confusion)

    __radd__ = __add__

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(1, self.count)

    @property
    def per_class_accuracy(self) -> list[float]:
        support = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / support).tolist()

    @property
    def macro_f1(self) -> float:
        tp = self.confusion.diag().double()
        precision = tp / self.confusion.sum(0).clamp(min=1)
        recall = tp / self.confusion.sum(1).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        present = self.confusion.sum(1) > 0  # classes absent from the labels do not count
        return float(f1[present].mean()) if present.any() else 0.0

    def as_dict(self, prefix: str) -> dict:
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_macro_f1": self.macro_f1,
            f"{prefix}_samples": self.count,
        }
