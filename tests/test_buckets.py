"""DDP-style gradient buckets for the CPU allreduce."""

import pytest
import torch

from hvdsgd import models
from hvdsgd.strategies.allreduce import gradient_buckets

pytestmark = pytest.mark.unit


def test_small_model_is_one_bucket_in_backward_order():
    model = models.build("cnn", (1, 28, 28), 10)
    [bucket] = gradient_buckets(model, 25 * 2**20)
    assert [id(p) for p in bucket] == [id(p) for p in reversed(list(model.parameters()))]


def test_large_model_is_cut_at_the_cap_and_covers_every_parameter_once():
    with torch.device("meta"):  # shapes only: no memory, no initialisation (2 s on the CPU)
        model = models.build("resnet18", (3, 32, 32), 10)
    cap = 25 * 2**20
    buckets = gradient_buckets(model, cap)
    assert len(buckets) == 2  # 44.7 MB of float32 gradients
    assert sum(p.numel() * 4 for p in buckets[0]) >= cap
    flat = [id(p) for b in buckets for p in b]
    assert sorted(flat) == sorted(id(p) for p in model.parameters()) and len(set(flat)) == len(flat)
    assert buckets[0][0] is list(model.parameters())[-1]  # the classifier's bias comes first
