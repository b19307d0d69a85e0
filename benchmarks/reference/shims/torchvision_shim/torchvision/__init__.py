"""Minimal stand-in for torchvision, for the reference repositories (benchmarks/reference).

torchvision's PyPI wheels do not import beside the CPU build of torch 2.13.0, and the reference
repositories use it only for MNIST loading (``datasets.MNIST`` + ``transforms.ToTensor``). This
shim reads the torchvision-format IDX files (``<root>/MNIST/raw/*-ubyte``) written by
benchmarks/reference/make_mnist_idx.py; nothing is downloaded. ``REF_MNIST_ROOT`` (if set)
replaces the ``root`` the repository passes (smoke tests point it at a small subset).
Everything else (CIFAR-10, ImageFolder, augmentations) raises.
"""
__version__ = "0.0-ref-shim"
from . import datasets, transforms  # noqa: F401
