"""Lowering a model to the two kinds of operation the bound rules know: affine maps and ReLUs.

This module holds the layer table, the one extension point for new layers. Every supported
layer except ReLU is an affine map of one sample, ``z -> L z + b``, and is described by an
:class:`Affine` with two callables:

* ``apply(z)``: the map itself on a batch ``(N, *S_in) -> (N, *S_out)``;
* ``apply_abs(r)``: ``|L| r``, the linear part with entrywise absolute values, on a batch.
  Interval propagation needs it (``r' = |L| r``); nothing else does.

The backward (CROWN) pass needs ``L^T``, which a rule need not write: by default it is the
vector-Jacobian product of ``apply`` (see :func:`transpose`). The built-in layers also give an
optional ``fast_transpose`` (and, for convolutions, a ``window_transpose`` on receptive fields,
and for strided convolutions with few input channels a ``concretize`` that bounds rows over an
input box without forming their transpose in the input's layout) for speed; tests check them
against the vector-Jacobian product and the dense pass. BatchNorm
is folded into a preceding convolution through ``channel_affine``/``absorb``. To support a new
affine layer, register a rule::

    @affine_rule(MyScale)
    def _my_scale(module: MyScale, reference: Tensor) -> Affine:
        return Affine(apply=module, apply_abs=lambda r: r * module.factor.abs(),
                      name="MyScale")

``reference`` is the batch that reaches the layer in a clean forward pass of the box centre;
rules that need batch statistics (BatchNorm in train mode) read it, others use its shape only.
When no BatchNorm of the model uses batch statistics, the bound functions pass an empty batch
(zero samples), which fixes the shapes at no cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeAlias, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tightrope.bounds.core import features_dot
from tightrope.bounds.modules import Add as AddModule
from tightrope.bounds.modules import Concat as ConcatModule
from tightrope.bounds.modules import Elementwise, Normalize, Pad, Permute, Reshape

__all__ = [
    "OP_KINDS",
    "Add",
    "Affine",
    "Concat",
    "MaxPool",
    "Network",
    "Op",
    "Relu",
    "affine_rule",
    "expect_relu",
    "lower",
    "rule_for",
    "supported_layers",
    "transpose",
]

TensorMap: TypeAlias = Callable[[Tensor], Tensor]
Corner: TypeAlias = tuple[int, int]
WindowMap: TypeAlias = Callable[[Tensor, Corner, Corner], tuple[Tensor, Corner]]


@dataclass(frozen=True, slots=True)
class Affine:
    """An affine map of one sample, batched over the leading dimension."""

    apply: TensorMap
    apply_abs: TensorMap
    name: str
    #: False for maps that never mix coordinates (per-element scale and shift, reshapes):
    #: interval arithmetic is exact through a chain holding at most one mixing map.
    mixing: bool = True
    #: Optional fast ``L^T`` on rows, ``(N, *S_out) -> (N, *S_in)``. When absent, the
    #: transpose is the vector-Jacobian product of ``apply`` (see :func:`transpose`); tests
    #: check every fast path against it.
    fast_transpose: TensorMap | None = None
    #: For a per-channel map ``z * scale + shift`` (channels on dimension 1): ``(scale, shift)``.
    channel_affine: tuple[Tensor, Tensor] | None = None
    #: For a weighted map (Linear, Conv2d): builds the composition of this map followed by the
    #: per-output-channel map ``z * scale + shift``, folded into the weights.
    absorb: Callable[[Tensor, Tensor], Affine] | None = None
    #: For convolutions: ``L^T`` of rows supported on a spatial window. Takes rows
    #: ``(N, C_out, h, w)`` whose top-left pixel is ``(i, j)`` in output coordinates and the
    #: input's ``(H, W)``; returns the rows on the input window (clipped to the image) and its
    #: top-left pixel. Lets intermediate CROWN passes work on receptive fields, not images.
    window_transpose: WindowMap | None = None
    #: True for maps that act per channel on ``(N, C, H, W)`` with the same shape out (scale and
    #: shift): their ``fast_transpose`` applies unchanged to rows on any spatial window.
    channelwise: bool = False
    #: For convolutions: ``L^T`` of rows on windows of any position, without cropping:
    #: ``(N, C_out, h, w) -> (N, C_in, h', w')``, plus ``(stride, padding)`` per spatial
    #: dimension: a window whose top-left pixel is ``p`` maps to one whose top-left pixel is
    #: ``p * stride - padding`` (which may lie outside the image; the caller masks it).
    patch_transpose: tuple[TensorMap, tuple[int, int], tuple[int, int]] | None = None
    #: Optional ``min over z in [c - r, c + r] of A (L z)`` for rows ``A: (B, K, *S_out)`` and
    #: ``c, r: (B, *S_in)`` -> ``(B, K)`` (no constant term): the backward pass's last step when
    #: the map is the network's first mixing one, for maps whose transpose is cheaper to bound
    #: in another layout than to form (strided convolutions with few input channels).
    concretize: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    #: Optional per-sample output shape for the input the rule was given. Lowering an empty
    #: reference batch (no BatchNorm on batch statistics) then skips this map's shape-finding
    #: forward pass; tests check it against that pass for every rule.
    out_shape: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Relu:
    """An elementwise ReLU."""

    name: str = "ReLU"


@dataclass(frozen=True, slots=True)
class Add:
    """The sum of two values of one shape, both depending on the input (a residual join)."""

    name: str = "Add"


@dataclass(frozen=True, slots=True)
class Concat:
    """Values joined along per-sample dimension ``dim`` (0 is the first after the batch)."""

    dim: int
    name: str = "Concat"


@dataclass(frozen=True, slots=True)
class MaxPool:
    """2-d max pooling (``nn.MaxPool2d`` without dilation or ceil mode; padding is ``-inf``)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    name: str = "MaxPool2d"

    def apply(self, z: Tensor) -> Tensor:
        return F.max_pool2d(z, self.kernel, self.stride, self.padding)


