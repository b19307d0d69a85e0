"""ONNX import and export: files are parsed and written with the ``onnx`` package; a
converter for the layers ``tightrope.bounds`` supports turns the parsed graph into a torch
module (an ``nn.Sequential`` for chains, a ``torch.fx.GraphModule`` for graphs that branch),
and an exporter writes ``nn.Sequential`` modules back.

Example::

    from tightrope.verify.onnx import load_onnx

    net = load_onnx("mnist-net_256x2.onnx")   # OnnxModel
    y = net.module(x.reshape(-1, *net.input_shape))   # (N, net.num_outputs)
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import onnx
import torch
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model
from torch import Tensor, nn

from tightrope.verify.onnx.convert import OnnxImportError, convert_graph
from tightrope.verify.onnx.export import export_onnx

__all__ = ["OnnxImportError", "OnnxModel", "export_onnx", "load_onnx"]


@dataclass(frozen=True, slots=True)
class OnnxModel:
    """A network read from an ONNX file.

    Attributes:
        module: in eval mode, mapping ``(N, *input_shape)`` to ``(N, num_outputs)``; built
            only from layers that ``tightrope.bounds`` supports: an ``nn.Sequential`` when the
            graph's input-dependent values form a chain, else a ``torch.fx.GraphModule``
            (residual connections, concatenations).
        input_shape: the per-sample input shape ``S`` the module takes. Its row-major order is
            the ONNX input's (VNNLIB's ``X_i`` is element ``i`` of the flattened input) unless
            ``input_order`` says otherwise.
        onnx_input_shape: the input shape declared in the file (symbolic dims as 1).
        num_outputs: the number of outputs (VNNLIB's ``Y_i``), flattened in ONNX order.
        dtype: the element type of the ONNX input (the module's parameters use it unless
            :func:`load_onnx` was asked for another).
        input_name, output_name: the graph's input and output names.
        input_order: ``None``, or (when the graph starts by reordering its input, e.g. an
            NHWC -> NCHW Transpose before a Conv) the permutation with
            ``module_input.flatten()[i] = onnx_input.flatten()[input_order[i]]``; see
            :meth:`from_onnx_order` and :meth:`to_onnx_order`.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    onnx_input_shape: tuple[int, ...]
    num_outputs: int
    dtype: torch.dtype
    input_name: str
    output_name: str
    input_order: tuple[int, ...] | None = None

    def from_onnx_order(self, values: Tensor) -> Tensor:
        """Input values in ONNX order (any shape, ``input_size`` of them) -> the module's input
        ``(1, *input_shape)``."""
        flat = values.reshape(-1)
        if self.input_order is not None:
            flat = flat[torch.tensor(self.input_order)]
        return flat.reshape(1, *self.input_shape)

    def to_onnx_order(self, x: Tensor) -> Tensor:
        """The module's input ``(1, *input_shape)`` -> the flat ONNX input (VNNLIB's ``X_i``)."""
        flat = x.reshape(-1)
        if self.input_order is None:
            return flat
        out = torch.empty_like(flat)
        out[torch.tensor(self.input_order)] = flat
        return out

    @property
    def input_size(self) -> int:
        """The number of input values (VNNLIB's ``X_i``)."""
        size = 1
        for d in self.input_shape:
            size *= d
        return size


def load_onnx(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> OnnxModel:
    """Read an ONNX file into an :class:`OnnxModel`.

    Supported operators: Gemm, MatMul, Add, Sub, Mul, Div, Neg (with constants; Add and Sub
    also of two input-dependent values), Conv (2-D), Relu, MaxPool, AveragePool,
    GlobalAveragePool, constant Pad, Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Concat,
    Constant, BatchNormalization, Identity, Dropout, Cast, and Shape/Gather on constants; one
    input and one output. See :mod:`tightrope.verify.onnx.convert` for what each becomes.

    Args:
        path: the ``.onnx`` file, or a gzip-compressed ``.onnx.gz``. Tensors kept in external
            data files are read from the file's directory.
        dtype: the module's parameter dtype; the ONNX input's element type by default. The
            conversion itself is done in float64.

    Raises:
        OnnxImportError: the file (or an external data file) is missing or corrupt (message
            names the file and the problem), nodes cannot be converted (message lists every
            one of them), or weights, biases or constants hold NaN or inf (message names the
            initializers and ``Constant`` nodes; or the layers, when only folding or the cast
            made them so).
    """
    source = os.fspath(path)
    try:
        with (gzip.open if source.endswith(".gz") else open)(source, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise OnnxImportError(source, [f"cannot read the file: {reason}"]) from error
    model = _parse(data, source)
    opset = 0
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            opset = entry.version
    converted = convert_graph(model.graph, opset, source)
    module_dtype = dtype or converted.dtype
    module = converted.module.to(module_dtype)
    tensors = [*module.named_parameters(), *module.named_buffers()]
    bad = [name for name, tensor in tensors
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:  # finite in the file, but not after folding or the cast (1e39 in float32)
        raise OnnxImportError(source, [
            f"the converted layers have NaN or inf values in {', '.join(bad)} (in "
            f"{module_dtype}, after folding the graph's constants): check the "
            "constants (e.g. a negative BatchNormalization variance, values past the dtype's "
            "range)"])
    num_outputs = 1
    for d in converted.onnx_output_shape:
        num_outputs *= d
    return OnnxModel(
        module=module,
        input_shape=converted.input_shape,
        onnx_input_shape=converted.onnx_input_shape,
        num_outputs=num_outputs,
        dtype=converted.dtype,
        input_name=converted.input_name,
        output_name=converted.output_name,
        input_order=converted.input_order,
    )


def _parse(data: bytes, source: str) -> onnx.ModelProto:
    """The ``ModelProto`` in ``data``, with tensors in external data files (named relative to
    ``source``'s directory) loaded into it."""
    try:
        model = onnx.load_model_from_string(data)
    except DecodeError as error:
        raise OnnxImportError(source, [f"not a valid ONNX (protobuf) file: {error}"]) from error
    if not model.HasField("graph"):  # protobuf reads b"" (or any stray field) as a message
        raise OnnxImportError(source, ["not a valid ONNX (protobuf) file: no graph in it"])
    try:
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(source)))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        # missing, too short, or outside the model's directory
        raise OnnxImportError(source, [
            f"cannot read the tensor data kept in an external file: {error} (external data "
            "files are looked up next to the .onnx file)"]) from error
    return model
