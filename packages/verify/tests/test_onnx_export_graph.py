"""export_onnx on traced (non-chain) models: residual networks, branches, the bounds modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import Tensor, nn

from tightrope.bounds.modules import Add, Concat, Elementwise, Pad, Permute, Reshape
from tightrope.train import build_model
from tightrope.verify.onnx import export_onnx, load_onnx
from tightrope.verify.onnx.export import LinearOp


def _randomise_batch_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
            module.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _resnet2b() -> nn.Module:
    return build_model("resnet2b", in_channels=3, input_size=16, num_classes=10,
                       mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])


def _resnet_bn() -> nn.Module:
    return _randomise_batch_norm(build_model(
        "resnet", in_channels=3, input_size=8, num_classes=5, mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.25, 0.3], blocks=3, width=4, linear_width=20, batch_norm=True))


class PoolResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.inner = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pool(torch.relu(self.conv(x)))
        y = torch.relu(self.inner(y) + y)
        out: Tensor = self.fc(torch.flatten(y, 1))
        return out


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(6, 5)
        self.out = nn.Linear(10, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.size(0), -1)
        a = torch.relu(self.a(x))
        b = self.b(x) * 2 + 1
        joined = torch.cat([a - b, -self.c(x) / 4 - 0.5], dim=1)
        out: Tensor = self.out(2 - joined)
        return out


class Modules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = Pad((1, 0, 2, 1), value=0.25)
        self.conv = nn.Conv2d(2, 3, 3)
        self.permute = Permute((1, 2, 0))
        self.scale = Elementwise(torch.randn(3), torch.randn(5, 1, 3))
        self.reshape = Reshape((10, 3))
        self.left = nn.Linear(30, 8)
        self.right = nn.Linear(30, 8)
        self.add = Add()
        self.concat = Concat(0)
        self.flat = nn.Flatten()
        self.square = Reshape((4, 4))
        self.fc = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = self.reshape(self.scale(self.permute(self.conv(self.pad(x)))))
        y = torch.flatten(y, 1)
        y = self.concat(self.add(self.left(y), self.right(y)), torch.relu(self.left(y)))
        out: Tensor = self.fc(self.flat(self.square(y).transpose(1, 2).contiguous()))
        return out


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet2b": (_resnet2b, (3, 16, 16)),
    "resnet_batch_norm": (_resnet_bn, (3, 8, 8)),
    "pool_residual": (PoolResidual, (2, 8, 8)),
    "branches": (Branches, (2, 3)),
    "modules": (Modules, (2, 4, 3)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(MODELS))
def test_graph_models_export_to_what_torch_computes(
    tmp_path: Path, name: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(3)
    factory, input_shape = MODELS[name]
    model = factory().to(dtype).eval()
    # Opset 15: onnx's reference BatchNormalization-9 uses batch statistics (see test_onnx).
    path = tmp_path / "net.onnx"
    data = export_onnx(model, input_shape, path, dtype=dtype, opset=15)
    proto = onnx.load_model_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    evaluator = ReferenceEvaluator(proto)
    net = load_onnx(path)
    xs = torch.rand(4, 1, *input_shape, dtype=dtype)
    with torch.no_grad():
        for x in xs:
            (y,) = evaluator.run(None, {"input": x.numpy()})
            expected = model(x)
            torch.testing.assert_close(torch.from_numpy(np.asarray(y)), expected, rtol=tol,
                                       atol=tol)
        batch = xs[:, 0]
        got = net.module(batch.to(net.dtype)).to(dtype)
        torch.testing.assert_close(got, model(batch), rtol=tol, atol=tol)


class LinearOnRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = Pad((1, 2), value=-1.0)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.fc(self.pad(x))
        return y.permute(0, 1, 3, 2)


@pytest.mark.parametrize("factory", [Modules, LinearOnRows])
def test_matmul_linear_and_opset_10_pad(factory: Callable[[], nn.Module]) -> None:
    """Exports that load_onnx need not read: Linear on rows (MatMul), Pad-2 attributes."""
    torch.manual_seed(4)
    model = factory().double().eval()
    shape = (2, 4, 3)
    data = export_onnx(model, shape, linear_op=LinearOp.MATMUL_ADD, dtype=torch.float64,
                       opset=10)
    proto = onnx.load_model_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    x = torch.rand(1, 2, 4, 3, dtype=torch.float64)
    (y,) = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(np.asarray(y)), model(x), rtol=1e-10,
                               atol=1e-10)


def test_chain_of_chain_layers_is_written_as_before() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    names = [n.name for n in onnx.load_model_from_string(export_onnx(model, (4,))).graph.node]
    assert names == ["gemm0", "relu1", "gemm2"]
    with pytest.raises(TypeError, match=r"cannot write these layers: 1 \(Sigmoid\)"):
        export_onnx(nn.Sequential(nn.Linear(4, 3), nn.Sigmoid()), (4,))


class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.fc(torch.sigmoid(x) + x)
        return y


def test_unsupported_nodes_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"cannot export node 'sigmoid' \(torch\.sigmoid\)"):
        export_onnx(Sigmoid(), (4,))
