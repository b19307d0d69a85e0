"""The in-memory loader: coverage, keyed reproducibility, resumption, sharding, augmentation."""

from __future__ import annotations

import torch

from tightrope.train import ImageData, Shard, TensorLoader, random_crop_flip
from tightrope.train.data import Augmentation


def _data(n: int = 50) -> ImageData:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return ImageData(images, torch.arange(n))


def test_every_sample_once_per_epoch_and_epochs_differ() -> None:
    loader = TensorLoader(_data(), batch_size=8, shuffle=True, seed=1)
    assert len(loader) == 7
    seen = [torch.cat([y for _, y in loader.epoch(e)]) for e in (0, 1)]
    for labels in seen:
        assert sorted(labels.tolist()) == list(range(50))
    assert not torch.equal(seen[0], seen[1])
    x, y = next(iter(loader.epoch(0)))
    assert x.dtype == torch.float32
    assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())


def test_drop_last_and_keyed_resumption() -> None:
    loader = TensorLoader(_data(), batch_size=8, shuffle=True, seed=2, drop_last=True,
                          augmentation=Augmentation.CROP_FLIP, crop_padding=1)
    assert len(loader) == 6
    full = list(loader.epoch(3))
    tail = list(loader.epoch(3, start=4))
    assert len(tail) == 2
    for (xa, ya), (xb, yb) in zip(full[4:], tail, strict=True):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
    other = TensorLoader(_data(), batch_size=8, shuffle=True, seed=2, drop_last=True,
                         augmentation=Augmentation.CROP_FLIP, crop_padding=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, other.epoch(3), strict=True))


def test_shards_partition_the_epoch() -> None:
    parts = [TensorLoader(_data(), batch_size=5, shuffle=True, seed=4, shard=Shard(r, 2))
             for r in range(2)]
    labels = [torch.cat([y for _, y in part.epoch(0)]) for part in parts]
    assert len(labels[0]) == len(labels[1]) == 25
    assert sorted(torch.cat(labels).tolist()) == list(range(50))


def test_crop_flip_takes_windows_of_the_edge_padded_image() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, 5, 6)
    out = random_crop_flip(x, padding=2, generator=generator)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(64):
        windows = [padded[i, :, r : r + 5, c : c + 6] for r in range(5) for c in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[i], w) for w in candidates)
    # Not the identity for every image, and flips happen about half the time.
    assert not torch.equal(out, x)
    flipped = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(1))
    is_flipped = [torch.equal(flipped[i], x[i].flip(2)) for i in range(64)]
    is_same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_flipped, is_same, strict=True))
    assert 16 < sum(is_flipped) < 48
