"""tightrope.bounds in one minute: bound a small Fashion-MNIST classifier.

Trains a small fully connected network for one epoch on Fashion-MNIST (a few seconds on a
CPU), then, for a few test images, bounds the classification margins z_y - z_j over the l_inf
ball of radius eps with IBP, CROWN-IBP, CROWN, alpha-CROWN and the LP relaxation, and prints
each method's bounds, verdicts and time.

    python examples/bounds_demo.py [--data DIR] [--eps 0.01] [--images 5] [--seed 0]

The data are the IDX files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); ``make demo`` installs it when missing.
"""

from __future__ import annotations

import argparse
import gzip
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tightrope.bounds import (
    Box,
    Normalize,
    alpha_crown,
    crown,
    crown_ibp,
    ibp,
    lp_bound,
    margin_spec,
)

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def read_idx(path: Path) -> Tensor:
    """Read a (gzipped) IDX file as a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).view(shape)


def load_split(root: Path, split: str) -> tuple[Tensor, Tensor]:
    """Images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)`` of the 'train' or 't10k' split."""
    def find(kind: str) -> Path:
        for name in (f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                     f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (root / name).exists():
                return root / name
        raise FileNotFoundError(
            f"Fashion-MNIST {split} {kind} not found in {root}: install the Debian package "
            "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or pass --data "
            "with a directory holding the IDX files"
        )

    images = read_idx(find("images")).unsqueeze(1).float() / 255
    labels = read_idx(find("labels")).long()
    return images, labels


def build_model() -> nn.Sequential:
    return nn.Sequential(
        Normalize([0.286], [0.353]),
        nn.Flatten(),
        nn.Linear(784, 100), nn.ReLU(),
        nn.Linear(100, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


def train_one_epoch(model: nn.Module, images: Tensor, labels: Tensor, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(images), 128):
        batch = order[start : start + 128]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"directory of the Fashion-MNIST IDX files (default {DEFAULT_DATA})")
    parser.add_argument("--eps", type=float, default=0.01, help="l_inf radius in [0, 1] pixels")
    parser.add_argument("--images", type=int, default=5, help="test images to bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run")
    args = parser.parse_args(argv)
    if not 0 <= args.eps <= 1:
        parser.error(f"--eps must lie in [0, 1], got {args.eps}")
    if not 1 <= args.images <= 20:
        parser.error(f"--images must lie in [1, 20] (one table column each), got {args.images}")

    try:
        train_x, train_y = load_split(args.data, "train")
        test_x, test_y = load_split(args.data, "t10k")
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    torch.manual_seed(args.seed)
    model = build_model()
    started = time.perf_counter()
    train_one_epoch(model, train_x, train_y, args.seed)
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    print(f"trained a 784-100-100-10 ReLU net for one epoch in "
          f"{time.perf_counter() - started:.1f} s; test accuracy {accuracy:.1%}")

    x, y = test_x[: args.images], test_y[: args.images]
    box = Box.from_linf(x, args.eps)
    spec = margin_spec(y, 10)
    methods: list[tuple[str, Callable[[], Box]]] = [
        ("IBP", lambda: ibp(model, box, spec)),
        ("CROWN-IBP", lambda: crown_ibp(model, box, spec)),
        ("CROWN", lambda: crown(model, box, spec)),
        ("alpha-CROWN", lambda: alpha_crown(model, box, spec, steps=50)),
        ("LP (HiGHS)", lambda: lp_bound(model, box, spec, upper=False)),
    ]
    print(f"\nlower bounds on the worst margin min_j (z_y - z_j) over the eps={args.eps} ball "
          "(> 0: verified robust)")
    header = f"{'method':<12}{'time':>9}  " + "".join(
        f"{f'#{i} {CLASSES[int(label)]}':>14}" for i, label in enumerate(y)
    )
    print(header)
    with torch.no_grad():
        clean = model(x)
        margins = (spec @ clean.unsqueeze(-1)).squeeze(-1).min(dim=1).values
    print(f"{'clean point':<12}{'':>9}  " + "".join(f"{float(m):>14.3f}" for m in margins))
    for name, compute in methods:
        started = time.perf_counter()
        with torch.no_grad() if name != "alpha-CROWN" else torch.enable_grad():
            bounds = compute()
        elapsed = time.perf_counter() - started
        worst = bounds.lower.detach().min(dim=1).values
        cells = "".join(f"{float(v):>13.3f}{'*' if v > 0 else ' '}" for v in worst)
        print(f"{name:<12}{elapsed * 1e3:>7.1f}ms  {cells}")
    print("\n* verified. Every bound is sound; tighter methods cost more. See README.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