#: Every op kind of the graph form. Each domain (interval, backward linear relaxation, LP/MILP
#: encoding) has one rule per kind and dispatches exhaustively: see :func:`rule_for`.
Op: TypeAlias = Affine | Relu | Add | Concat | MaxPool
OP_KINDS: tuple[type, ...] = (Affine, Relu, Add, Concat, MaxPool)
_R = TypeVar("_R")


def expect_relu(op: Op, what: str) -> Relu:
    """``op`` when it is a ReLU; otherwise a clear error (``what``, a chain pass, has met an op
    kind it has no rule for: never treat it as a ReLU)."""
    if not isinstance(op, Relu):
        raise NotImplementedError(
            f"{what} handles affine layers and ReLUs only, not op kind {type(op).__name__} "
            f"({op.name})"
        )
    return op


def rule_for(table: Mapping[type, _R], op: object, domain: str) -> _R:
    """The rule of ``table`` (a domain's rule table, keyed by op kind) for ``op``.

    Raises:
        NotImplementedError: naming the op kind and the domain, when the table has no rule for
            it; an op is never handled by another kind's rule.
    """
    rule = table.get(type(op))
    if rule is None:
        name = getattr(op, "name", type(op).__name__)
        raise NotImplementedError(
            f"{domain} has no rule for op kind {type(op).__name__} ({name}); rules exist for "
            + ", ".join(sorted(kind.__name__ for kind in table))
        )
    return rule
AffineRule: TypeAlias = Callable[[nn.Module, Tensor], Affine]
_AFFINE_RULES: dict[type[nn.Module], AffineRule] = {}
_M = TypeVar("_M", bound=nn.Module)


def affine_rule(
    *types: type[_M],
) -> Callable[[Callable[[_M, Tensor], Affine]], Callable[[_M, Tensor], Affine]]:
    """Register the rule that lowers modules of ``types`` to an :class:`Affine`."""

    def register(rule: Callable[[_M, Tensor], Affine]) -> Callable[[_M, Tensor], Affine]:
        for module_type in types:
            _AFFINE_RULES[module_type] = rule  # type: ignore[assignment]
        return rule

    return register


def supported_layers() -> tuple[type[nn.Module], ...]:
    """Every layer type the bound rules accept (ReLU, MaxPool2d, the joins of
    :mod:`tightrope.bounds.modules` and the registered affine layers)."""
    return (nn.ReLU, nn.MaxPool2d, AddModule, ConcatModule, *_AFFINE_RULES)


