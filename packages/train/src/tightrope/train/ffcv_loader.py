"""FFCV loaders (Leclerc et al. 2023, "FFCV: Accelerating Training by Removing Data
Bottlenecks"): each split is written once as a ``.beton`` file into a cache directory and read
back by FFCV's compiled, multi-threaded pipeline; later runs reuse the file.

Images are stored as ``uint8`` arrays ``(C, H, W)``; batches are turned into ``float`` in
``[0, 1]`` and augmented on the training device by the same code as the in-memory loader
(:func:`tightrope.train.random_crop_flip`). Needs the optional extra ``tightrope-train[ffcv]``
(``pip install ffcv==1.0.2``, which builds against ``pkg-config``, ``libturbojpeg`` and OpenCV
headers; ``scripts/setup.sh --ffcv`` installs them).

Differences from :class:`tightrope.train.TensorLoader`: FFCV draws its own permutation per epoch
(seeded by ``seed`` and the epoch), so resuming inside an epoch continues with the same batches
only approximately; epoch-boundary resumption and the data seen per epoch are unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tightrope.train.data import Augmentation, ImageData
from tightrope.train.loader import Shard, _key, random_crop_flip

__all__ = ["FFCVLoader", "ffcv_available", "write_beton"]


def ffcv_available() -> bool:
    """Whether the ``ffcv`` package imports."""
    try:
        import ffcv  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def _require_ffcv() -> None:
    if not ffcv_available():
        raise ImportError(
            "the FFCV loader needs ffcv: `pip install 'tightrope-train[ffcv]'` (builds against "
            "pkg-config, libturbojpeg and OpenCV headers: `apt-get install pkg-config "
            "libturbojpeg0-dev libopencv-dev`, or run scripts/setup.sh --ffcv); or set "
            "data.loader: tensor"
        )


class _Indexed:
    def __init__(self, data: ImageData) -> None:
        self.images = data.images.numpy()
        self.labels = data.labels.numpy()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


def beton_name(data: ImageData, tag: str) -> str:
    """A file name that changes whenever the split's content does (content hash)."""
    digest = hashlib.sha1(data.images.numpy().tobytes())
    digest.update(data.labels.numpy().tobytes())
    return f"{tag}-{len(data)}-{digest.hexdigest()[:12]}.beton"


def write_beton(data: ImageData, path: str | Path) -> Path:
    """Write ``data`` as an FFCV ``.beton`` file (``image``: uint8 ``(C, H, W)``, ``label``)
    unless it exists; returns the path."""
    _require_ffcv()
    from ffcv.fields import IntField, NDArrayField  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from ffcv.writer import DatasetWriter  # type: ignore[import-untyped,import-not-found,unused-ignore]

    target = Path(path)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    shape = tuple(int(v) for v in data.images.shape[1:])
    writer = DatasetWriter(str(temporary), {
        "image": NDArrayField(dtype=np.dtype("uint8"), shape=shape),
        "label": IntField(),
    }, num_workers=1)
    writer.from_indexed_dataset(_Indexed(data))
    temporary.replace(target)
    return target


class FFCVLoader:
    """Batches ``(x, y)`` from a ``.beton`` file, with :class:`~tightrope.train.TensorLoader`'s
    interface (``epoch(e, start)``, ``len``): ``x: (b, C, H, W)`` in ``[0, 1]`` of ``dtype`` on
    ``device``, ``y: (b,)``.

    Args:
        data: the split; written to ``cache_dir`` on first use (content-hashed name).
        cache_dir: where ``.beton`` files live.
        tag: a readable prefix of the file name (e.g. ``"cifar10-train"``).
        workers: FFCV's decoding threads.
        Others as :class:`~tightrope.train.TensorLoader`.
    """

    def __init__(
        self,
        data: ImageData,
        *,
        cache_dir: str | Path,
        tag: str,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        augmentation: Augmentation = Augmentation.NONE,
        crop_padding: int = 0,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        shard: Shard | None = None,
        workers: int = 4,
    ) -> None:
        _require_ffcv()
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder  # type: ignore[import-untyped,import-not-found,unused-ignore]
        from ffcv.loader import Loader, OrderOption  # type: ignore[import-untyped,import-not-found,unused-ignore]
        from ffcv.transforms import Squeeze, ToTensor  # type: ignore[import-untyped,import-not-found,unused-ignore]

        self.path = write_beton(data, Path(cache_dir) / beton_name(data, tag))
        self.shard = shard if shard is not None else Shard()
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = seed
        self.augmentation = augmentation
        self.crop_padding = crop_padding
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.samples_per_epoch = len(data) // self.shard.world
        pipelines: dict[str, list[Any]] = {
            "image": [NDArrayDecoder(), ToTensor()],
            "label": [IntDecoder(), ToTensor(), Squeeze()],
        }
        self._loader = Loader(
            str(self.path), batch_size=batch_size, num_workers=workers,
            order=OrderOption.RANDOM if shuffle else OrderOption.SEQUENTIAL,
            # Several processes: FFCV shards each epoch's order itself (torch.distributed).
            seed=seed, distributed=self.shard.world > 1, pipelines=pipelines,
            drop_last=drop_last,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``epoch`` from batch ``start`` on (FFCV's own order for the epoch)."""
        self._loader.next_epoch = epoch
        for index, (images, labels) in enumerate(self._loader):
            if index < start:
                continue
            x = images.to(self.device, non_blocking=True).to(self.dtype).div_(255.0)
            if self.augmentation is Augmentation.CROP_FLIP:
                generator = torch.Generator().manual_seed(_key(self.seed, epoch, index, 1))
                x = random_crop_flip(x, self.crop_padding, generator)
            # FFCV reuses its batch buffers: copy the labels out before the next batch fills them.
            yield x, labels.to(self.device, dtype=torch.int64, copy=True)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.epoch(0)
