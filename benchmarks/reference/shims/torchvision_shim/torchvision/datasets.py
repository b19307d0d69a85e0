"""torchvision.datasets stand-in: MNIST / FashionMNIST from torchvision-layout IDX files."""
import os
import struct
from typing import ClassVar

import numpy as np
import torch

__all__ = ["CIFAR10", "MNIST", "SVHN", "FashionMNIST", "ImageFolder"]


def _read_idx(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return torch.from_numpy(arr.copy())


class MNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST: uint8 ``data`` (N, 28, 28), int64 ``targets``; ``__getitem__``
    returns ``(transform(img), target)`` where ``img`` is the (28, 28) uint8 tensor (torchvision
    gives a PIL image; ``transforms.ToTensor`` below treats both the same way)."""

    classes: ClassVar[list[str]] = [f"{i} - {w}" for i, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])]
    folder = "MNIST"

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        root = os.environ.get("REF_MNIST_ROOT", root)
        self.root = root
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        raw = os.path.join(os.path.expanduser(root), self.folder, "raw")
        prefix = "train" if train else "t10k"
        images = os.path.join(raw, f"{prefix}-images-idx3-ubyte")
        labels = os.path.join(raw, f"{prefix}-labels-idx1-ubyte")
        if not (os.path.isfile(images) and os.path.isfile(labels)):
            raise RuntimeError(f"MNIST IDX files not found in {raw} (this shim never downloads; "
                               "run benchmarks/reference/setup.sh, which writes and links it)")
        self.data = _read_idx(images)
        self.targets = _read_idx(labels).long()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = self.data[index], int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


class FashionMNIST(MNIST):
    folder = "FashionMNIST"


class _Missing(torch.utils.data.Dataset):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is not available in the torchvision shim "
                                  "(benchmarks/reference/shims/torchvision_shim): MNIST only")


class CIFAR10(_Missing):
    pass


class SVHN(_Missing):
    pass


class ImageFolder(_Missing):
    pass
