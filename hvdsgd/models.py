"""The model zoo: every network the trainer can run, built by name for a given input shape.

``build(name, (C, H, W), num_classes)`` returns an ``nn.Module`` mapping float tensors of shape
``(N, C, H, W)`` to logits ``(N, num_classes)``. Models with a fixed :func:`input_size` need
their inputs resized to that square size (28 for the MNIST-style nets, 32 for the CIFAR-style
ones); ``mlp`` takes any size. The torchvision networks are adapted to small inputs and to any
channel count (stride-1 stem, as in the usual CIFAR variants); all start from random weights.
"""

from __future__ import annotations

import math
import operator
from typing import Callable

import torch
from torch import nn

from hvdsgd.errors import UsageError

Shape = tuple[int, int, int]

_VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ],
}


def _mlp(shape: Shape, k: int) -> nn.Module:
    """One hidden layer of 50 ReLU units, as in the MPI experiments.

    L2 regularisation is not part of the model: it comes from the optimizer's weight decay.
    """
    c, h, w = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 50), nn.ReLU(), nn.Linear(50, k))


def _cnn(shape: Shape, k: int) -> nn.Module:
    """Two 5x5 conv + max-pool blocks (16, 32 channels) and one linear layer, for 28x28."""
    return nn.Sequential(
        nn.Conv2d(shape[0], 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, k),
    )


def _lenet(shape: Shape, k: int) -> nn.Module:
    """LeNet-5 for 28x28 inputs, with ReLU and max-pooling."""
    return nn.Sequential(
        nn.Conv2d(shape[0], 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14 -> 10 -> 5
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, k),
    )


def _alexnet(shape: Shape, k: int) -> nn.Module:
    """AlexNet for 32x32: five 3x3 convs (no BatchNorm), three max-pools, dropout classifier."""
    return nn.Sequential(
        nn.Conv2d(shape[0], 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 32 -> 16
        nn.Conv2d(64, 192, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 16 -> 8
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 8 -> 4
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(256 * 4 * 4, 1024),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(1024, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, k),
    )


def _vgg(name: str) -> Callable[[Shape, int], nn.Module]:
    """CIFAR VGG with BatchNorm: 3x3 convs per the cfg list, 'M' = 2x2 max-pool, Linear(512, k)."""

    def build_vgg(shape: Shape, k: int) -> nn.Module:
        layers: list[nn.Module] = []
        c = shape[0]
        for v in _VGG_CFG[name]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, k))  # 32 / 2**5 = 1x1x512

    build_vgg.__doc__ = f"{name}: " + (_vgg.__doc__ or "")
    return build_vgg


def _stem(old: nn.Conv2d, in_channels: int, kernel_size: int, padding: int) -> nn.Conv2d:
    """A stride-1 replacement for a torchvision first conv, initialised as torchvision does."""
    conv = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size,
        stride=1,
        padding=padding,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _torchvision(name: str) -> Callable[..., nn.Module]:
    """``torchvision.models.<name>``, imported on first use: importing torchvision takes about
    a second, which every process (Horovod rank, HOGWILD worker, task worker) would pay."""

    def ctor(**kw) -> nn.Module:
        from torchvision import models as tvm

        return getattr(tvm, name)(**kw)

    return ctor


def _resnet(ctor: Callable[..., nn.Module]) -> Callable[[Shape, int], nn.Module]:
    """torchvision ResNet, CIFAR variant: 3x3 stride-1 conv1 taking C channels, no max-pool."""

    def build_resnet(shape: Shape, k: int) -> nn.Module:
        model = ctor(weights=None, num_classes=k)
        model.conv1 = _stem(model.conv1, shape[0], 3, 1)
        model.maxpool = nn.Identity()
        return model

    return build_resnet


def _first_conv_stride1(ctor: Callable[..., nn.Module]) -> Callable[[Shape, int], nn.Module]:
    """torchvision MobileNetV2 / EfficientNet with a stride-1 first conv taking C channels."""

    def build_net(shape: Shape, k: int) -> nn.Module:
        model = ctor(weights=None, num_classes=k)
        first = model.features[0][0]
        model.features[0][0] = _stem(first, shape[0], first.kernel_size[0], first.padding[0])
        return model

    return build_net


def _resnet50_narrow(shape: Shape, k: int) -> nn.Module:
    """ResNet-50's depth (3-4-6-3 torchvision bottlenecks) at an eighth of its width (8, 16, 32,
    64 planes; about 1/64 of the weights), CIFAR stem: ResNet-50 sized for a CPU. Each block's
    last BatchNorm starts at 0 (torchvision's ``zero_init_residual``, Goyal et al. 2017), so the
    16 blocks start as identities: on digits it trains at lr 0.1 from 20 warm-up updates on."""
    from torchvision.models.resnet import Bottleneck

    inplanes = width = 8
    layers: list[nn.Module] = [
        nn.Conv2d(shape[0], width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    ]
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            down = None
            if stride != 1 or inplanes != planes * Bottleneck.expansion:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * Bottleneck.expansion),
                )
            layers.append(Bottleneck(inplanes, planes, stride, down))
            inplanes = planes * Bottleneck.expansion
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, k))
    for m in model.modules():  # as torchvision's ResNet(zero_init_residual=True)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)
    return model


