"""The ONNX reader: wire format, conversion against an independent ONNX interpreter, errors."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tightrope.bounds import Box, Normalize, crown, ibp
from tightrope.verify.onnx import OnnxImportError, export_onnx, load_onnx
from tightrope.verify.onnx.export import LinearOp
from tightrope.verify.onnx.proto import (
    Attribute,
    Graph,
    Model,
    Node,
    TensorProto,
    ValueInfo,
    decode_model,
    encode_model,
)
from tightrope.verify.onnx.wire import (
    WireError,
    encode_key,
    encode_varint,
    fields,
    packed_varints,
    signed64,
)

SUITE = Path("/work/shared/benchmarks/vnncomp2021")


# --- an independent ONNX interpreter (the operators' definitions from onnx.ai) -------------


def _i(node: Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None or a.i is None else a.i


def _f(node: Node, name: str, default: float) -> float:
    a = node.attributes.get(name)
    return default if a is None or a.f is None else a.f


def _ints(node: Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    a = node.attributes.get(name)
    return default if a is None else a.ints


def run_onnx(graph: Graph, x: Tensor) -> Tensor:
    """Evaluate ``graph`` on one input ``x`` (its declared shape) in float64."""
    env: dict[str, Tensor] = {k: v.values.double() if v.values.is_floating_point() else v.values
                              for k, v in graph.initializers.items()}
    env[next(v.name for v in graph.inputs if v.name not in env)] = x.double()
    for node in graph.nodes:
        a = [env[n] for n in node.inputs if n]
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
            tensor = next(iter(node.attributes.values())).t
            assert tensor is not None
            y = tensor.values
        elif op == "Shape":
            y = torch.tensor(a[0].shape)
        elif op == "Gather":
            y = a[0][a[1]]
        elif op == "Unsqueeze":
            y = a[0]
            for axis in sorted(a[1].tolist()):
                y = y.unsqueeze(axis)
        elif op == "Squeeze":
            y = a[0]
            for axis in sorted(a[1].tolist(), reverse=True):
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
        env[node.outputs[0]] = y
    return env[graph.outputs[0].name]


def _tensor(name: str, value: Tensor) -> TensorProto:
    stored = value.float() if value.is_floating_point() else value
    return TensorProto(name, tuple(value.shape), stored)


def _graph_model(nodes: list[Node], constants: dict[str, Tensor], input_shape: tuple[int, ...],
                 output: str, output_shape: tuple[int, ...]) -> bytes:
    graph = Graph(tuple(nodes), {k: _tensor(k, v) for k, v in constants.items()},
                  (ValueInfo("x", 1, input_shape),), (ValueInfo(output, 1, output_shape),))
    return encode_model(Model(graph, opset=13, ir_version=8))


def _check_against_interpreter(path: Path, samples: int = 16, seed: int = 0) -> None:
    """The converted module agrees with the ONNX interpreter on random inputs (float64)."""
    net = load_onnx(path, dtype=torch.float64)
    graph = decode_model(path.read_bytes()).graph
    generator = torch.Generator().manual_seed(seed)
    for _ in range(samples):
        x = torch.rand(net.onnx_input_shape, generator=generator, dtype=torch.float64) * 2 - 1
        expected = run_onnx(graph, x).reshape(-1)
        got = net.module(net.from_onnx_order(x)).reshape(-1)
        assert got.shape == (net.num_outputs,)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# --- wire format ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)])
def test_varints_round_trip_including_negative_int64(value: int) -> None:
    data = encode_key(3, 0) + encode_varint(value)
    ((number, wire_type, decoded),) = list(fields(data))
    assert (number, wire_type) == (3, 0)
    assert isinstance(decoded, int)
    assert signed64(decoded) == value


def test_packed_fields_and_fixed_width_values() -> None:
    packed = b"".join(encode_varint(v) for v in (1, 300, 5))
    data = encode_key(1, 2) + encode_varint(len(packed)) + packed
    data += encode_key(2, 5) + struct.pack("<f", 1.5) + encode_key(3, 1) + struct.pack("<d", -2.0)
    (_, _, first), (_, _, second), (_, _, third) = list(fields(data))
    assert isinstance(first, memoryview)
    assert packed_varints(first) == [1, 300, 5]
    assert isinstance(second, memoryview)
    assert isinstance(third, memoryview)
    assert struct.unpack("<f", bytes(second))[0] == 1.5
    assert struct.unpack("<d", bytes(third))[0] == -2.0


@pytest.mark.parametrize(
    "data", [b"\x0a\x05ab", b"\x08\x80", b"\x0b", b"\x00\x01", b"\x0d\x01\x02"]
)
def test_malformed_wire_data_raises(data: bytes) -> None:
    with pytest.raises(WireError):
        list(fields(data))


def test_tensor_proto_reads_float_data_int64_data_and_raw_data() -> None:
    floats = struct.pack("<3f", 1.0, -2.5, 4.0)
    message = b"".join(encode_key(1, 0) + encode_varint(d) for d in (3,))
    message += encode_key(2, 0) + encode_varint(1) + encode_key(4, 2) + encode_varint(12) + floats
    assert TensorProto.decode(memoryview(message)).values.tolist() == [1.0, -2.5, 4.0]
    ints = b"".join(encode_varint(v) for v in (5, -1))
    message = encode_key(1, 0) + encode_varint(2) + encode_key(2, 0) + encode_varint(7)
    message += encode_key(7, 2) + encode_varint(len(ints)) + ints
    assert TensorProto.decode(memoryview(message)).values.tolist() == [5, -1]
    value = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    decoded = TensorProto.decode(memoryview(TensorProto("w", (2, 3), value).encode()))
    assert decoded.name == "w"
    assert torch.equal(decoded.values, value)


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
        Node("Sub", ("x", "m"), ("a",), "sub"), Node("Div", ("a", "s"), ("d",), "div"),
        Node("Mul", ("k", "d"), ("e",), "mul"),
        Node("Shape", ("e",), ("shape",), "shape"),
        Node("Gather", ("shape", "idx"), ("batch",), "gather"),
        Node("Unsqueeze", ("batch", "axes"), ("batch1",), "unsqueeze"),
        Node("Concat", ("batch1", "minus1"), ("target",), "concat",
             {"axis": Attribute("axis", i=0)}),
        Node("Reshape", ("e", "target"), ("flat",), "reshape"),
        Node("MatMul", ("flat", "W"), ("h",), "matmul"), Node("Add", ("h", "b"), ("h2",), "add"),
        Node("Sub", ("c", "h2"), ("h3",), "subc"), Node("Relu", ("h3",), ("r",), "relu"),
        Node("Gemm", ("r", "W2", "b2"), ("y",), "gemm",
             {"alpha": Attribute("alpha", f=0.5), "beta": Attribute("beta", f=2.0),
              "transB": Attribute("transB", i=1)}),
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
    nodes = [Node("Mul", ("x", "k3"), ("xs",), "scale_in"),
             Node("MatMul", ("W", "xs"), ("m",), "m"), Node("Add", ("m", "B"), ("h",), "a"),
             Node("Relu", ("h",), ("r",), "r"), Node("Mul", ("r", "k"), ("rk",), "mul"),
             Node("Relu", ("rk",), ("r2",), "r2"), Node("MatMul", ("W2", "r2"), ("y",), "out")]
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
        Node("Transpose", ("x",), ("nchw",), "to_nchw",
             {"perm": Attribute("perm", ints=(0, 3, 1, 2))}),
        Node("Sub", ("nchw", "mean"), ("c",), "centre"),
        Node("Conv", ("c", "W", "b"), ("conv",), "conv",
             {"pads": Attribute("pads", ints=(1, 1, 1, 1))}),
        Node("Relu", ("conv",), ("r",), "relu"),
        Node("Transpose", ("r",), ("nhwc",), "to_nhwc",
             {"perm": Attribute("perm", ints=(0, 2, 3, 1))}),
        Node("Flatten", ("nhwc",), ("f",), "flatten"),
        Node("MatMul", ("f", "W2"), ("m",), "dense"), Node("Add", ("m", "b2"), ("y",), "bias"),
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
    nodes = [Node("MatMul", ("x", "W"), ("m",), "dense"), Node("Relu", ("m",), ("r",), "relu"),
             Node("Reshape", ("r", "shape"), ("t",), "reshape"),
             Node("Transpose", ("t",), ("y",), "swap", {"perm": Attribute("perm", ints=(0, 2, 1))})]
    path = tmp_path / "out.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 6), "y", (1, 3, 2)))
    _check_against_interpreter(path)
    const = {"W": torch.randn(1, 2, 1, 1, generator=g), "W2": torch.randn(2, 2, 1, 1)}
    nodes = [Node("Conv", ("x", "W2"), ("c",), "conv1"),
             Node("Transpose", ("c",), ("t",), "swap", {"perm": Attribute("perm",
                                                                          ints=(0, 1, 3, 2))}),
             Node("Conv", ("t", "W"), ("y",), "conv2")]
    path.write_bytes(_graph_model(nodes, const, (1, 2, 2, 3), "y", (1, 1, 3, 2)))
    with pytest.raises(OnnxImportError, match="Conv 'conv2': would need to reorder"):
        load_onnx(path)


def test_nodes_out_of_order_are_sorted(tmp_path: Path) -> None:
    const = {"W": torch.randn(3, 2, generator=torch.Generator().manual_seed(4))}
    nodes = [Node("Relu", ("h",), ("y",), "relu"), Node("MatMul", ("x", "W"), ("h",), "mm")]
    path = tmp_path / "unsorted.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 3), "y", (1, 2)))
    net = load_onnx(path)
    assert [type(m) for m in net.module] == [nn.Linear, nn.ReLU]
    x = torch.rand(1, 3, dtype=torch.float64)
    torch.testing.assert_close(net.module.double()(x), torch.relu(x @ const["W"].double()))


def test_left_matmul_on_a_column_input(tmp_path: Path) -> None:
    const = {"W": torch.tensor([[1.0, -1.0, 2.0], [0.5, 0.0, -3.0]]), "b": torch.ones(2, 1)}
    nodes = [Node("MatMul", ("W", "x"), ("m",), "mm"), Node("Add", ("m", "b"), ("a",), "add"),
             Node("Relu", ("a",), ("y",), "relu")]
    path = tmp_path / "column.onnx"
    path.write_bytes(_graph_model(nodes, const, (3, 1), "y", (2, 1)))
    _check_against_interpreter(path)
    assert load_onnx(path).num_outputs == 2


def test_order_keeping_transpose_and_constant_node(tmp_path: Path) -> None:
    const = {"W": torch.randn(6, 4, generator=torch.Generator().manual_seed(5))}
    value = Attribute("value", t=_tensor("v", torch.full((1, 4), 0.25)))
    nodes = [Node("Transpose", ("x",), ("t",), "t", {"perm": Attribute("perm", ints=(1, 0, 2))}),
             Node("Reshape", ("t", "shape"), ("f",), "r"),
             Node("Constant", (), ("cst",), "c", {"value": value}),
             Node("MatMul", ("f", "W"), ("h",), "mm"), Node("Add", ("h", "cst"), ("y",), "add")]
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


# --- errors --------------------------------------------------------------------------------


def test_every_unsupported_node_is_listed_at_once(tmp_path: Path) -> None:
    nodes = [Node("MaxPool", ("x",), ("p",), "pool1",
                  {"kernel_shape": Attribute("kernel_shape", ints=(2, 2))}),
             Node("Sigmoid", ("p",), ("s",), "act"), Node("Flatten", ("s",), ("f",), "flat"),
             Node("Tanh", ("f",), ("y",), "act2")]
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
    nodes = [Node("Relu", ("x",), ("r",), "relu"), Node("Add", ("r", "x"), ("s",), "residual"),
             Node("Conv", ("s", "W"), ("y",), "conv",
                  {"pads": Attribute("pads", ints=(1, 1, 0, 0))})]
    path = tmp_path / "branch.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 1, 4, 4), "y", (1, 2, 3, 3)))
    with pytest.raises(OnnxImportError, match="residual"):
        load_onnx(path)
    nodes = [Node("Conv", ("x", "W"), ("y",), "conv",
                  {"pads": Attribute("pads", ints=(1, 1, 0, 0))})]
    path.write_bytes(_graph_model(nodes, const, (1, 1, 4, 4), "y", (1, 2, 3, 3)))
    with pytest.raises(OnnxImportError, match="asymmetric pads"):
        load_onnx(path)


def test_nan_or_inf_constants_and_overflowing_weights_are_named(tmp_path: Path) -> None:
    const = {"W": torch.ones(2, 4), "unused": torch.full((3,), float("nan"))}
    const["W"][1, 2] = float("inf")
    value = Attribute("value", t=_tensor("v", torch.tensor([0.5, float("nan")])))
    nodes = [Node("Constant", (), ("shift",), "c", {"value": value}),
             Node("Gemm", ("x", "W"), ("h",), "gemm", {"transB": Attribute("transB", i=1)}),
             Node("Add", ("h", "shift"), ("y",), "add")]
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
    pool = {"kernel_shape": Attribute("kernel_shape", ints=(2, 2)),
            "strides": Attribute("strides", ints=(2, 2)),
            "pads": Attribute("pads", ints=(1, 1, 1, 1)),
            "count_include_pad": Attribute("count_include_pad", i=0)}
    conv = {"pads": Attribute("pads", ints=(2, 2, 2, 2)),
            "dilations": Attribute("dilations", ints=(2, 2))}
    nodes = [
        Node("Reshape", ("x", "shape"), ("img",), "reshape"),
        Node("Conv", ("img", "W", "b"), ("c",), "conv", conv),
        Node("BatchNormalization", ("c", "gamma", "beta", "mean", "var"), ("n",), "bn"),
        Node("Relu", ("n",), ("r",), "relu"),
        Node("AveragePool", ("r",), ("p",), "pool", pool),
        Node("Neg", ("p",), ("q",), "neg"),
        Node("Unsqueeze", ("q", "axes"), ("u",), "unsqueeze"),
        Node("Squeeze", ("u", "axes"), ("s",), "squeeze"),
        Node("Flatten", ("s",), ("f",), "flatten"),
        Node("Gemm", ("f", "W2"), ("y",), "gemm", {"transB": Attribute("transB", i=1)}),
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
    nodes = [Node("Mul", ("x", "k"), ("m",), "scale"), Node("Relu", ("m",), ("r",), "relu"),
             Node("Conv", ("r", "W"), ("y",), "conv")]
    path = tmp_path / "pixelwise.onnx"
    path.write_bytes(_graph_model(nodes, const, (1, 1, 4, 4), "y", (1, 1, 3, 3)))
    with pytest.raises(OnnxImportError, match="Conv 'conv': would need to reshape a flat"):
        load_onnx(path)
    # Without the Conv the pixelwise map is a BatchNorm1d over the flattened image.
    path.write_bytes(_graph_model(nodes[:2], const, (1, 1, 4, 4), "r", (1, 1, 4, 4)))
    _check_against_interpreter(path)
    assert isinstance(load_onnx(path).module[1], nn.BatchNorm1d)
    # On a flat value the same map is per feature: an eval-mode BatchNorm1d.
    nodes = [Node("Flatten", ("x",), ("f",), "flatten"),
             Node("Mul", ("f", "k16"), ("m",), "scale"), Node("Relu", ("m",), ("y",), "relu")]
    path.write_bytes(_graph_model(nodes, {"k16": -torch.arange(1.0, 17.0)}, (1, 1, 4, 4), "y",
                                  (1, 16)))
    _check_against_interpreter(path)
