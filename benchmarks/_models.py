"""The CNN3 and CNN7 architectures of Shi et al. 2021 (see METHODS.md), for benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from tightrope.bounds import Normalize


def cnn7(channels: int = 3, size: int = 32, classes: int = 10) -> nn.Sequential:
    """CNN7, CIFAR shape by default: 5 conv-BN-ReLU blocks, Linear(512)-BN-ReLU, Linear(K)."""
    layers: list[nn.Module] = [Normalize([0.5] * channels, [0.25] * channels)]
    width = channels
    for out, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (128, 1)]:
        layers += [nn.Conv2d(width, out, 3, stride, 1), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    layers += [
        nn.Flatten(),
        nn.Linear(128 * (size // 2) ** 2, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, classes),
    ]
    return nn.Sequential(*layers)


def cnn3(channels: int = 1, size: int = 28, classes: int = 10) -> nn.Sequential:
    """CNN3, MNIST shape by default: Conv(16,5,s2)-BN-ReLU, Conv(32,4,s2)-BN-ReLU, Linear(K)."""
    return nn.Sequential(
        Normalize([0.5] * channels, [0.25] * channels),
        nn.Conv2d(channels, 16, 5, 2, 2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * (size // 4) ** 2, classes),
    )


def random_eval_model(name: str, seed: int = 0) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A randomly initialised eval-mode model with random BatchNorm statistics, and its input
    shape (without batch)."""
    torch.manual_seed(seed)
    model, shape = (cnn7(), (3, 32, 32)) if name == "cnn7" else (cnn3(), (1, 28, 28))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.running_mean is not None
            assert module.running_var is not None
            with torch.no_grad():
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, shape
