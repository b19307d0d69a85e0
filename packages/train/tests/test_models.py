"""The model registry: shapes of CNN3/CNN7/MLP for every data set, and the bounds accept them."""

from __future__ import annotations

import pytest
import torch

from tightrope.bounds import Box, Normalize, crown_ibp, ibp, margin_spec
from tightrope.train import DATASET_INFO, DatasetName, build_model


@pytest.mark.parametrize("name", ["cnn3", "cnn7", "mlp"])
@pytest.mark.parametrize("dataset", [DatasetName.MNIST, DatasetName.CIFAR10,
                                     DatasetName.TINY_IMAGENET, DatasetName.SYNTHETIC])
def test_every_model_fits_every_data_set(name: str, dataset: DatasetName) -> None:
    info = DATASET_INFO[dataset]
    options = {"width": 4, "linear_width": 8} if name == "cnn7" else {}
    options = {"width": 4} if name == "cnn3" else options
    model = build_model(name, in_channels=info.shape[0], input_size=info.shape[1],
                        num_classes=info.num_classes, mean=info.mean, std=info.std, **options)
    assert isinstance(model[0], Normalize)
    model.eval()
    x = torch.rand(2, *info.shape)
    assert model(x).shape == (2, info.num_classes)
    y = torch.zeros(2, dtype=torch.int64)
    box = Box.from_linf(x, 0.01)
    bounds = ibp(model, box, margin_spec(y, info.num_classes))
    assert bounds.lower.shape == (2, info.num_classes - 1)
    if dataset is DatasetName.SYNTHETIC:
        tighter = crown_ibp(model, box, margin_spec(y, info.num_classes), upper=False)
        assert bool((tighter.lower <= model(x)[:, :1] - model(x)[:, 1:] + 1e-5).all())


def test_cnn7_shapes_follow_the_paper() -> None:
    cifar = build_model("cnn7", in_channels=3, input_size=32, num_classes=10,
                        mean=[0.5] * 3, std=[0.25] * 3)
    tiny = build_model("cnn7", in_channels=3, input_size=64, num_classes=200,
                       mean=[0.5] * 3, std=[0.25] * 3)
    linear = [m for m in cifar if isinstance(m, torch.nn.Linear)]
    assert linear[0].in_features == 128 * 16 * 16
    assert linear[0].out_features == 512
    convs = [m for m in tiny if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2]
    assert next(m for m in tiny if isinstance(m, torch.nn.Linear)).in_features == 128 * 16 * 16


def test_unknown_model_and_option() -> None:
    with pytest.raises(ValueError, match="known: cnn3, cnn7, mlp, resnet, resnet2b, resnet4b"):
        build_model("vgg16", in_channels=1, input_size=28, num_classes=10, mean=[0], std=[1])
    with pytest.raises(ValueError, match="resnet: blocks must be a positive integer"):
        build_model("resnet", in_channels=1, input_size=28, num_classes=10, mean=[0], std=[1],
                    blocks=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("resnet2b", in_channels=1, input_size=30, num_classes=10, mean=[0], std=[1])
    with pytest.raises(TypeError):
        build_model("cnn3", in_channels=1, input_size=28, num_classes=10, mean=[0], std=[1],
                    depth=3)


def test_resnet_shapes_and_the_vnncomp_resnet_2b_layout() -> None:
    from tightrope.train.models import ResidualBlock

    model = build_model("resnet2b", in_channels=3, input_size=32, num_classes=10,
                        mean=[0.5] * 3, std=[0.25] * 3)
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert len(blocks) == 2
    assert isinstance(blocks[0].shortcut, torch.nn.Sequential)  # 1x1 strided convolution
    assert isinstance(blocks[1].shortcut, torch.nn.Identity)
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert (linear[0].in_features, linear[0].out_features) == (16 * 8 * 8, 100)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    deep = build_model("resnet4b", in_channels=1, input_size=28, num_classes=10, mean=[0],
                       std=[1], batch_norm=True, width=4)
    assert sum(isinstance(m, ResidualBlock) for m in deep) == 4
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in deep.modules())
    assert deep(torch.rand(2, 1, 28, 28)).shape == (2, 10)
