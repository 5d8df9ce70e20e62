"""hvdsgd._C.sgd_step (hvdsgd.sgd_step) against a NumPy reference and torch.optim.SGD."""

import numpy as np
import pytest
import torch
from conftest import reference

import hvdsgd
from hvdsgd import _C

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4099])  # odd lengths and unaligned tails
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_matches_numpy(n, momentum, wd):
    rng = np.random.default_rng(n)
    p = rng.standard_normal(n, dtype=np.float32)
    buf = np.zeros(n, np.float32) if momentum else None
    p_ref = p.copy().astype(np.float64)
    buf_ref = np.zeros(n) if momentum else None
    for step in range(3):
        g = rng.standard_normal(n, dtype=np.float32)
        first = step == 0
        _C.sgd_step(p, g, 0.1, buf, momentum=momentum, weight_decay=wd, first_step=first)
        reference(p_ref, g.astype(np.float64), buf_ref, 0.1, momentum, wd, first)
    np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
    if momentum:
        np.testing.assert_allclose(buf, buf_ref, rtol=1e-5, atol=1e-6)


def test_matches_torch_sgd():
    torch.manual_seed(0)
    w = torch.randn(513)
    opt = torch.optim.SGD([w.requires_grad_()], lr=0.05, momentum=0.9, weight_decay=1e-3)
    p, buf = w.detach().clone().numpy(), np.zeros(513, np.float32)
    for step in range(4):
        g = torch.randn(513)
        w.grad = g.clone()
        opt.step()
        _C.sgd_step(p, g.numpy(), 0.05, buf, momentum=0.9, weight_decay=1e-3, first_step=step == 0)
    np.testing.assert_allclose(p, w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_updates_a_torch_tensor_in_place():
    t = torch.ones(10)
    hvdsgd.sgd_step(t.numpy(), np.ones(10, np.float32), 0.5)  # the package's public name
    assert torch.equal(t, torch.full((10,), 0.5))


def test_step_parameters_are_keyword_only():
    p = np.ones(8, np.float32)
    with pytest.raises(TypeError):  # momentum, weight_decay, first_step: by name only
        _C.sgd_step(p, np.ones(8, np.float32), 0.1, None, 0.9)
    assert (p == 1).all()


def test_wrong_dtype_is_an_error_not_a_silent_copy():
    p = np.ones(8, np.float64)
    with pytest.raises(TypeError):
        _C.sgd_step(p, np.ones(8, np.float32), 0.1)
    assert (p == 1).all()


def test_non_contiguous_and_read_only_are_errors():
    p = np.ones(16, np.float32)
    with pytest.raises(TypeError):
        _C.sgd_step(p[::2], np.ones(8, np.float32), 0.1)
    p.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _C.sgd_step(p, np.ones(16, np.float32), 0.1)


def test_size_mismatch_and_missing_buffer():
    p = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="grads has 7"):
        _C.sgd_step(p, np.ones(7, np.float32), 0.1)
    with pytest.raises(ValueError, match="momentum_buf"):
        _C.sgd_step(p, np.ones(8, np.float32), 0.1, momentum=0.9)
    with pytest.raises(TypeError, match="float32"):
        _C.sgd_step(p, np.ones(8, np.float32), 0.1, np.zeros(8), momentum=0.9)
