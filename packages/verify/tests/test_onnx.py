"""The ONNX reader and writer: conversion against an independent ONNX interpreter, what the
``onnx`` package adds (tensor encodings, external data, opsets, valid exports), errors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import NodeProto, TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from onnx.reference import ReferenceEvaluator
from torch import Tensor, nn

from tightrope.bounds import Box, Normalize, crown, ibp
from tightrope.verify.onnx import OnnxImportError, export_onnx, load_onnx
from tightrope.verify.onnx.export import LinearOp

SUITE = Path("/work/shared/benchmarks/vnncomp2021")


# --- an independent ONNX interpreter (the operators' definitions from onnx.ai) -------------


def _attrs(node: NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _i(node: NodeProto, name: str, default: int) -> int:
    value = _attrs(node).get(name, default)
    assert isinstance(value, int)
    return value


def _f(node: NodeProto, name: str, default: float) -> float:
    value = _attrs(node).get(name, default)
    assert isinstance(value, float)
    return value


def _ints(node: NodeProto, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = _attrs(node).get(name, default)
    assert isinstance(value, (list, tuple))
    return tuple(value)


def _values(tensor: TensorProto) -> Tensor:
    values = torch.from_numpy(np.array(numpy_helper.to_array(tensor)))
    return values.double() if values.is_floating_point() else values


def run_onnx(graph: onnx.GraphProto, x: Tensor) -> Tensor:
    """Evaluate ``graph`` on one input ``x`` (its declared shape) in float64."""
    env = {t.name: _values(t) for t in graph.initializer}
    env[next(v.name for v in graph.input if v.name not in env)] = x.double()
    for node in graph.node:
        a = [env[n] for n in node.input if n]
        op = node.op_type
        if op == "Gemm":
            A = a[0].T if _i(node, "transA", 0) else a[0]
            B = a[1].T if _i(node, "transB", 0) else a[1]
            y = _f(node, "alpha", 1.0) * A @ B
            if len(a) > 2:
                y = y + _f(node, "beta", 1.0) * a[2]
        elif op == "MatMul":
            y = a[0] @ a[1]
        elif op in ("Add", "Sub", "Mul", "Div"):
            y = {"Add": a[0] + a[1], "Sub": a[0] - a[1], "Mul": a[0] * a[1],
                 "Div": a[0] / a[1]}[op]
        elif op == "Neg":
            y = -a[0]
        elif op == "Relu":
            y = torch.relu(a[0])
        elif op == "Flatten":
            axis = _i(node, "axis", 1)
            y = a[0].reshape(math.prod(a[0].shape[:axis]), -1)
        elif op == "Reshape":
            target = [a[0].shape[i] if t == 0 else t for i, t in enumerate(a[1].tolist())]
            y = a[0].reshape(target)
        elif op == "Transpose":
            y = a[0].permute(*_ints(node, "perm", ()))
        elif op == "Constant":
            tensor = _attrs(node)["value"]
            assert isinstance(tensor, TensorProto)
            y = _values(tensor)
        elif op == "Shape":
            y = torch.tensor(a[0].shape)
        elif op == "Gather":
            y = a[0][a[1]]
        elif op == "Unsqueeze":
            y = a[0]
            axes = a[1].tolist() if len(a) > 1 else list(_ints(node, "axes", ()))
            for axis in sorted(axes):
                y = y.unsqueeze(axis)
        elif op == "Squeeze":
            y = a[0]
            axes = a[1].tolist() if len(a) > 1 else list(_ints(node, "axes", ()))
            for axis in sorted(axes, reverse=True):
                y = y.squeeze(axis)
        elif op == "Concat":
            y = torch.cat(a, dim=_i(node, "axis", 0))
        elif op == "Conv":
            y = F.conv2d(a[0], a[1], a[2] if len(a) > 2 else None,
                         stride=_ints(node, "strides", (1, 1)),
                         padding=_ints(node, "pads", (0, 0, 0, 0))[:2],
                         dilation=_ints(node, "dilations", (1, 1)),
                         groups=_i(node, "group", 1))
        elif op == "BatchNormalization":
            view = (1, -1, *([1] * (a[0].dim() - 2)))
            eps = _f(node, "epsilon", 1e-5)
            y = (a[0] - a[3].view(view)) / torch.sqrt(a[4].view(view) + eps) * a[1].view(view) \
                + a[2].view(view)
        elif op == "AveragePool":
            y = F.avg_pool2d(a[0], _ints(node, "kernel_shape", ()),
                             stride=_ints(node, "strides", (1, 1)),
                             padding=_ints(node, "pads", (0, 0, 0, 0))[:2],
                             count_include_pad=bool(_i(node, "count_include_pad", 0)))
        elif op == "Identity":
            y = a[0]
        else:
            raise NotImplementedError(op)
        env[node.output[0]] = y
    return env[graph.output[0].name]


def _tensor(name: str, value: Tensor) -> TensorProto:
    stored = value.float() if value.is_floating_point() else value
    return numpy_helper.from_array(stored.numpy(), name)


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
          attributes: dict[str, object] | None = None) -> NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name, **(attributes or {}))


def _model(nodes: list[NodeProto], constants: dict[str, Tensor], input_shape: tuple[int, ...],
           output: str, output_shape: tuple[int, ...], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        initializer=[_tensor(k, v) for k, v in constants.items()])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", opset)])


def _graph_model(nodes: list[NodeProto], constants: dict[str, Tensor],
                 input_shape: tuple[int, ...], output: str, output_shape: tuple[int, ...]) -> bytes:
    data: bytes = _model(nodes, constants, input_shape, output, output_shape).SerializeToString()
    return data


def _check_against_interpreter(path: Path, samples: int = 16, seed: int = 0) -> None:
    """The converted module agrees with the ONNX interpreter on random inputs (float64)."""
    net = load_onnx(path, dtype=torch.float64)
    graph = onnx.load(path).graph
    generator = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        x = torch.rand(net.onnx_input_shape, generator=generator, dtype=torch.float64) * 2 - 1
        expected = run_onnx(graph, x).reshape(-1)
        got = net.module(net.from_onnx_order(x)).reshape(-1)
        assert got.shape == (net.num_outputs,)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# --- conversion ----------------------------------------------------------------------------


def _conv_net() -> nn.Sequential:
    model = nn.Sequential(
        Normalize([0.3, 0.6], [0.2, 0.5]),
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AvgPool2d(2), nn.Conv2d(4, 3, 3, padding=1, groups=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(48, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3),
    ).double()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            module.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
            module.weight.data.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("linear_op", list(LinearOp))
def test_exported_torch_models_read_back_to_the_same_function(
    tmp_path: Path, linear_op: LinearOp
) -> None:
    torch.manual_seed(0)
    model = _conv_net()
    path = tmp_path / "net.onnx"
    export_onnx(model, (2, 16, 16), path, linear_op=linear_op, dtype=torch.float64)
    net = load_onnx(path)
    assert net.input_shape == (2, 16, 16)
    assert net.dtype == torch.float64
    x = torch.rand(8, 2, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(net.module(x), model(x), rtol=1e-10, atol=1e-10)
    _check_against_interpreter(path)
    # Sub/Div at the input became Normalize; BatchNorm layers folded into the weights before.
    assert isinstance(net.module[0], Normalize)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in net.module)


def test_float32_export_reads_back_as_float32(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    export_onnx(model, (4,), tmp_path / "net.onnx")
    net = load_onnx(tmp_path / "net.onnx")
    assert net.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.module.parameters())
    x = torch.rand(3, 4)
    torch.testing.assert_close(net.module(x), model(x))


def test_affine_constants_fold_into_layers_and_normalize(tmp_path: Path) -> None:
    # x (1, 2, 3, 3) -> (x - m) / s -> *(-2) (per element) -> flatten via Shape/Gather/
    # Unsqueeze/Concat/Reshape -> MatMul + Add -> Sub(c, .) -> Relu -> Gemm(alpha, beta, transB)
    g = torch.Generator().manual_seed(3)
    const = {
        "m": torch.rand(1, 2, 1, 1, generator=g), "s": torch.rand(1, 2, 1, 1, generator=g) + 0.5,
        "k": -torch.rand(2, 3, 3, generator=g) - 0.5, "idx": torch.tensor(0),
        "minus1": torch.tensor([-1]), "W": torch.randn(18, 7, generator=g),
        "b": torch.randn(7, generator=g), "c": torch.randn(1, 7, generator=g),
        "W2": torch.randn(4, 7, generator=g), "b2": torch.randn(4, generator=g),
        "axes": torch.tensor([0]),
    }
    nodes = [
        _node("Sub", ("x", "m"), ("a",), "sub"), _node("Div", ("a", "s"), ("d",), "div"),
        _node("Mul", ("k", "d"), ("e",), "mul"),
        _node("Shape", ("e",), ("shape",), "shape"),
        _node("Gather", ("shape", "idx"), ("batch",), "gather"),
        _node("Unsqueeze", ("batch", "axes"), ("batch1",), "unsqueeze"),
        _node("Concat", ("batch1", "minus1"), ("target",), "concat",
             {"axis": 0}),
        _node("Reshape", ("e", "target"), ("flat",), "reshape"),
        _node("MatMul", ("flat", "W"), ("h",), "matmul"), _node("Add", ("h", "b"), ("h2",), "add"),
        _node("Sub", ("c", "h2"), ("h3",), "subc"), _node("Relu", ("h3",), ("r",), "relu"),
        _node("Gemm", ("r", "W2", "b2"), ("y",), "gemm",
             {"alpha": 0.5, "beta": 2.0,
              "transB": 1}),
    ]
    path = tmp_path / "folded.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 2, 3, 3), "y", (1, 4)))
    _check_against_interpreter(path)
    net = load_onnx(path)
    kinds = [type(m) for m in net.module]
    # Everything before the first Linear layer folds into it; the Sub after it folds back.
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear], kinds


def test_vector_inputs_without_batch_dimension_and_left_matmul(tmp_path: Path) -> None:
    # Like VNN-COMP's test_tiny: W @ x on a 1-D input, then a negative scale before a ReLU
    # (no Linear to absorb it: becomes an eval-mode BatchNorm).
    const = {"W": torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]]),
             "B": torch.tensor([0.1, -0.2]), "k": torch.tensor([-1.5, 2.0]),
             "W2": torch.tensor([[1.0, 1.0]])}
    nodes = [_node("Mul", ("x", "k3"), ("xs",), "scale_in"),
             _node("MatMul", ("W", "xs"), ("m",), "m"), _node("Add", ("m", "B"), ("h",), "a"),
             _node("Relu", ("h",), ("r",), "r"), _node("Mul", ("r", "k"), ("rk",), "mul"),
             _node("Relu", ("rk",), ("r2",), "r2"), _node("MatMul", ("W2", "r2"), ("y",), "out")]
    const["k3"] = torch.tensor([-1.0, 2.0, 3.0])
    path = tmp_path / "vector.onnx"
    path.write_bytes(_graph_model(nodes, const, (3,), "y", (1,)))
    _check_against_interpreter(path)
    net = load_onnx(path)
    assert net.input_shape == (3,)
    assert any(isinstance(m, nn.BatchNorm1d) for m in net.module)
    # The converted model is one tightrope.bounds accepts, and its bounds are sound.
    box = Box(-torch.ones(1, 3), torch.ones(1, 3))
    points = torch.rand(256, 3) * 2 - 1
    outputs = net.module(points)
    for bounds in (ibp(net.module, box), crown(net.module, box)):
        assert bool((bounds.lower <= outputs.min(0).values + 1e-6).all())
        assert bool((bounds.upper >= outputs.max(0).values - 1e-6).all())


def nhwc_graph() -> bytes:
    """NHWC input (1, 4, 4, 2) -> Transpose to NCHW -> Sub per channel -> Conv -> Relu ->
    Transpose back to NHWC -> Flatten -> MatMul + Add (the TensorFlow export pattern)."""
    g = torch.Generator().manual_seed(11)
    const = {"mean": torch.tensor([0.2, 0.7]).reshape(1, 2, 1, 1),
             "W": torch.randn(3, 2, 3, 3, generator=g), "b": torch.randn(3, generator=g),
             "W2": torch.randn(48, 5, generator=g), "b2": torch.randn(5, generator=g)}
    nodes = [
        _node("Transpose", ("x",), ("nchw",), "to_nchw",
             {"perm": (0, 3, 1, 2)}),
        _node("Sub", ("nchw", "mean"), ("c",), "centre"),
        _node("Conv", ("c", "W", "b"), ("conv",), "conv",
             {"pads": (1, 1, 1, 1)}),
        _node("Relu", ("conv",), ("r",), "relu"),
        _node("Transpose", ("r",), ("nhwc",), "to_nhwc",
             {"perm": (0, 2, 3, 1)}),
        _node("Flatten", ("nhwc",), ("f",), "flatten"),
        _node("MatMul", ("f", "W2"), ("m",), "dense"), _node("Add", ("m", "b2"), ("y",), "bias"),
    ]
    return _graph_model(nodes, const, (1, 4, 4, 2), "y", (1, 5))


def test_value_reordering_transposes_fold_into_the_input_and_the_next_linear(
    tmp_path: Path,
) -> None:
    path = tmp_path / "nhwc.onnx"
    path.write_bytes(nhwc_graph())
    net = load_onnx(path)
    assert net.onnx_input_shape == (1, 4, 4, 2)
    assert net.input_shape == (2, 4, 4)
    assert net.input_order is not None
    _check_against_interpreter(path)
    x = torch.rand(1, 4, 4, 2, dtype=torch.float64)
    assert torch.equal(net.to_onnx_order(net.from_onnx_order(x)), x.reshape(-1))
    assert torch.equal(net.from_onnx_order(x), x.permute(0, 3, 1, 2))


def test_reordering_at_the_output_and_before_a_later_conv(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(12)
    const = {"W": torch.randn(6, 6, generator=g), "shape": torch.tensor([1, 2, 3])}
    nodes = [_node("MatMul", ("x", "W"), ("m",), "dense"), _node("Relu", ("m",), ("r",), "relu"),
             _node("Reshape", ("r", "shape"), ("t",), "reshape"),
             _node("Transpose", ("t",), ("y",), "swap", {"perm": (0, 2, 1)})]
    path = tmp_path / "out.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 6), "y", (1, 3, 2)))
    _check_against_interpreter(path)
    const = {"W": torch.randn(1, 2, 1, 1, generator=g), "W2": torch.randn(2, 2, 1, 1)}
    nodes = [_node("Conv", ("x", "W2"), ("c",), "conv1"),
             _node("Transpose", ("c",), ("t",), "swap", {"perm": (0, 1, 3, 2)}),
             _node("Conv", ("t", "W"), ("y",), "conv2")]
    path.write_bytes(_graph_model(nodes, const, (1, 2, 2, 3), "y", (1, 1, 3, 2)))
    with pytest.raises(OnnxImportError, match="Conv 'conv2': would need to reorder"):
        load_onnx(path)


def test_nodes_out_of_order_are_sorted(tmp_path: Path) -> None:
    const = {"W": torch.randn(3, 2, generator=torch.Generator().manual_seed(4))}
    nodes = [_node("Relu", ("h",), ("y",), "relu"), _node("MatMul", ("x", "W"), ("h",), "mm")]
    path = tmp_path / "unsorted.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 3), "y", (1, 2)))
    net = load_onnx(path)
    assert [type(m) for m in net.module] == [nn.Linear, nn.ReLU]
    x = torch.rand(1, 3, dtype=torch.float64)
    torch.testing.assert_close(net.module.double()(x), torch.relu(x @ const["W"].double()))


def test_left_matmul_on_a_column_input(tmp_path: Path) -> None:
    const = {"W": torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, -3.0]]), "b": torch.ones(2, 1)}
    nodes = [_node("MatMul", ("W", "x"), ("m",), "mm"), _node("Add", ("m", "b"), ("a",), "add"),
             _node("Relu", ("a",), ("y",), "relu")]
    path = tmp_path / "column.onnx"
    path.write_bytes(_graph_model(nodes, const, (3, 1), "y", (2, 1)))
    _check_against_interpreter(path)
    assert load_onnx(path).num_outputs == 2


def test_order_keeping_transpose_and_constant_node(tmp_path: Path) -> None:
    const = {"W": torch.randn(6, 4, generator=torch.Generator().manual_seed(5))}
    value = _tensor("v", torch.full((1, 4), 0.25))
    nodes = [_node("Transpose", ("x",), ("t",), "t", {"perm": (1, 0, 2)}),
             _node("Reshape", ("t", "shape"), ("f",), "r"),
             _node("Constant", (), ("cst",), "c", {"value": value}),
             _node("MatMul", ("f", "W"), ("h",), "mm"), _node("Add", ("h", "cst"), ("y",), "add")]
    const["shape"] = torch.tensor([1, 6])
    path = tmp_path / "transpose.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 1, 6), "y", (1, 4)))
    _check_against_interpreter(path)


SUITE_NETS = sorted(SUITE.glob("*/*.onnx")) if SUITE.exists() else []


@pytest.mark.parametrize("path", SUITE_NETS, ids=[p.name for p in SUITE_NETS])
def test_the_shared_suite_networks_match_the_interpreter(path: Path) -> None:
    _check_against_interpreter(path, samples=4)
    net = load_onnx(path)
    if path.name.startswith("mnist-net"):
        assert (net.input_size, net.num_outputs, net.dtype) == (784, 10, torch.float32)


# --- what the onnx package adds: tensor encodings, external data, opsets, valid exports ---


def test_tensor_encodings_read_to_the_same_values(tmp_path: Path) -> None:
    # The same weights as raw_data, float_data, double_data and float16 bit patterns in
    # int32_data; the Reshape target as int64_data.
    g = torch.Generator().manual_seed(21)
    W = torch.randn(3, 6, generator=g).half().double()  # exact in every encoding
    encodings = {
        "raw": numpy_helper.from_array(W.float().numpy(), "W"),
        "float_data": helper.make_tensor("W", TensorProto.FLOAT, (3, 6), W.reshape(-1).tolist()),
        "double_data": helper.make_tensor("W", TensorProto.DOUBLE, (3, 6),
                                          W.reshape(-1).tolist()),
        "float16": helper.make_tensor("W", TensorProto.FLOAT16, (3, 6),
                                      W.half().numpy().reshape(-1)),
    }
    shape = helper.make_tensor("shape", TensorProto.INT64, (2,), [1, 3])
    nodes = [_node("Reshape", ("x", "shape"), ("f",), "flat"),
             _node("MatMul", ("f", "W"), ("y",), "mm")]
    for encoding, weight in encodings.items():
        model = _model(nodes, {}, (1, 1, 3), "y", (1, 6))
        model.graph.initializer.extend([weight, shape])
        onnx.checker.check_model(model)  # not full_check: MatMul of float by double is mixed
        path = tmp_path / f"{encoding}.onnx"
        path.write_bytes(model.SerializeToString())
        net = load_onnx(path, dtype=torch.float64)
        linear = net.module[-1]
        assert isinstance(linear, nn.Linear), encoding
        torch.testing.assert_close(linear.weight, W.T, rtol=0, atol=0)
    model = _model(nodes, {}, (1, 1, 3), "y", (1, 6))
    model.graph.initializer.extend(
        [helper.make_tensor("W", TensorProto.STRING, (1,), [b"w"]), shape])
    (tmp_path / "text.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(OnnxImportError, match="tensor 'W' has data type STRING"):
        load_onnx(tmp_path / "text.onnx")


def test_tensors_in_an_external_data_file_are_read(tmp_path: Path) -> None:
    torch.manual_seed(22)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    proto = onnx.load_model_from_string(export_onnx(model, (5,)))
    path = tmp_path / "net.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="net.onnx.data", size_threshold=0)
    stored = onnx.load(path, load_external_data=False).graph.initializer
    assert all(uses_external_data(tensor) for tensor in stored)
    net = load_onnx(path)
    x = torch.rand(4, 5)
    torch.testing.assert_close(net.module(x), model(x))
    (tmp_path / "net.onnx.data").unlink()
    with pytest.raises(OnnxImportError, match=r"net\.onnx: .*external file"):
        load_onnx(path)
    # A location outside the model's directory is refused, not read.
    escaping = onnx.load(path, load_external_data=False)
    for tensor in escaping.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    path.write_bytes(escaping.SerializeToString())
    with pytest.raises(OnnxImportError, match="points outside the directory"):
        load_onnx(path)


def test_squeeze_and_unsqueeze_axes_before_and_after_opset_13(tmp_path: Path) -> None:
    # Opset 13 moved Squeeze/Unsqueeze ``axes`` from an attribute to an input; both read the
    # same (the models pass onnx's checker for their opset).
    g = torch.Generator().manual_seed(23)
    W = torch.randn(4, 3, generator=g)
    modules = []
    for opset in (11, 13):
        if opset < 13:
            const = {"W": W}
            squeeze = [_node("Unsqueeze", ("x",), ("u",), "unsqueeze", {"axes": (0,)}),
                       _node("Squeeze", ("u",), ("s",), "squeeze", {"axes": (0,)})]
        else:
            const = {"W": W, "axes": torch.tensor([0])}
            squeeze = [_node("Unsqueeze", ("x", "axes"), ("u",), "unsqueeze"),
                       _node("Squeeze", ("u", "axes"), ("s",), "squeeze")]
        nodes = [*squeeze, _node("MatMul", ("s", "W"), ("m",), "mm"),
                 _node("Relu", ("m",), ("y",), "relu")]
        model = _model(nodes, const, (1, 4), "y", (1, 3), opset=opset)
        onnx.checker.check_model(model, full_check=True)
        path = tmp_path / f"opset{opset}.onnx"
        path.write_bytes(model.SerializeToString())
        _check_against_interpreter(path, samples=4)
        modules.append(load_onnx(path).module)
    x = torch.rand(6, 4)
    torch.testing.assert_close(modules[0](x), modules[1](x), rtol=0, atol=0)


@pytest.mark.parametrize("linear_op", list(LinearOp))
def test_exports_are_valid_onnx_that_onnx_runs_to_the_torch_output(linear_op: LinearOp) -> None:
    torch.manual_seed(24)
    model = _conv_net()
    # Opset 15: onnx's reference BatchNormalization-9 (opsets 9-13) normalises with the batch's
    # statistics (its default momentum), not the running ones the operator's definition uses.
    data = export_onnx(model, (2, 16, 16), linear_op=linear_op, dtype=torch.float64, opset=15)
    proto = onnx.load_model_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    x = torch.rand(1, 2, 16, 16, dtype=torch.float64)
    (y,) = ReferenceEvaluator(proto).run(None, {"input": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(np.asarray(y)), model(x), rtol=1e-10,
                               atol=1e-10)


# --- errors --------------------------------------------------------------------------------


def test_every_unsupported_node_is_listed_at_once(tmp_path: Path) -> None:
    nodes = [_node("MaxPool", ("x",), ("p",), "pool1",
                  {"kernel_shape": (2, 2), "ceil_mode": 1}),
             _node("Sigmoid", ("p",), ("s",), "act"), _node("Flatten", ("s",), ("f",), "flat"),
             _node("Tanh", ("f",), ("y",), "act2")]
    path = tmp_path / "bad.onnx"
    path.write_bytes(_graph_model(nodes, {}, (1, 1, 4, 4), "y", (1, 4)))
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    message = str(info.value)
    assert str(path) in message
    for expected in ("MaxPool 'pool1'", "Sigmoid 'act'", "Tanh 'act2'"):
        assert expected in message
    assert "Flatten" not in message
    assert len(info.value.problems) == 3


def test_branching_graph_and_asymmetric_padding_are_reported(tmp_path: Path) -> None:
    const = {"W": torch.ones(2, 1, 3, 3)}
    nodes = [_node("Relu", ("x",), ("r",), "relu"), _node("Mul", ("r", "x"), ("s",), "residual"),
             _node("Conv", ("s", "W"), ("y",), "conv",
                  {"pads": (1, 1, 0, 0)})]
    path = tmp_path / "branch.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 1, 4, 4), "y", (1, 2, 3, 3)))
    with pytest.raises(OnnxImportError, match="residual"):
        load_onnx(path)
    nodes = [_node("Conv", ("x", "W"), ("y",), "conv",
                  {"pads": (1, 1, 0, 0)})]
    path.write_bytes(_graph_model(nodes, const, (1, 1, 4, 4), "y", (1, 2, 3, 3)))
    with pytest.raises(OnnxImportError, match="asymmetric pads"):
        load_onnx(path)


def test_nan_or_inf_constants_and_overflowing_weights_are_named(tmp_path: Path) -> None:
    const = {"W": torch.ones(2, 4), "unused": torch.full((3,), float("nan"))}
    const["W"][1, 2] = float("inf")
    value = _tensor("v", torch.tensor([0.5, float("nan")]))
    nodes = [_node("Constant", (), ("shift",), "c", {"value": value}),
             _node("Gemm", ("x", "W"), ("h",), "gemm", {"transB": 1}),
             _node("Add", ("h", "shift"), ("y",), "add")]
    path = tmp_path / "nan.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 4), "y", (1, 2)))
    with pytest.raises(OnnxImportError) as info:
        load_onnx(path)
    assert info.value.problems == ("NaN or inf values in initializer 'W', Constant 'c' (output "
                                   "'shift'): such a network cannot be verified; fix or "
                                   "re-export it with finite weights",)
    assert "\n" not in str(info.value)  # one problem: one line
    # Finite in float64, inf once cast to float32: named by layer.
    big = nn.Sequential(nn.Linear(4, 2)).double()
    with torch.no_grad():
        big[0].weight[0, 0] = 1e300
    export_onnx(big, (4,), path, dtype=torch.float64)
    assert load_onnx(path).dtype == torch.float64
    overflow = r"NaN or inf values in 0\.weight \(in torch\.float32"
    with pytest.raises(OnnxImportError, match=overflow):
        load_onnx(path, dtype=torch.float32)


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", b"\x3a\xff\xff\xff\x0f"])
def test_corrupt_files_give_a_clear_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(content)
    with pytest.raises(OnnxImportError, match=r"corrupt\.onnx"):
        load_onnx(path)


def test_truncated_real_file_and_missing_file(tmp_path: Path) -> None:
    torch.manual_seed(2)
    data = export_onnx(nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 2)), (30,))
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxImportError, match=r"(?s)cut\.onnx: .*not a valid ONNX"):
        load_onnx(path)
    with pytest.raises(OnnxImportError, match="cannot read the file"):
        load_onnx(tmp_path / "missing.onnx")


def test_flat_input_reshaped_to_an_image_pooling_and_unit_axes(tmp_path: Path) -> None:
    # (1, 16) -> Reshape (1, 1, 4, 4) -> Conv (dilated, padded) -> BatchNormalization with a
    # negative scale -> Relu -> AveragePool (padded, count_include_pad=0) -> Neg -> Unsqueeze
    # -> Squeeze -> Flatten -> Gemm
    g = torch.Generator().manual_seed(7)
    const = {
        "shape": torch.tensor([1, 1, 4, 4]), "W": torch.randn(3, 1, 3, 3, generator=g),
        "b": torch.randn(3, generator=g), "gamma": torch.tensor([-1.0, 0.5, 2.0]),
        "beta": torch.randn(3, generator=g), "mean": torch.randn(3, generator=g),
        "var": torch.rand(3, generator=g) + 0.5, "axes": torch.tensor([0]),
        "W2": torch.randn(2, 27, generator=g),
    }
    pool = {"kernel_shape": (2, 2),
            "strides": (2, 2),
            "pads": (1, 1, 1, 1),
            "count_include_pad": 0}
    conv = {"pads": (2, 2, 2, 2),
            "dilations": (2, 2)}
    nodes = [
        _node("Reshape", ("x", "shape"), ("img",), "reshape"),
        _node("Conv", ("img", "W", "b"), ("c",), "conv", conv),
        _node("BatchNormalization", ("c", "gamma", "beta", "mean", "var"), ("n",), "bn"),
        _node("Relu", ("n",), ("r",), "relu"),
        _node("AveragePool", ("r",), ("p",), "pool", pool),
        _node("Neg", ("p",), ("q",), "neg"),
        _node("Unsqueeze", ("q", "axes"), ("u",), "unsqueeze"),
        _node("Squeeze", ("u", "axes"), ("s",), "squeeze"),
        _node("Flatten", ("s",), ("f",), "flatten"),
        _node("Gemm", ("f", "W2"), ("y",), "gemm", {"transB": 1}),
    ]
    path = tmp_path / "image.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 16), "y", (1, 2)))
    net = load_onnx(path)
    assert net.input_shape == (1, 4, 4)  # the reshape at the input became the input layout
    assert net.onnx_input_shape == (1, 16)
    kinds = [type(m) for m in net.module]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.AvgPool2d, nn.Flatten, nn.Linear], kinds
    _check_against_interpreter(path)


def test_elementwise_map_varying_inside_channels_becomes_per_value(
    tmp_path: Path,
) -> None:
    const = {"k": torch.arange(1.0, 17.0).reshape(1, 1, 4, 4), "W": torch.ones(1, 1, 2, 2)}
    nodes = [_node("Mul", ("x", "k"), ("m",), "scale"), _node("Relu", ("m",), ("r",), "relu"),
             _node("Conv", ("r", "W"), ("y",), "conv")]
    path = tmp_path / "pixelwise.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 1, 4, 4), "y", (1, 1, 3, 3)))
    with pytest.raises(OnnxImportError, match="Conv 'conv': would need to reshape a flat"):
        load_onnx(path)
    # Without the Conv the pixelwise map is a BatchNorm1d over the flattened image.
    path.write_bytes(_graph_model(nodes[:2], const, (1, 1, 4, 4), "r", (1, 1, 4, 4)))
    _check_against_interpreter(path)
    assert isinstance(load_onnx(path).module[1], nn.BatchNorm1d)
    # On a flat value the same map is per feature: an eval-mode BatchNorm1d.
    nodes = [_node("Flatten", ("x",), ("f",), "flatten"),
             _node("Mul", ("f", "k16"), ("m",), "scale"), _node("Relu", ("m",), ("y",), "relu")]
    path.write_bytes(_graph_model(nodes, {"k16": -torch.arange(1.0, 17.0)}, (1, 1, 4, 4), "y",
                                  (1, 16)))
    _check_against_interpreter(path)
