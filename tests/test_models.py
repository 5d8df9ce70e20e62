"""The model zoo: every model builds, runs forward/backward, and rejects bad arguments."""

import pytest
import torch

from hvdsgd import models
from hvdsgd.errors import UsageError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _seed_one_thread():
    # One intra-op thread: on a small shared CPU box, extra OpenMP threads spin against other
    # processes and make these tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_in_order():
    assert models.NAMES == (
        "mlp",
        "cnn",
        "lenet",
        "alexnet",
        "vgg11",
        "vgg16",
        "mobilenet_v2",
        "resnet18",
        "resnet50",
        "resnet50_narrow",
        "efficientnet_b0",
        "efficientnet_b0_narrow",
        "vit",
        "vit_tiny",
    )


def test_cpu_sized_variants_keep_the_depth_at_a_fraction_of_the_width():
    """resnet50_narrow: ResNet-50's 16 bottlenecks at an eighth of the width (about 1/64 of the
    weights), each starting as an identity; efficientnet_b0_narrow: B0's 16 MBConv blocks at
    half the width, no stochastic depth; vit_tiny: 4 layers of width 128 in 16 tokens against
    vit's 6 of 256 in 64."""
    from torchvision.models.efficientnet import MBConv
    from torchvision.models.resnet import Bottleneck

    full, narrow = (models.build(n, (3, 32, 32), 10) for n in ("resnet50", "resnet50_narrow"))
    blocks = [m for m in narrow.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == sum(isinstance(m, Bottleneck) for m in full.modules()) == 16
    assert [b.conv2.out_channels for b in blocks[::5]] == [8, 16, 32, 64]  # one per stage
    assert 1 / 80 < _n_params(narrow) / _n_params(full) < 1 / 50
    assert all(not b.bn3.weight.any() for b in blocks)  # zero_init_residual: identities at first
    x = torch.randn(4, 3, 32, 32)
    assert torch.isfinite(narrow(x)).all()

    b0, half = (
        models.build(n, (3, 32, 32), 10) for n in ("efficientnet_b0", "efficientnet_b0_narrow")
    )
    mb = [m for m in half.modules() if isinstance(m, MBConv)]
    assert len(mb) == sum(isinstance(m, MBConv) for m in b0.modules()) == 16
    assert half.features[-1][0].out_channels * 2 == b0.features[-1][0].out_channels
    assert all(m.stochastic_depth.p == 0 for m in mb)
    assert half(x).shape == (4, 10)

    vit, tiny = (models.build(n, (1, 32, 32), 10) for n in ("vit", "vit_tiny"))
    assert (len(vit.encoder.layers), vit.hidden_dim, vit.seq_length) == (6, 256, 65)
    assert (len(tiny.encoder.layers), tiny.hidden_dim, tiny.seq_length) == (4, 128, 17)


def test_cnn_parameter_count():
    assert _n_params(models.build("cnn", (1, 28, 28), 10)) == 28938


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", models.NAMES)
def test_forward_backward(name, channels):
    size = models.input_size(name) or 8
    model = models.build(name, (channels, size, size), 10)
    model.train()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 9])).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname


def test_mlp_any_size():
    assert models.input_size("mlp") is None
    model = models.build("mlp", (2, 5, 7), 3)
    assert model(torch.randn(4, 2, 5, 7)).shape == (4, 3)


def test_unknown_name():
    with pytest.raises(UsageError) as e:
        models.build("nope", (1, 28, 28), 10)
    assert "'nope'" in str(e.value)
    for name in models.NAMES:
        assert name in str(e.value)
    with pytest.raises(UsageError):
        models.input_size("nope")


def test_wrong_input_size():
    with pytest.raises(UsageError, match="28"):
        models.build("cnn", (1, 8, 8), 10)
    with pytest.raises(UsageError, match="32"):
        models.build("resnet18", (3, 28, 28), 10)


@pytest.mark.parametrize(
    "shape, classes", [((1, 28, 28), 1), ((0, 28, 28), 10), ((28, 28), 10), ((1, 28, 28), 0)]
)
def test_bad_arguments(shape, classes):
    with pytest.raises(UsageError):
        models.build("cnn", shape, classes)
