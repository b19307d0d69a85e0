"""A batched, shuffled loader over in-memory tensors, resident on the training device.

The whole data set lives on the device as ``uint8`` (70k MNIST images are 55 MB, CIFAR-10's 50k
are 150 MB); each batch is gathered by index, converted to ``float`` in ``[0, 1]`` and augmented
on the device, so the loader never starves a GPU and needs no worker processes.

Randomness is keyed, not streamed: the permutation of epoch ``e`` comes from a generator seeded
with ``(seed, e)`` and the augmentation of batch ``b`` from ``(seed, e, b)``. Any batch of any
epoch can therefore be reproduced without replaying the batches before it, which is what makes a
resumed run identical to an uninterrupted one.

Augmentation (Shi et al. 2021; Mueller et al. 2023; De Palma et al. 2024): CIFAR-10 a random crop
of the original size from the image padded by 2 edge pixels plus a horizontal flip; TinyImageNet
crop 64 with 4 px of padding plus flip; MNIST-like sets none.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tightrope.train.data import Augmentation, ImageData

__all__ = ["Shard", "TensorLoader", "random_crop_flip"]

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, epoch, batch) over seeds


def _key(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _MIX + part + 1) % (2**63 - 1)
    return value


def random_crop_flip(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of the original size after ``padding`` px of edge padding, and a random
    horizontal flip with probability 1/2, independently per image.

    Args:
        x: ``(B, C, H, W)`` images.
        padding: pixels of replicated border on each side (0: flip only).
        generator: the source of the offsets and flips (on any device; draws happen on CPU).

    Returns:
        ``(B, C, H, W)`` augmented images on ``x``'s device.
    """
    batch, channels, height, width = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    device = x.device
    offsets, flips = offsets.to(device), flips.to(device)
    if padding > 0:
        padded = F.pad(x.float() if not x.is_floating_point() else x,
                       (padding,) * 4, mode="replicate")
        rows = offsets[0].view(-1, 1) + torch.arange(height, device=device).view(1, -1)
        cols = offsets[1].view(-1, 1) + torch.arange(width, device=device).view(1, -1)
        cols = torch.where(flips.view(-1, 1), cols.flip(1), cols)
        padded_width = width + 2 * padding
        flat = (rows.view(batch, height, 1) * padded_width + cols.view(batch, 1, width))
        index = flat.view(batch, 1, height * width).expand(batch, channels, height * width)
        out = padded.flatten(2).gather(2, index).view(batch, channels, height, width)
        return out.to(x.dtype)
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)


@dataclass(frozen=True, slots=True)
class Shard:
    """This process's part of the data under data parallelism: every ``world``-th sample of the
    epoch's permutation from ``rank`` on (the permutation is the same in every process)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank={self.rank}, world={self.world}")


class TensorLoader:
    """Batches of ``(x, y)``: ``x: (b, C, H, W)`` in ``[0, 1]`` of ``dtype`` on ``device``,
    ``y: (b,)``.

    Args:
        data: the images (``uint8``) and labels; copied to ``device`` once.
        batch_size: samples per batch (per process under a :class:`Shard`).
        shuffle: draw a new permutation every epoch (else the stored order).
        seed: the key of every random draw (permutations, augmentation).
        augmentation, crop_padding: see :func:`random_crop_flip`.
        drop_last: drop a final incomplete batch (training) or keep it (evaluation).
        device, dtype: where and in which float type batches are produced.
        shard: this process's share under data parallelism (default: everything).

    Use ``loader.epoch(e)`` for epoch ``e``'s batches, ``loader.epoch(e, start=k)`` to skip the
    first ``k`` (resumption); ``len(loader)`` is the number of batches per epoch.
    """

    def __init__(
        self,
        data: ImageData,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        augmentation: Augmentation = Augmentation.NONE,
        crop_padding: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        shard: Shard | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augmentation = augmentation
        self.crop_padding = crop_padding
        self.drop_last = drop_last
        self.dtype = dtype
        self.shard = shard if shard is not None else Shard()
        per_process = len(data) // self.shard.world
        if per_process == 0:
            raise ValueError(
                f"{len(data)} samples cannot be split over {self.shard.world} processes"
            )
        self.samples_per_epoch = per_process

    def __len__(self) -> int:
        full, rest = divmod(self.samples_per_epoch, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch: int) -> Tensor:
        """This process's sample indices of ``epoch``, ``(samples_per_epoch,)`` on the device."""
        total = self.images.shape[0]
        if self.shuffle:
            generator = torch.Generator().manual_seed(_key(self.seed, epoch))
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        usable = self.samples_per_epoch * self.shard.world
        return order[:usable][self.shard.rank :: self.shard.world].to(self.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``epoch`` from batch index ``start`` on."""
        order = self.order(epoch)
        for index in range(start, len(self)):
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
            x = self.images[chosen].to(self.dtype).div_(255.0)
            if self.augmentation is Augmentation.CROP_FLIP:
                generator = torch.Generator().manual_seed(_key(self.seed, epoch, index, 1))
                x = random_crop_flip(x, self.crop_padding, generator)
            yield x, self.labels[chosen]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.epoch(0)