def _efficientnet_b0_narrow(shape: Shape, k: int) -> nn.Module:
    """EfficientNet-B0's 7 MBConv stages (16 blocks with squeeze-excitation) at half the width,
    without stochastic depth and dropout (regularisers that hold a short run back), stride-1
    first conv taking C channels: EfficientNet-B0 sized for a CPU."""
    from functools import partial

    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    conf = partial(MBConvConfig, width_mult=0.5, depth_mult=1.0)
    stages = [  # B0's: expand ratio, kernel, stride, channels in, out, blocks
        conf(1, 3, 1, 32, 16, 1),
        conf(6, 3, 2, 16, 24, 2),
        conf(6, 5, 2, 24, 40, 2),
        conf(6, 3, 2, 40, 80, 3),
        conf(6, 5, 1, 80, 112, 3),
        conf(6, 5, 2, 112, 192, 4),
        conf(6, 3, 1, 192, 320, 1),
    ]
    model = EfficientNet(stages, dropout=0.0, stochastic_depth_prob=0.0, num_classes=k)
    first = model.features[0][0]
    model.features[0][0] = _stem(first, shape[0], first.kernel_size[0], first.padding[0])
    return model


def _vit_sized(
    layers: int, heads: int, width: int, mlp: int, patch: int = 4
) -> Callable[[Shape, int], nn.Module]:
    """A Vision Transformer for 32x32 inputs taking C channels, in patches of ``patch`` pixels
    (4: 64 tokens; 8: 16)."""

    def build_vit(shape: Shape, k: int) -> nn.Module:
        from torchvision.models import VisionTransformer

        model = VisionTransformer(
            image_size=32,
            patch_size=patch,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=width,
            mlp_dim=mlp,
            num_classes=k,
        )
        conv = nn.Conv2d(shape[0], width, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(conv.weight, std=math.sqrt(1 / (shape[0] * patch * patch)))
        nn.init.zeros_(conv.bias)
        model.conv_proj = conv
        return model

    return build_vit


# name -> (builder(input_shape, num_classes), required square input size or None)
_REGISTRY: dict[str, tuple[Callable[[Shape, int], nn.Module], int | None]] = {
    "mlp": (_mlp, None),
    "cnn": (_cnn, 28),
    "lenet": (_lenet, 28),
    "alexnet": (_alexnet, 32),
    "vgg11": (_vgg("vgg11"), 32),
    "vgg16": (_vgg("vgg16"), 32),
    "mobilenet_v2": (_first_conv_stride1(_torchvision("mobilenet_v2")), 32),
    "resnet18": (_resnet(_torchvision("resnet18")), 32),
    "resnet50": (_resnet(_torchvision("resnet50")), 32),
    "resnet50_narrow": (_resnet50_narrow, 32),
    "efficientnet_b0": (_first_conv_stride1(_torchvision("efficientnet_b0")), 32),
    "efficientnet_b0_narrow": (_efficientnet_b0_narrow, 32),
    # Small ViT: 6 layers, 8 heads, width 256, MLP 512, 4x4 patches; tiny (a CPU's): 4 layers,
    # 4 heads, width 128, MLP 256, 8x8 patches (16 tokens: digits are 8x8 images scaled up 4x)
    "vit": (_vit_sized(6, 8, 256, 512), 32),
    "vit_tiny": (_vit_sized(4, 4, 128, 256, patch=8), 32),
}

NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _entry(name: str) -> tuple[Callable[[Shape, int], nn.Module], int | None]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(NAMES)}") from None


def input_size(name: str) -> int | None:
    """Spatial size (H == W) the model needs its input resized to, or None if it takes any size."""
    return _entry(name)[1]


def build(name: str, input_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
    """Model `name` for inputs of shape (C, H, W) and `num_classes` outputs (logits)."""
    builder, size = _entry(name)
    try:
        c, h, w = (operator.index(d) for d in input_shape)
    except (TypeError, ValueError):
        raise UsageError(
            f"model {name!r} needs an input shape (C, H, W) of integers, got {input_shape!r}"
        ) from None
    if c < 1 or h < 1 or w < 1:
        raise UsageError(
            f"model {name!r} needs at least 1 input channel and a positive "
            f"height and width, got {(c, h, w)}"
        )
    if size is not None and (h, w) != (size, size):
        raise UsageError(
            f"model {name!r} needs {size}x{size} inputs, got {h}x{w}; "
            f"resize the data to {size}x{size}"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise UsageError(f"model {name!r} needs at least 2 classes, got {num_classes!r}")
    return builder((c, h, w), num_classes)
