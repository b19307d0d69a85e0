"""Loader throughput (images/s) on the same CIFAR-shaped data: tightrope.train's device-resident
TensorLoader and FFCV loader against a torch DataLoader over the same uint8 tensors with per-sample
augmentation (the usual Dataset/transform pattern), with 0 and 2 worker processes.

Group ``loader-cifar-b128`` (baseline: the DataLoader without workers): one epoch over 8192
3x32x32 images, random crop with 2 px edge padding + flip, float32 in [0, 1]. Images/s =
8192 / time. The FFCV member (the same data from a ``.beton`` file, decoded by FFCV with 2
threads, augmented like the in-memory loader) is skipped when ffcv is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytest_benchmark.fixture import BenchmarkFixture
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tightrope.train import ImageData, TensorLoader
from tightrope.train.data import Augmentation

IMAGES = 8192
BATCH = 128


def _data() -> ImageData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (IMAGES, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return ImageData(images, torch.randint(0, 10, (IMAGES,), generator=generator))


class _Augmented(Dataset[tuple[Tensor, Tensor]]):
    def __init__(self, data: ImageData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.data.images[index].float().div_(255.0)
        padded = F.pad(image.unsqueeze(0), (2, 2, 2, 2), mode="replicate")[0]
        top, left = torch.randint(0, 5, (2,)).tolist()
        crop = padded[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            crop = crop.flip(2)
        return crop, self.data.labels[index]


def _consume(batches: object) -> int:
    seen = 0
    for x, _ in batches:  # type: ignore[attr-defined]
        seen += int(x.shape[0])
    return seen


@pytest.mark.benchmark(group="loader-cifar-b128")
def test_tensor_loader(benchmark: BenchmarkFixture) -> None:
    loader = TensorLoader(_data(), batch_size=BATCH, shuffle=True, seed=0,
                          augmentation=Augmentation.CROP_FLIP, crop_padding=2)
    epochs = iter(range(10**6))
    seen = benchmark.pedantic(lambda: _consume(loader.epoch(next(epochs))), rounds=5)
    assert seen == IMAGES


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.benchmark(group="loader-cifar-b128")
def test_torch_dataloader(benchmark: BenchmarkFixture, workers: int) -> None:
    loader = DataLoader(_Augmented(_data()), batch_size=BATCH, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    benchmark.extra_info["baseline"] = workers == 0
    seen = benchmark.pedantic(lambda: _consume(loader), rounds=3 if workers == 0 else 5)
    assert seen == IMAGES


@pytest.mark.benchmark(group="loader-cifar-b128")
def test_ffcv_loader(benchmark: BenchmarkFixture, tmp_path_factory: pytest.TempPathFactory
                     ) -> None:
    from tightrope.train.ffcv_loader import FFCVLoader, ffcv_available

    if not ffcv_available():
        pytest.skip("ffcv not installed (scripts/setup.sh --ffcv)")
    loader = FFCVLoader(_data(), cache_dir=tmp_path_factory.mktemp("beton"), tag="bench",
                        batch_size=BATCH, shuffle=True, drop_last=False,
                        augmentation=Augmentation.CROP_FLIP, crop_padding=2, workers=2)
    epochs = iter(range(10**6))
    seen = benchmark.pedantic(lambda: _consume(loader.epoch(next(epochs))), rounds=5,
                              warmup_rounds=1)
    assert seen == IMAGES