@dataclass(frozen=True, slots=True)
class Network:
    """A model lowered for bound propagation: a feed-forward graph (DAG) of ops.

    Values are numbered: value 0 is the network's input, value ``i + 1`` the output of
    ``ops[i]``, and the last value the network's output; ``shapes[v]`` is value ``v``'s
    per-sample shape. ``ops[i]`` reads the values ``inputs[i]`` (all earlier: the ops are in
    topological order). ``inputs`` is ``None`` for a *chain*, where ``ops[i]`` reads value
    ``i`` (so ``shapes[i]`` is its input's shape): the form of every ``nn.Sequential``, which
    the chain-specialised passes take; :attr:`op_inputs` gives the inputs of either form.
    """

    ops: tuple[Op, ...]
    shapes: tuple[tuple[int, ...], ...]
    #: An empty tensor of the input's dtype and device.
    like: Tensor = field(repr=False, compare=False)
    inputs: tuple[tuple[int, ...], ...] | None = None
    _offsets: dict[int, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_chain(self) -> bool:
        """Whether every op reads the previous op's output (value ``i`` for op ``i``)."""
        return self.inputs is None

    @property
    def op_inputs(self) -> tuple[tuple[int, ...], ...]:
        """The values each op reads (for a chain, ``((0,), (1,), ...)``)."""
        if self.inputs is None:
            return tuple((i,) for i in range(len(self.ops)))
        return self.inputs

    def in_shape(self, index: int) -> tuple[int, ...]:
        """The per-sample shape of the (first) input of op ``index``."""
        return self.shapes[index if self.inputs is None else self.inputs[index][0]]

    @property
    def is_relu_chain(self) -> bool:
        """Whether this is a chain of affine maps and ReLUs only: the form the chain-specialised
        passes take (any other network goes through :mod:`tightrope.bounds.graph`)."""
        return self.inputs is None and all(isinstance(op, (Affine, Relu)) for op in self.ops)

    def require_chain(self, what: str) -> None:
        """Raise a clear error when this network is not a chain of affine maps and ReLUs:
        ``what`` (a bound method or pass) only handles that form so far."""
        if not self.is_relu_chain:
            odd = sorted({type(op).__name__ for op in self.ops
                          if not isinstance(op, (Affine, Relu))})
            found = f" (it has {', '.join(odd)})" if odd else " (it has branches)"
            raise NotImplementedError(
                f"{what} handles chains of affine layers and ReLUs only, and this network is "
                f"not one{found}; IBP, CROWN and CROWN-IBP handle any graph"
            )

    def offset(self, index: int) -> Tensor:
        """The constant term ``ops[index](0)`` of an affine op, shape ``(1, *shapes[index + 1])``.

        Computed on first use and remembered for the lifetime of this (per-call) network.
        """
        found = self._offsets.get(index)
        if found is None:
            op = self.ops[index]
            if not isinstance(op, Affine):
                raise TypeError(f"op {index} ({op.name}) is not affine")
            found = op.apply(self.like.new_zeros((1, *self.in_shape(index))))
            self._offsets[index] = found
        return found

    def prefix(self, value: int) -> Network:
        """The network whose output is value ``value`` of this one (ops ``0..value-1``; values
        no path to ``value`` uses stay, unread)."""
        if not 0 <= value <= len(self.ops):
            raise ValueError(f"value {value} is not one of this network's 0..{len(self.ops)}")
        inputs = None if self.inputs is None else self.inputs[:value]
        return Network(ops=self.ops[:value], shapes=self.shapes[: value + 1], like=self.like,
                       inputs=inputs)

    @property
    def relu_indices(self) -> tuple[int, ...]:
        """Indices ``i`` of the ReLU ops; ReLU ``i``'s pre-activation has shape
        ``in_shape(i)`` (``shapes[i]`` in a chain)."""
        return tuple(i for i, op in enumerate(self.ops) if isinstance(op, Relu))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.shapes[0]

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes[-1]


def _behaves_as(module: nn.Module, klass: type) -> bool:
    """Whether ``module`` is a ``klass`` that computes what ``klass`` computes: a subclass that
    overrides ``forward`` (a residual block, a scaled layer) is a different function."""
    return isinstance(module, klass) and type(module).forward is klass.forward  # type: ignore[attr-defined]


def _leaves(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    if _behaves_as(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix or type(module).__name__, module


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of ``model`` in order with their paths, nested ``nn.Sequential`` flattened."""
    return list(_leaves(model, ""))


def lower(model: nn.Module, reference: Tensor) -> Network:
    """Lower ``model`` to a :class:`Network`.

    An ``nn.Sequential`` tree of single-input layers becomes a chain (nested containers are
    flattened); any other model (residual blocks, joins) is traced with ``torch.fx``
    (:func:`tightrope.bounds.trace.lower_traced`).

    Args:
        model: the network.
        reference: ``(N, *S_in)`` inputs for a clean forward pass that fixes the shapes and, for
            BatchNorm in train mode, the batch statistics (pass the whole batch's box centre
            then; otherwise any batch, even an empty one, will do).

    Raises:
        TypeError: listing every unsupported layer (or traced function) of the model at once.
    """
    layers = leaves(model)
    if all(_chain_layer(m) for _, m in layers):
        return lower_leaves(layers, reference)
    from tightrope.bounds.trace import lower_traced

    return lower_traced(model, reference)


def _chain_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer of a chain, or an unsupported PyTorch layer a chain
    reports; a join of several values, or a module with its own ``forward`` (a container, or
    functional code), calls for tracing."""
    if _behaves_as(module, AddModule) or _behaves_as(module, ConcatModule):
        return False
    if _supports(module):
        return True
    return not list(module.children()) and type(module).__module__.startswith("torch.")


def lower_leaves(layers: list[tuple[str, nn.Module]], reference: Tensor) -> Network:
    """:func:`lower` on the model's :func:`leaves`."""
    unsupported = [
        f"{path} ({type(m).__name__}{_why_unsupported(m)})"
        for path, m in layers
        if not _supports(m)
    ]
    if unsupported:
        names = ", ".join(t.__name__ for t in supported_layers())
        raise TypeError(
            "tightrope.bounds cannot propagate bounds through these layers: "
            + "; ".join(unsupported)
            + f". Supported: {names}, nested in nn.Sequential. Register a rule with "
            "tightrope.bounds.affine_rule for another affine layer."
        )
    ops: list[Op] = []
    shapes = [tuple(reference.shape[1:])]
    x = reference
    # Without data, only the shapes travel: a map that declares its output shape needs no
    # forward pass on the empty batch.
    empty = reference.shape[0] == 0

    def forward(affine: Affine, x: Tensor) -> Tensor:
        if empty and affine.out_shape is not None:
            return x.new_empty((0, *affine.out_shape))
        return affine.apply(x)

    for path, module in layers:
        if _behaves_as(module, nn.ReLU):
            ops.append(Relu(name=path))
            x = x if empty else torch.relu(x)
            shapes.append(shapes[-1])
            continue
        if _behaves_as(module, nn.MaxPool2d):
            pool = max_pool_op(module, path)  # type: ignore[arg-type]
            x = pool.apply(x)
            ops.append(pool)
            shapes.append(tuple(x.shape[1:]))
            continue
        affine = _rule_for(module)(module, x)
        previous = ops[-1] if ops else None
        if (
            isinstance(previous, Affine)
            and previous.absorb is not None
            and affine.channel_affine is not None
        ):
            # Fold a per-channel scale and shift (BatchNorm) into the preceding weights: one
            # op fewer in every pass, and IBP's |L| r is unchanged by folding.
            scale, shift = affine.channel_affine
            folded = previous.absorb(scale, shift)
            ops[-1] = replace(folded, name=f"{previous.name} + {path} ({affine.name})")
            x = forward(affine, x)
            shapes[-1] = tuple(x.shape[1:])
        else:
            ops.append(replace(affine, name=f"{path} ({affine.name})"))
            x = forward(affine, x)
            shapes.append(tuple(x.shape[1:]))
    return Network(ops=tuple(ops), shapes=tuple(shapes), like=reference.new_empty(0))


def _find_rule(module: nn.Module) -> AffineRule | None:
    for klass in type(module).__mro__:
        if klass in _AFFINE_RULES:
            return _AFFINE_RULES[klass] if _behaves_as(module, klass) else None
    return None


def _rule_for(module: nn.Module) -> AffineRule:
    rule = _find_rule(module)
    if rule is None:
        raise TypeError(f"no affine rule for {type(module).__name__}")
    return rule


def max_pool_op(module: nn.MaxPool2d, path: str) -> MaxPool:
    """The :class:`MaxPool` op of ``module``; TypeError for the options it does not cover."""
    if not _pool_supported(module):
        raise TypeError(f"{path}: MaxPool2d needs dilation 1, ceil_mode=False and "
                        "return_indices=False")
    pair = nn.modules.utils._pair
    return MaxPool(kernel=pair(module.kernel_size), stride=pair(module.stride),
                   padding=pair(module.padding), name=f"{path} (MaxPool2d)")


def _pool_supported(module: nn.MaxPool2d) -> bool:
    dilation = nn.modules.utils._pair(module.dilation)
    return tuple(dilation) == (1, 1) and not module.ceil_mode and not module.return_indices


def _supports(module: nn.Module) -> bool:
    if _behaves_as(module, nn.ReLU):
        return True
    if _behaves_as(module, nn.MaxPool2d):
        return _pool_supported(module)  # type: ignore[arg-type]
    if _behaves_as(module, AddModule) or _behaves_as(module, ConcatModule):
        return True
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return False
    return _find_rule(module) is not None


def _why_unsupported(module: nn.Module) -> str:
    if isinstance(module, nn.MaxPool2d) and not _pool_supported(module):
        return ", needs dilation 1, ceil_mode=False and return_indices=False"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f", padding_mode={module.padding_mode!r}; only 'zeros' is supported"
    for klass in type(module).__mro__[1:]:
        if klass in _AFFINE_RULES or klass in (nn.ReLU, nn.Sequential):
            return f", overrides the forward of {klass.__name__}; register a rule for it"
    if list(module.children()):
        return ", a container whose forward order is unknown; use nn.Sequential"
    return ""


def transpose_rows(op: Affine, A: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """``L^T`` of ``op`` on rows ``A: (N, *S_out)`` -> ``(N, *S_in)`` (fast path if any)."""
    if op.fast_transpose is not None:
        return op.fast_transpose(A)
    return transpose(op.apply, A, in_shape)


def transpose(affine: TensorMap, A: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """``L^T`` applied to every row of ``A``, where ``affine(z) = L z + b``.

    Computed as the vector-Jacobian product of ``affine`` at one point, batched over the rows
    with ``vmap``, so no affine layer needs a hand-written transpose.

    Args:
        A: ``(N, *S_out)`` rows (N = batch x specification rows).
        in_shape: the per-sample input shape ``S_in``.

    Returns:
        ``(N, *S_in)``.
    """
    primal = A.new_zeros((1, *in_shape))
    vjp_fn = torch.func.vjp(affine, primal)[1]
    rows: Tensor = torch.func.vmap(vjp_fn)(A.unsqueeze(1))[0]
    return rows.squeeze(1)


# --- The layer table -------------------------------------------------------------------------


def _identity(r: Tensor) -> Tensor:
    return r


@affine_rule(nn.Identity, nn.Dropout)
def _identity_rule(module: nn.Module, reference: Tensor) -> Affine:
    # Dropout is the identity at inference; bounds describe the inference-time network.
    name = type(module).__name__
    return Affine(
        _identity, _identity, name, mixing=False, fast_transpose=_identity, channelwise=True,
        out_shape=tuple(reference.shape[1:]),
    )


@affine_rule(nn.Flatten)
def _flatten_rule(module: nn.Flatten, reference: Tensor) -> Affine:
    if module.start_dim == 0 or (module.start_dim < 0 and module.start_dim <= -reference.dim()):
        raise TypeError("nn.Flatten must keep the batch dimension (start_dim >= 1)")

    def flatten(z: Tensor) -> Tensor:
        return z.flatten(module.start_dim, module.end_dim)

    in_shape = tuple(reference.shape[1:])

    def unflatten(rows: Tensor) -> Tensor:
        return rows.reshape(rows.shape[0], *in_shape)

    out_shape = tuple(flatten(reference[:0]).shape[1:])
    return Affine(flatten, flatten, "Flatten", mixing=False, fast_transpose=unflatten,
                  out_shape=out_shape)


#: Elements of ``|W|`` formed at once by a Linear layer's ``apply_abs`` on CPU (4 MB in
#: float32).
_ABS_BLOCK_ELEMENTS = 1 << 20


@affine_rule(nn.Linear)
def _linear_rule(module: nn.Linear, reference: Tensor) -> Affine:
    return _linear(module.weight, module.bias, tuple(reference.shape[1:]))


def _linear(weight: Tensor, bias: Tensor | None, in_shape: tuple[int, ...]) -> Affine:
    def apply(z: Tensor) -> Tensor:
        return F.linear(z, weight, bias)

    def apply_abs(r: Tensor) -> Tensor:
        # Without gradients, |W| a block of output rows at a time: each block is still in
        # cache when the product reads it, and no temporary as large as W (67 MB in CNN7) is
        # allocated per call. With gradients the blocks would cost a full-size input gradient
        # each in the backward pass (on CNN7's 32768 x 512 layer, 16 of them made its backward
        # a third slower), so |W| is formed whole.
        step = max(1, _ABS_BLOCK_ELEMENTS // max(1, weight.shape[1]))
        grad = torch.is_grad_enabled() and (r.requires_grad or weight.requires_grad)
        if step >= weight.shape[0] or r.device.type != "cpu" or grad:
            return F.linear(r, weight.abs())
        # split, not slices: its backward joins the blocks' gradients with one concatenation.
        return torch.cat([F.linear(r, block.abs()) for block in torch.split(weight, step)], dim=-1)

    def fast_transpose(rows: Tensor) -> Tensor:
        return rows @ weight

    # No BatchNorm folding here: a Linear layer's weights (e.g. 32768 x 512 in CNN7) outnumber
    # its outputs, so scaling the outputs is cheaper than scaling the weights on every call.
    return Affine(apply, apply_abs, "Linear", fast_transpose=fast_transpose,
                  out_shape=(*in_shape[:-1], weight.shape[0]))


@affine_rule(nn.Conv2d)
def _conv2d_rule(module: nn.Conv2d, reference: Tensor) -> Affine:
    return _conv2d(module.weight, module.bias, module, tuple(reference.shape[1:]))


def _conv2d(
    weight: Tensor, bias: Tensor | None, module: nn.Conv2d, in_shape: tuple[int, ...]
) -> Affine:
    stride, padding, dilation, groups = (
        module.stride, module.padding, module.dilation, module.groups
    )
    if isinstance(padding, str):
        raise TypeError(f"Conv2d with padding={padding!r} is not supported; give the padding "
                        "as integers")
    reach = [dilation[d] * (weight.shape[2 + d] - 1) + 1 for d in range(2)]
    out_hw = [(in_shape[1 + d] + 2 * padding[d] - reach[d]) // stride[d] + 1 for d in range(2)]
    # The transposed convolution may drop rows/columns the strided forward never reads.
    output_padding = tuple(
        in_shape[1 + d] - ((out_hw[d] - 1) * stride[d] - 2 * padding[d] + reach[d])
        for d in range(2)
    )

    def apply(z: Tensor) -> Tensor:
        return F.conv2d(z, weight, bias, stride, padding, dilation, groups)

    def apply_abs(r: Tensor) -> Tensor:
        return F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)

    phased = _phase_plan(weight, in_shape, stride, padding, dilation, groups)

    def fast_transpose(rows: Tensor) -> Tensor:
        # oneDNN's transposed convolution is about twice as fast in channels-last layout; the
        # result stays channels-last for the next layers of the backward pass.
        rows = rows.contiguous(memory_format=torch.channels_last)
        if phased is not None and rows.device.type == "cpu":
            return _phase_transpose(rows, _phase_kernel(weight, stride[0]), *phased)
        return F.conv_transpose2d(
            rows, weight, None, stride, padding, output_padding, groups, dilation
        )

    def concretize(rows: Tensor, center: Tensor, radius: Tensor) -> Tensor:
        # The rows' transpose in phase layout, bounded against the box in the same layout: the
        # interleaving and cropping of _phase_transpose (a third of the transpose's time on
        # MNIST's first layer) move the small box instead of the B x K rows.
        batch, count = rows.shape[0], rows.shape[1]
        flat = rows.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        if phased is None or flat.device.type != "cpu":
            A = fast_transpose(flat).view(batch, count, *in_shape)
            return features_dot(A, center) - features_dot(A.abs(), radius)
        step, pad, kernel_pad, _ = phased
        phases = F.conv2d(flat, _phase_kernel(weight, step), padding=kernel_pad)
        height, width = phases.shape[2], phases.shape[3]
        phases = phases.view(batch, count, *phases.shape[1:])
        # Input pixel (step q + a - pad, step p + b - pad) is phase (a, b) at (q, p); pixels
        # outside the image, and phase positions past it, are zero in the box's layout.
        def layout(t: Tensor) -> Tensor:
            right = step * width - pad - t.shape[3]
            bottom = step * height - pad - t.shape[2]
            return F.pixel_unshuffle(F.pad(t, (pad, right, pad, bottom)), step)

        return features_dot(phases, layout(center)) - features_dot(phases.abs(), layout(radius))

    def window_transpose(rows: Tensor, corner: Corner, size: Corner) -> tuple[Tensor, Corner]:
        # The full transposed convolution of the window (no padding, no cropping) covers input
        # pixels from corner * stride - padding on; zero padding is no variable, so the parts
        # outside the image are dropped.
        rows = rows.contiguous(memory_format=torch.channels_last)
        full = F.conv_transpose2d(rows, weight, None, stride, 0, 0, groups, dilation)
        starts = [corner[d] * stride[d] - padding[d] for d in range(2)]
        lows = [max(0, start) for start in starts]
        highs = [min(size[d], starts[d] + full.shape[2 + d]) for d in range(2)]
        rows_kept = slice(lows[0] - starts[0], highs[0] - starts[0])
        columns_kept = slice(lows[1] - starts[1], highs[1] - starts[1])
        return full[:, :, rows_kept, columns_kept], (lows[0], lows[1])

    def full_transpose(rows: Tensor) -> Tensor:
        return F.conv_transpose2d(rows, weight, None, stride, 0, 0, groups, dilation)

    def absorb(scale: Tensor, shift: Tensor) -> Affine:
        folded_bias = shift if bias is None else bias * scale + shift
        return _conv2d(weight * scale.view(-1, 1, 1, 1), folded_bias, module, in_shape)

    return Affine(
        apply, apply_abs, "Conv2d", fast_transpose=fast_transpose, absorb=absorb,
        window_transpose=window_transpose, concretize=concretize if phased else None,
        patch_transpose=(full_transpose, (stride[0], stride[1]), (padding[0], padding[1])),
        out_shape=(weight.shape[0], out_hw[0], out_hw[1]),
    )



#: Strided convolutions with at most this many input channels (image inputs: grey or RGB)
#: transpose on CPU as stride x stride ordinary convolutions (see ``_phase_transpose``):
#: oneDNN's transposed convolution is slow with so few output channels (about 2x on MNIST's
#: first layer). With 8 channels (resnet_2b's first block) the plain transposed convolution
#: was as fast or faster (2026-12-07), so hidden layers keep it.
_PHASE_MAX_CHANNELS = 3


def _phase_plan(
    weight: Tensor,
    in_shape: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
) -> tuple[int, int, tuple[int, int], tuple[int, int]] | None:
    """``(stride, padding, kernel padding, input size)`` when ``_phase_transpose`` applies."""
    if isinstance(padding, str) or groups != 1 or dilation != (1, 1):
        return None
    if stride[0] != stride[1] or stride[0] == 1 or padding[0] != padding[1]:
        return None
    if weight.shape[1] > _PHASE_MAX_CHANNELS:
        return None
    step, pad = stride[0], padding[0]
    reach = [-(-weight.shape[2 + d] // step) for d in range(2)]
    return step, pad, (reach[0] - 1, reach[1] - 1), (in_shape[1], in_shape[2])


def _phase_kernel(weight: Tensor, step: int) -> Tensor:
    """The kernels of ``_phase_transpose``, ``(C_in step^2, C_out, ceil(kh/step), ceil(kw/step))``.

    Input pixel ``y = step * q + a - padding`` of the transpose receives the output rows
    ``q - m`` through kernel row ``a + step * m``; so phase ``a`` is an ordinary correlation
    with the kernel rows ``a, a + step, ...`` in reverse order (zero past the kernel's end).
    """
    c_out, c_in, kh, kw = weight.shape
    mh, mw = -(-kh // step), -(-kw // step)
    padded = F.pad(weight, (0, mw * step - kw, 0, mh * step - kh))
    phases = padded.view(c_out, c_in, mh, step, mw, step).flip(2, 4)
    return phases.permute(1, 3, 5, 0, 2, 4).reshape(c_in * step * step, c_out, mh, mw)


def _phase_transpose(
    rows: Tensor,
    kernel: Tensor,
    step: int,
    pad: int,
    kernel_pad: tuple[int, int],
    size: tuple[int, int],
) -> Tensor:
    """The transposed strided convolution as one ordinary convolution with ``step^2`` output
    channels per input channel, interleaved by ``pixel_shuffle`` and cropped to the image."""
    needed = [-(-(size[d] + pad) // step) for d in range(2)]
    phases = F.conv2d(rows, kernel, padding=kernel_pad)[..., : needed[0], : needed[1]]
    short = [needed[d] - phases.shape[2 + d] for d in range(2)]
    if short[0] > 0 or short[1] > 0:
        # Input pixels past the last one the forward convolution reads: their rows are zero.
        phases = F.pad(phases, (0, max(0, short[1]), 0, max(0, short[0])))
    return F.pixel_shuffle(phases, step)[..., pad : pad + size[0], pad : pad + size[1]]


@affine_rule(nn.AvgPool2d)
def _avg_pool_rule(module: nn.AvgPool2d, reference: Tensor) -> Affine:
    # Averaging has non-negative weights, so |L| r = L r.
    return Affine(apply=module, apply_abs=module, name="AvgPool2d")


@affine_rule(Normalize)
def _normalize_rule(module: Normalize, reference: Tensor) -> Affine:
    def apply_abs(r: Tensor) -> Tensor:
        return r / module.std.view(1, -1, *([1] * (r.dim() - 2))).to(r.dtype)

    return Affine(
        module, apply_abs, "Normalize", mixing=False, fast_transpose=apply_abs, channelwise=True,
        out_shape=tuple(reference.shape[1:]),
    )


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer that normalises with the batch's statistics."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


@affine_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, reference: Tensor) -> Affine:
    """Eval mode: the affine map of the running statistics. Train mode (or no running
    statistics): the statistics of ``reference``, the batch of the clean forward pass, as a
    training forward pass would use them (biased variance); running statistics stay untouched."""
    reduce_dims = [0, *range(2, reference.dim())]
    if uses_batch_statistics(module):
        if reference.numel() // reference.shape[1] < 2:
            raise ValueError("BatchNorm in train mode needs more than one value per channel "
                             "for its batch statistics; bound a batch, or put the model in "
                             "eval mode")
        mean = reference.mean(dim=reduce_dims)
        var = reference.var(dim=reduce_dims, unbiased=False)
    else:
        assert module.running_mean is not None
        assert module.running_var is not None
        mean, var = module.running_mean, module.running_var
    scale = torch.rsqrt(var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -mean * scale
    if module.bias is not None:
        shift = shift + module.bias

    def view(t: Tensor, z: Tensor) -> Tensor:
        return t.view(1, -1, *([1] * (z.dim() - 2)))

    def apply(z: Tensor) -> Tensor:
        return z * view(scale, z) + view(shift, z)

    def apply_abs(r: Tensor) -> Tensor:
        return r * view(scale.abs(), r)

    def fast_transpose(rows: Tensor) -> Tensor:
        return rows * view(scale, rows)

    return Affine(
        apply,
        apply_abs,
        type(module).__name__,
        mixing=False,
        fast_transpose=fast_transpose,
        channelwise=reference.dim() == 4,
        channel_affine=(scale, shift) if reference.dim() in (2, 4) else None,
        out_shape=tuple(reference.shape[1:]),
    )


@affine_rule(Reshape)
def _reshape_rule(module: Reshape, reference: Tensor) -> Affine:
    in_shape = tuple(reference.shape[1:])
    if math.prod(in_shape) != math.prod(module.shape):
        raise TypeError(f"Reshape to {module.shape} cannot take samples of shape {in_shape}")

    def unreshape(rows: Tensor) -> Tensor:
        return rows.reshape(rows.shape[0], *in_shape)

    return Affine(module, module, "Reshape", mixing=False, fast_transpose=unreshape,
                  out_shape=module.shape)


@affine_rule(Permute)
def _permute_rule(module: Permute, reference: Tensor) -> Affine:
    in_shape = tuple(reference.shape[1:])
    if len(module.dims) != len(in_shape):
        raise TypeError(f"Permute{module.dims} cannot take samples of shape {in_shape}")
    inverse = [0] * len(module.dims)
    for position, dim in enumerate(module.dims):
        inverse[dim] = position

    def unpermute(rows: Tensor) -> Tensor:
        return rows.permute(0, *(d + 1 for d in inverse))

    return Affine(module, module, "Permute", mixing=False, fast_transpose=unpermute,
                  out_shape=tuple(in_shape[d] for d in module.dims))


@affine_rule(Pad)
def _pad_rule(module: Pad, reference: Tensor) -> Affine:
    in_shape = tuple(reference.shape[1:])
    if len(module.pads) // 2 > len(in_shape):
        raise TypeError(f"Pad{module.pads} pads more dimensions than samples of shape "
                        f"{in_shape} have")
    crop = [slice(None)] * (len(in_shape) + 1)
    out_shape = list(in_shape)
    for k in range(len(module.pads) // 2):
        dim = len(in_shape) - 1 - k
        before, after = module.pads[2 * k], module.pads[2 * k + 1]
        crop[dim + 1] = slice(before, before + in_shape[dim])
        out_shape[dim] += before + after

    def zero_pad(r: Tensor) -> Tensor:
        return F.pad(r, module.pads)

    def unpad(rows: Tensor) -> Tensor:
        return rows[tuple(crop)]

    # The padded constant is the offset (the map at zero); the radius pads with zeros.
    return Affine(module, zero_pad, "Pad", mixing=False, fast_transpose=unpad,
                  out_shape=tuple(out_shape))


@affine_rule(Elementwise)
def _elementwise_rule(module: Elementwise, reference: Tensor) -> Affine:
    in_shape = tuple(reference.shape[1:])
    scale = module.scale.to(reference.dtype)
    out_shape = tuple(torch.broadcast_shapes(  # type: ignore[no-untyped-call]
        in_shape, scale.shape, module.shift.shape))
    if out_shape != in_shape:
        raise TypeError(f"Elementwise with scale {tuple(scale.shape)} and shift "
                        f"{tuple(module.shift.shape)} would change samples of shape {in_shape}")

    def apply_abs(r: Tensor) -> Tensor:
        return r * scale.abs()

    def fast_transpose(rows: Tensor) -> Tensor:
        return rows * scale

    return Affine(module, apply_abs, "Elementwise", mixing=False,
                  fast_transpose=fast_transpose, out_shape=in_shape)
