"""Write MNIST as torchvision-layout IDX files (<split>/MNIST/raw/{train,t10k}-{images-idx3,
labels-idx1}-ubyte) through tightrope's own loader, so that the reference repositories train on
exactly our data. Run with our venv, from the repository root:

  .venv/bin/python benchmarks/reference/make_mnist_idx.py [--out DIR]   # DIR: $REF_ROOT/data

Writes under DIR
  mnist_ours/MNIST/raw      train = our 55,000-image training split
                            (load_splits(mnist, validation_size=5000, seed=0)), "t10k" = our
                            5,000-image VALIDATION split (so the references' per-epoch "test"
                            metrics and their best-checkpoint choice are on our validation
                            split, never on the real test set)
  mnist_official/MNIST/raw  the usual 60,000 train / 10,000 test
  mnist_smoke/MNIST/raw     first 1,024 of our training split / first 512 of our validation
                            split (smoke tests only)
"""
import argparse
import os
import struct
from pathlib import Path

import torch

from tightrope.train.data import DatasetName, load_splits


def write_idx(folder: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """images: (N, 1, 28, 28) uint8 pixels; labels: (N,) in 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = images.reshape(-1, 28, 28).to(torch.uint8).numpy()
    targets = labels.to(torch.uint8).numpy()
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(pixels), 28, 28))
        f.write(pixels.tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 2049, len(targets)))
        f.write(targets.tobytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path,
                   default=Path(os.environ.get("REF_ROOT", "/work/ref")) / "data",
                   help="output folder (default $REF_ROOT/data)")
    root = p.parse_args().out
    splits = load_splits(DatasetName.MNIST, None, validation_size=5000, seed=0)
    train, validation, test = splits.train, splits.validation, splits.test
    print("ours: train", tuple(train.images.shape), "validation", tuple(validation.images.shape),
          "test", tuple(test.images.shape))
    ours = root / "mnist_ours/MNIST/raw"
    write_idx(ours, "train", train.images, train.labels)
    write_idx(ours, "t10k", validation.images, validation.labels)
    full = load_splits(DatasetName.MNIST, None, validation_size=0, seed=0)
    official = root / "mnist_official/MNIST/raw"
    write_idx(official, "train", full.train.images, full.train.labels)
    write_idx(official, "t10k", full.test.images, full.test.labels)
    smoke = root / "mnist_smoke/MNIST/raw"
    write_idx(smoke, "train", train.images[:1024], train.labels[:1024])
    write_idx(smoke, "t10k", validation.images[:512], validation.labels[:512])
    print(f"wrote {ours.parent.parent}, {official.parent.parent}, {smoke.parent.parent}")


if __name__ == "__main__":
    main()
