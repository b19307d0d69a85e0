"""ONNX graphs whose input-dependent values branch and join (residual connections,
concatenations), MaxPool and Pad: converted modules against onnx's reference evaluator."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import Tensor, fx, nn

from tightrope.bounds import Normalize
from tightrope.bounds.modules import Add, Concat, Elementwise, Pad, Permute, Reshape
from tightrope.verify.onnx import OnnxImportError, load_onnx

RESNET = Path("/work/shared/benchmarks/vnncomp2021/cifar10_resnet/onnx/resnet_2b.onnx")

ALLOWED = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm1d,
           nn.BatchNorm2d, nn.Flatten, Normalize, Add, Concat, Reshape, Permute, Pad,
           Elementwise)

ELEM = {torch.float32: TensorProto.FLOAT, torch.float64: TensorProto.DOUBLE}
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
          **attributes: object) -> NodeProto:
    node: NodeProto = helper.make_node(op, list(inputs), list(outputs), name=name)
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attributes.items())
    return node


def _model(nodes: list[NodeProto], constants: dict[str, Tensor], input_shape: tuple[int, ...],
           dtype: torch.dtype = torch.float32, opset: int = 15) -> onnx.ModelProto:
    """A model from ``x`` to ``y`` (float tensors in ``dtype``, integer ones as int64)."""
    initializers = []
    for name, value in constants.items():
        stored = value.to(dtype) if value.is_floating_point() else value
        initializers.append(numpy_helper.from_array(stored.numpy(), name))
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", ELEM[dtype], input_shape)],
        [helper.make_tensor_value_info("y", ELEM[dtype], None)], initializer=initializers)
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])


def _call_modules(module: nn.Module) -> list[nn.Module]:
    assert isinstance(module, fx.GraphModule)
    return [module.get_submodule(str(n.target)) for n in module.graph.nodes
            if n.op == "call_module"]


def _check(model: onnx.ModelProto, path: Path, dtype: torch.dtype, samples: int = 3,
           seed: int = 0) -> nn.Module:
    """The converted module agrees with onnx's reference evaluator on random inputs (as a batch
    too); returns the module."""
    path.write_bytes(model.SerializeToString())
    net = load_onnx(path)
    assert net.dtype == dtype
    reference = ReferenceEvaluator(model)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, *net.onnx_input_shape[1:], generator=generator, dtype=dtype) * 2 - 1
    with torch.no_grad():
        got = net.module(x.reshape(samples, *net.input_shape))
    assert got.shape == (samples, net.num_outputs)
    for i in range(samples):
        (expected,) = reference.run(None, {"x": x[i : i + 1].numpy()})
        want = torch.from_numpy(np.asarray(expected)).reshape(-1)
        tolerance = TOLERANCE[dtype]
        torch.testing.assert_close(got[i], want, rtol=tolerance, atol=tolerance)
    if isinstance(net.module, fx.GraphModule):
        modules = _call_modules(net.module)
        assert all(isinstance(m, ALLOWED) for m in modules), modules
    return net.module


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


DTYPES = [torch.float32, torch.float64]


# --- the VNN-COMP 2021 ResNet ---------------------------------------------------------------


@pytest.mark.skipif(not RESNET.exists(), reason="the shared VNN-COMP 2021 suite is not here")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cifar10_resnet_matches_the_reference_evaluator(dtype: torch.dtype) -> None:
    net = load_onnx(RESNET, dtype=dtype)
    assert isinstance(net.module, fx.GraphModule)
    assert (net.input_shape, net.num_outputs, net.dtype) == ((3, 32, 32), 10, torch.float32)
    modules = _call_modules(net.module)
    assert all(isinstance(m, ALLOWED) for m in modules)
    assert sum(isinstance(m, Add) for m in modules) == 2
    assert all(p.dtype == dtype for p in net.module.parameters())
    reference = ReferenceEvaluator(onnx.load(RESNET))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = net.module(x.to(dtype))
    for i in range(len(x)):
        (expected,) = reference.run(None, {"input.1": x[i : i + 1].numpy()})
        want = torch.from_numpy(np.asarray(expected)).reshape(-1).to(dtype)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
    # Deep copies and dtype casts work on the GraphModule (the certify app makes both).
    copied = copy.deepcopy(net.module).to(torch.float64 if dtype is torch.float32
                                          else torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(copied(x.to(next(copied.parameters()).dtype)).to(dtype), got,
                                   rtol=1e-4, atol=1e-4)


# --- small graphs --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_with_batch_norm_in_the_branch_and_a_gemm_head(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    const = {"W1": _randn(2, 2, 3, 3, seed=1), "b1": _randn(2, seed=2),
             "gamma": torch.tensor([-1.5, 0.5]), "beta": torch.tensor([0.1, -0.3]),
             "mean": torch.tensor([0.2, -0.1]), "var": torch.tensor([0.5, 2.0]),
             "W2": _randn(2, 2, 3, 3, seed=3), "W3": _randn(4, 72, seed=4),
             "b3": _randn(4, seed=5)}
    nodes = [
        _node("Conv", ("x", "W1", "b1"), ("c1",), "conv1", pads=(1, 1, 1, 1)),
        _node("BatchNormalization", ("c1", "gamma", "beta", "mean", "var"), ("n1",), "bn"),
        _node("Relu", ("n1",), ("r1",), "relu1"),
        _node("Conv", ("r1", "W2"), ("c2",), "conv2", pads=(1, 1, 1, 1)),
        _node("Add", ("c2", "x"), ("s",), "residual"),
        _node("Relu", ("s",), ("r2",), "relu2"),
        _node("Flatten", ("r2",), ("f",), "flatten"),
        _node("Gemm", ("f", "W3", "b3"), ("y",), "head", transB=1),
    ]
    module = _check(_model(nodes, const, (1, 2, 6, 6), dtype), tmp_path / "res.onnx", dtype)
    kinds = [type(m) for m in _call_modules(module)]
    # The BatchNormalization folded into conv1.
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, Add, nn.ReLU, nn.Flatten, nn.Linear], kinds


@pytest.mark.parametrize("dtype", DTYPES)
def test_sub_of_two_branches_and_a_matmul_head(tmp_path: Path, dtype: torch.dtype) -> None:
    const = {"Wa": _randn(3, 1, 3, 3, seed=6), "Wb": _randn(3, 1, 1, 1, seed=7),
             "bb": _randn(3, seed=8), "k": torch.tensor([2.0]), "W": _randn(27, 5, seed=9),
             "b": _randn(5, seed=10)}
    nodes = [
        _node("Conv", ("x", "Wa"), ("a",), "conv_a", strides=(2, 2), pads=(1, 1, 1, 1)),
        _node("Conv", ("x", "Wb", "bb"), ("b0",), "conv_b", strides=(2, 2)),
        _node("Mul", ("b0", "k"), ("b1",), "double"),
        _node("Sub", ("a", "b1"), ("d",), "difference"),
        _node("Relu", ("d",), ("r",), "relu"),
        _node("Flatten", ("r",), ("f",), "flatten"),
        _node("MatMul", ("f", "W"), ("m",), "dense"),
        _node("Add", ("m", "b"), ("y",), "bias"),
    ]
    module = _check(_model(nodes, const, (1, 1, 5, 5), dtype), tmp_path / "sub.onnx", dtype)
    kinds = [type(m) for m in _call_modules(module)]
    # The Mul by 2 and the negation of Sub folded into conv_b; the Add into the Linear layer.
    assert kinds == [nn.Conv2d, nn.Conv2d, Add, nn.ReLU, nn.Flatten, nn.Linear], kinds


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_in_a_chain_and_in_a_branch(tmp_path: Path, dtype: torch.dtype) -> None:
    const = {"W": _randn(2, 1, 3, 3, seed=11), "W2": _randn(3, 18, seed=12)}
    pool = {"kernel_shape": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1)}
    chain = [
        _node("Conv", ("x", "W"), ("c",), "conv", pads=(1, 1, 1, 1)),
        _node("MaxPool", ("c",), ("p",), "pool", **pool),
        _node("Flatten", ("p",), ("f",), "flatten"),
        _node("Gemm", ("f", "W2"), ("y",), "head", transB=1),
    ]
    module = _check(_model(chain, const, (1, 1, 6, 6), dtype), tmp_path / "chain.onnx", dtype)
    assert isinstance(module, nn.Sequential)
    assert [type(m) for m in module] == [nn.Conv2d, nn.MaxPool2d, nn.Flatten, nn.Linear]
    # In a branch: max(conv(x)) + max(x) per channel, pooled.
    const["one"] = torch.ones(2, 1, 1, 1)
    branch = [
        _node("Conv", ("x", "W"), ("c",), "conv", pads=(1, 1, 1, 1)),
        _node("Conv", ("x", "one"), ("x2",), "copy"),
        _node("MaxPool", ("c",), ("p",), "pool", **pool),
        _node("MaxPool", ("x2",), ("q",), "pool_x", **pool),
        _node("Add", ("p", "q"), ("s",), "join"),
        _node("Flatten", ("s",), ("f",), "flatten"),
        _node("Gemm", ("f", "W2"), ("y",), "head", transB=1),
    ]
    module = _check(_model(branch, const, (1, 1, 6, 6), dtype), tmp_path / "dag.onnx", dtype)
    assert sum(isinstance(m, nn.MaxPool2d) for m in _call_modules(module)) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_of_two_branches_on_the_channel_axis(tmp_path: Path, dtype: torch.dtype) -> None:
    const = {"Wa": _randn(2, 2, 3, 3, seed=13), "Wb": _randn(1, 2, 1, 1, seed=14),
             "W": _randn(3, 3, 1, 1, seed=15), "shift": _randn(1, 3, 1, 1, seed=16)}
    nodes = [
        _node("Conv", ("x", "Wa"), ("a",), "conv_a", pads=(1, 1, 1, 1)),
        _node("Relu", ("a",), ("ra",), "relu_a"),
        _node("Conv", ("x", "Wb"), ("b",), "conv_b"),
        _node("Concat", ("ra", "b"), ("c",), "concat", axis=1),
        _node("Add", ("c", "shift"), ("cs",), "shift"),
        _node("Relu", ("cs",), ("r",), "relu"),
        _node("GlobalAveragePool", ("r",), ("g",), "gap"),
        _node("Conv", ("g", "W"), ("y",), "conv_out"),
    ]
    module = _check(_model(nodes, const, (1, 2, 4, 4), dtype), tmp_path / "cat.onnx", dtype)
    assert any(isinstance(m, Concat) and m.dim == 0 for m in _call_modules(module))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_then_conv_and_asymmetric_conv_pads(tmp_path: Path, dtype: torch.dtype) -> None:
    const = {"pads": torch.tensor([0, 0, 1, 2, 0, 0, 2, 1]), "value": torch.tensor(0.5),
             "W": _randn(2, 1, 3, 3, seed=17), "b": _randn(2, seed=18)}
    chain = [
        _node("Pad", ("x", "pads", "value"), ("p",), "pad"),
        _node("Conv", ("p", "W", "b"), ("c",), "conv"),
        _node("Relu", ("c",), ("y",), "relu"),
    ]
    module = _check(_model(chain, const, (1, 1, 4, 4), dtype), tmp_path / "pad.onnx", dtype)
    assert isinstance(module, nn.Sequential)
    assert [type(m) for m in module] == [Pad, nn.Conv2d, nn.ReLU, nn.Flatten]
    # A residual block whose Conv pads asymmetrically (TensorFlow's SAME with stride 2).
    const["W2"] = _randn(1, 1, 2, 2, seed=19)
    dag = [
        _node("Conv", ("x", "W2"), ("c",), "conv", pads=(0, 0, 1, 1)),
        _node("Relu", ("c",), ("r",), "relu"),
        _node("Add", ("r", "x"), ("y",), "residual"),
    ]
    module = _check(_model(dag, const, (1, 1, 4, 4), dtype), tmp_path / "same.onnx", dtype)
    kinds = [type(m) for m in _call_modules(module)]
    assert kinds == [Pad, nn.Conv2d, nn.ReLU, Add, nn.Flatten], kinds


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposes_in_the_middle_of_a_branching_graph(tmp_path: Path, dtype: torch.dtype) -> None:
    const = {"W": _randn(3, 3, 1, 1, seed=20), "scale": _randn(3, seed=21),
             "shape": torch.tensor([2, 3, 4]), "W2": _randn(5, 24, seed=22)}
    nodes = [
        _node("Conv", ("x", "W"), ("c",), "conv"),
        _node("Relu", ("c",), ("r",), "relu"),
        _node("Transpose", ("r",), ("nhwc",), "to_nhwc", perm=(0, 2, 3, 1)),
        _node("Mul", ("nhwc", "scale"), ("m",), "scale"),  # per channel, on the last axis
        _node("Transpose", ("m",), ("nchw",), "to_nchw", perm=(0, 3, 1, 2)),
        _node("Add", ("nchw", "x"), ("s",), "residual"),
        # Moves the batch axis and reorders: (1, 3, 2, 4) -> (2, 3, 1, 4) -> (2, 3, 4)
        _node("Transpose", ("s",), ("t",), "swap", perm=(2, 1, 0, 3)),
        _node("Reshape", ("t", "shape"), ("u",), "reshape"),
        _node("Flatten", ("u",), ("f",), "flatten", axis=0),
        _node("Gemm", ("f", "W2"), ("y",), "head", transB=1),
    ]
    module = _check(_model(nodes, const, (1, 3, 2, 4), dtype), tmp_path / "t.onnx", dtype)
    assert sum(isinstance(m, Permute) for m in _call_modules(module)) == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_constants_on_the_input_and_a_shared_value(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    # (x - m) / s feeds two branches; Neg and Div by a constant; Add of a value to itself.
    const = {"m": torch.tensor([0.5]), "s": torch.tensor([0.25]), "k": _randn(1, 1, 3, 3, seed=23),
             "W": _randn(1, 1, 3, 3, seed=24)}
    nodes = [
        _node("Sub", ("x", "m"), ("a",), "centre"), _node("Div", ("a", "s"), ("n",), "scale"),
        _node("Conv", ("n", "W"), ("c",), "conv", pads=(1, 1, 1, 1)),
        _node("Neg", ("c",), ("nc",), "neg"),
        _node("Mul", ("n", "k"), ("nk",), "pixelwise"),
        _node("Add", ("nc", "nk"), ("s1",), "join"),
        _node("Add", ("s1", "s1"), ("y",), "twice"),
    ]
    _check(_model(nodes, const, (1, 1, 3, 3), dtype), tmp_path / "affine.onnx", dtype)


# --- refusals ------------------------------------------------------------------------------


def test_what_the_graph_converter_cannot_express_is_listed_at_once(tmp_path: Path) -> None:
    const = {"W": torch.ones(1, 1, 3, 3), "c": torch.ones(1, 1, 4, 4)}
    nodes = [
        _node("Conv", ("x", "W"), ("a",), "conv", pads=(1, 1, 1, 1)),
        _node("Mul", ("a", "x"), ("p",), "product"),
        _node("MaxPool", ("x",), ("q",), "ceil_pool", kernel_shape=(2, 2), ceil_mode=1),
        _node("MaxPool", ("x",), ("d",), "dilated_pool", kernel_shape=(2, 2),
              dilations=(2, 2)),
        _node("MaxPool", ("x",), ("e",), "lopsided_pool", kernel_shape=(2, 2),
              pads=(0, 0, 1, 1)),
        _node("Concat", ("x", "c"), ("f",), "with_constant", axis=1),
        _node("Sigmoid", ("x",), ("g",), "sigmoid"),
        _node("Concat", ("p", "q", "d", "e", "f", "g"), ("y",), "all", axis=1),
    ]
    path = tmp_path / "bad.onnx"
    path.write_bytes(_model(nodes, const, (1, 1, 4, 4)).SerializeToString())
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    problems = info.value.problems
    expected = [
        "Mul 'product': Mul of two input-dependent values is not supported",
        "MaxPool 'ceil_pool': ceil_mode=1 is not supported",
        "MaxPool 'dilated_pool': dilations [2, 2] are not supported",
        "MaxPool 'lopsided_pool': asymmetric pads [0, 0, 1, 1]",
        "Concat 'with_constant': Concat of input-dependent values with constants",
        "Sigmoid 'sigmoid': operator Sigmoid is not supported",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem


def test_chain_max_pool_refusals_and_output_not_depending_on_the_input(tmp_path: Path) -> None:
    path = tmp_path / "pool.onnx"
    nodes = [_node("MaxPool", ("x",), ("y",), "pool", kernel_shape=(3, 3), pads=(2, 2, 2, 2))]
    path.write_bytes(_model(nodes, {}, (1, 1, 4, 4)).SerializeToString())
    with pytest.raises(OnnxImportError, match=r"MaxPool 'pool': pads \[2, 2\] larger than half"):
        load_onnx(path)
    nodes = [_node("MaxPool", ("x",), ("y",), "pool", kernel_shape=(2, 2), pads=(0, 0, 1, 1))]
    path.write_bytes(_model(nodes, {}, (1, 1, 4, 4)).SerializeToString())
    with pytest.raises(OnnxImportError, match=r"MaxPool 'pool': asymmetric pads .*-inf"):
        load_onnx(path)
    nodes = [_node("Relu", ("x",), ("r",), "relu"), _node("Add", ("r", "x"), ("s",), "add"),
             _node("Add", ("c", "c"), ("y",), "constant")]
    path.write_bytes(_model(nodes, {"c": torch.ones(2)}, (1, 2)).SerializeToString())
    with pytest.raises(OnnxImportError, match="'y' does not depend on the input"):
        load_onnx(path)
