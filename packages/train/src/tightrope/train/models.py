"""The architectures of the certified-training literature, built by name so that a checkpoint
can rebuild its model: CNN3 and CNN7 (Shi et al. 2021, "Fast Certified Robust Training with
Short Warmup"; used by SABR, TAPS, the expressive losses and CTBench), a small MLP, and
residual networks: ``resnet`` with the ``resnet2b``/``resnet4b`` shapes of VNN-COMP 2021's
``cifar10_resnet`` benchmark (Wang et al. 2021, beta-CROWN).

Every model is an ``nn.Sequential`` whose first layer is ``tightrope.bounds.Normalize`` (inputs
stay in ``[0, 1]``), made only of layers the bound propagation accepts; a residual block is one
layer of it (:class:`ResidualBlock`), so a TAPS split falls between blocks.

Example::

    model = build_model("cnn7", in_channels=3, input_size=32, num_classes=10,
                        mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from tightrope.bounds import Normalize

__all__ = ["MODELS", "ResidualBlock", "build_model", "cnn3", "cnn7", "mlp", "resnet"]


def cnn3(
    *, in_channels: int, input_size: int, num_classes: int, mean: Sequence[float],
    std: Sequence[float], width: int = 16,
) -> nn.Sequential:
    """CNN3 (Shi et al. 2021): Normalize -> Conv(w,5,s2,p2)-BN-ReLU -> Conv(2w,4,s2,p1)-BN-ReLU
    -> Flatten -> Linear(K); ``w = 16``. Input ``(B, in_channels, input_size, input_size)``,
    ``input_size`` divisible by 4."""
    if input_size % 4:
        raise ValueError(f"cnn3 needs input_size divisible by 4, got {input_size}")
    _check_width("cnn3", "width", width)
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(in_channels, width, 5, 2, 2), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * (input_size // 4) ** 2, num_classes),
    )


def cnn7(
    *, in_channels: int, input_size: int, num_classes: int, mean: Sequence[float],
    std: Sequence[float], width: int = 64, linear_width: int = 512,
    fifth_stride: int | None = None,
) -> nn.Sequential:
    """CNN7 (Shi et al. 2021): Normalize -> Conv(w,3,1,1)-BN-ReLU -> Conv(w,3,1,1)-BN-ReLU ->
    Conv(2w,3,2,1)-BN-ReLU -> Conv(2w,3,1,1)-BN-ReLU -> Conv(2w,3,s5,1)-BN-ReLU -> Flatten ->
    Linear(512)-BN1d-ReLU -> Linear(K), ``w = 64``.

    ``fifth_stride`` is 1 for MNIST/CIFAR shapes and 2 for TinyImageNet (the default picks 2 for
    inputs of 64 px and more). Input ``(B, in_channels, input_size, input_size)``.
    """
    _check_width("cnn7", "width", width)
    _check_width("cnn7", "linear_width", linear_width)
    stride5 = fifth_stride if fifth_stride is not None else (2 if input_size >= 64 else 1)
    if stride5 not in (1, 2):
        raise ValueError(f"fifth_stride must be 1 or 2, got {stride5}")
    layers: list[nn.Module] = [Normalize(mean, std)]
    channels = in_channels
    size = input_size
    for out, stride in [(width, 1), (width, 1), (2 * width, 2), (2 * width, 1),
                        (2 * width, stride5)]:
        layers += [nn.Conv2d(channels, out, 3, stride, 1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
        size = (size - 1) // stride + 1
    layers += [
        nn.Flatten(),
        nn.Linear(channels * size * size, linear_width), nn.BatchNorm1d(linear_width), nn.ReLU(),
        nn.Linear(linear_width, num_classes),
    ]
    return nn.Sequential(*layers)


def mlp(
    *, in_channels: int, input_size: int, num_classes: int, mean: Sequence[float],
    std: Sequence[float], hidden: Sequence[int] = (100, 100),
) -> nn.Sequential:
    """A fully connected ReLU network: Normalize -> Flatten -> (Linear-ReLU) per hidden width ->
    Linear(K)."""
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
        raise ValueError(f"mlp: hidden must be a list of layer widths, got {hidden!r}")
    for width in hidden:
        _check_width("mlp", "hidden", width)
    layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
    features = in_channels * input_size * input_size
    for width in hidden:
        layers += [nn.Linear(features, int(width)), nn.ReLU()]
        features = int(width)
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``relu(conv2(relu(conv1(x))) + shortcut(x))`` with 3x3 convolutions (the first with
    ``stride``), optional BatchNorm after each, and a shortcut that is the identity or, when
    the shape changes, a strided 1x1 convolution (He et al. 2016's option B)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 batch_norm: bool = False) -> None:
        super().__init__()

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride),
                                          norm(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        inner = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(inner + self.shortcut(x))


def resnet(
    *, in_channels: int, input_size: int, num_classes: int, mean: Sequence[float],
    std: Sequence[float], blocks: int = 2, width: int = 8, linear_width: int = 100,
    batch_norm: bool = False,
) -> nn.Sequential:
    """A residual network in the shape of VNN-COMP 2021's ``cifar10_resnet`` nets: Normalize ->
    Conv(w,3,s2,p1)-ReLU -> ResidualBlock(w -> 2w, stride 2) -> ``blocks - 1`` x
    ResidualBlock(2w) -> Flatten -> Linear(linear_width)-ReLU -> Linear(K). ``blocks=2,
    width=8`` is ``resnet_2b``; ``batch_norm`` adds BatchNorm after every convolution (for
    training). Input ``(B, in_channels, input_size, input_size)``, ``input_size`` divisible
    by 4."""
    if input_size % 4:
        raise ValueError(f"resnet needs input_size divisible by 4, got {input_size}")
    for name, value in (("blocks", blocks), ("width", width), ("linear_width", linear_width)):
        _check_width("resnet", name, value)
    layers: list[nn.Module] = [Normalize(mean, std), nn.Conv2d(in_channels, width, 3, 2, 1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(width))
    layers += [nn.ReLU(), ResidualBlock(width, 2 * width, 2, batch_norm)]
    layers += [ResidualBlock(2 * width, 2 * width, 1, batch_norm) for _ in range(blocks - 1)]
    size = input_size // 4
    layers += [nn.Flatten(), nn.Linear(2 * width * size * size, linear_width), nn.ReLU(),
               nn.Linear(linear_width, num_classes)]
    return nn.Sequential(*layers)


def resnet2b(**options: Any) -> nn.Sequential:
    """:func:`resnet` with 2 residual blocks (``resnet_2b``)."""
    return resnet(**{"blocks": 2, **options})


def resnet4b(**options: Any) -> nn.Sequential:
    """:func:`resnet` with 4 residual blocks (``resnet_4b``'s depth)."""
    return resnet(**{"blocks": 4, **options})


def _check_width(model: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{model}: {name} must be a positive integer, got {value!r}")


MODELS: Mapping[str, Callable[..., nn.Sequential]] = MappingProxyType(
    {"cnn3": cnn3, "cnn7": cnn7, "mlp": mlp, "resnet": resnet, "resnet2b": resnet2b,
     "resnet4b": resnet4b}
)


def build_model(
    name: str, *, in_channels: int, input_size: int, num_classes: int,
    mean: Sequence[float], std: Sequence[float], **kwargs: Any,
) -> nn.Sequential:
    """The model registered as ``name`` (``"cnn3"``, ``"cnn7"``, ``"mlp"``, ``"resnet"``,
    ``"resnet2b"``, ``"resnet4b"``) with its options.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or an option value the
            architecture cannot take (a width that is not a positive integer).
        TypeError: an option the architecture does not take.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels=in_channels, input_size=input_size,
                        num_classes=num_classes, mean=list(mean), std=list(std), **kwargs)
