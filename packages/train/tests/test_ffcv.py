"""The FFCV loader (skipped without ffcv): the .beton round trip keeps every image with its
label, epochs are permutations, and the trainer runs on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tightrope.train import ImageData, Trainer
from tightrope.train.ffcv_loader import FFCVLoader, ffcv_available

pytestmark = pytest.mark.skipif(not ffcv_available(), reason="ffcv not installed")


def test_beton_round_trip_and_permutations(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 6, 6), generator=generator, dtype=torch.uint8)
    data = ImageData(images, torch.randint(0, 10, (300,), generator=generator))
    loader = FFCVLoader(data, cache_dir=tmp_path, tag="t", batch_size=64, shuffle=True,
                        drop_last=False, workers=1)
    assert loader.path.is_file()
    orders = []
    for epoch in (0, 1):
        xs, ys = zip(*loader.epoch(epoch), strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        flat = (data.images.float() / 255).flatten(1)
        index = (x.flatten(1)[:, None, :] - flat[None]).abs().sum(2).argmin(1)
        assert sorted(index.tolist()) == list(range(300))
        assert torch.equal(data.labels[index], y)
        assert torch.equal(x.flatten(1), flat[index])
        orders.append(index)
    assert not torch.equal(orders[0], orders[1])
    again = FFCVLoader(data, cache_dir=tmp_path, tag="t", batch_size=64, shuffle=False,
                       workers=1)
    assert again.path == loader.path  # reused, not rewritten


def test_trainer_on_ffcv(tmp_path: Path, make_config: Callable[..., Any]) -> None:
    config = make_config(epochs=2, eps={"train": 0.05, "ramp_epochs": 1},
                         data={"dataset": "synthetic", "batch_size": 32, "validation_size": 32,
                               "synthetic_size": 224, "loader": "ffcv",
                               "cache_dir": str(tmp_path / "cache"), "workers": 1})
    trainer = Trainer(config, run_dir=tmp_path / "run")
    result = trainer.fit()
    assert trainer.step == 2 * 6
    assert result.last["samples"] == 32
    assert torch.isfinite(torch.tensor(list(result.last.values()))).all()
    assert any((tmp_path / "cache").glob("synthetic-train-*.beton"))
