"""VNNLIB properties (the VNN-COMP format) as :class:`~tightrope.verify.spec.Specification`.

A VNNLIB file is a list of SMT-LIB s-expressions: ``(declare-const X_i Real)`` for each input,
``(declare-const Y_j Real)`` for each output, and ``(assert E)`` where ``E`` nests ``and``/``or``
over comparisons ``(<= a b)``, ``(>= a b)``, ``(< a b)``, ``(> a b)`` of linear terms (numbers,
variables, ``(+ ...)``, ``(- ...)``, ``(* c t)``). The asserts describe a *counterexample*: the
property holds (``unsat``) when no input satisfies them. See Brix et al., "First three years of
the international verification of neural networks competition (VNN-COMP)", STTT 2023, and
https://www.vnnlib.org.

The conjunction of all asserts is expanded into a disjunction of conjunctions. Each conjunction
must bound every input from both sides by constants (an input box) and may add linear
constraints on outputs (an unsafe set ``A y <= b``); conjunctions with the same box share one
:class:`Region`. Strict and non-strict comparisons are treated alike (the sets differ only on
their boundary). ``X_i`` is element ``i`` of the row-major flattened network input; the box is
reshaped to ``(1, *input_shape)``.
"""

from __future__ import annotations

import gzip
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tightrope.bounds import Box
from tightrope.verify.spec import Region, Specification, UnsafeSet

__all__ = ["VnnlibError", "load_vnnlib", "parse_vnnlib"]

#: Most disjuncts an expansion may produce before the file is rejected.
MAX_DISJUNCTS = 100_000

_TOKEN = re.compile(r"(;[^\n]*)|(\()|(\))|([^\s();]+)|(\n)")
_VARIABLE = re.compile(r"^([XY])_(\d+)$")


class VnnlibError(ValueError):
    """A VNNLIB file is malformed or uses what the parser does not support."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class _Atom:
    text: str
    line: int


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[_Atom | _List, ...]
    line: int


_Expr = _Atom | _List


def _parse_sexprs(text: str, source: str) -> list[_List]:
    """Split ``text`` into top-level s-expressions, each with the line it starts on."""
    stack: list[tuple[list[_Expr], int]] = []
    top: list[_List] = []
    line = 1
    for match in _TOKEN.finditer(text):
        comment, opening, closing, atom, newline = match.groups()
        if newline is not None:
            line += 1
            continue
        if comment is not None:
            continue
        if opening is not None:
            stack.append(([], line))
        elif closing is not None:
            if not stack:
                raise VnnlibError(source, line, "')' without a matching '('")
            items, start = stack.pop()
            node = _List(tuple(items), start)
            if stack:
                stack[-1][0].append(node)
            else:
                top.append(node)
        elif atom is not None:
            if not stack:
                raise VnnlibError(source, line, f"{atom!r} outside parentheses")
            stack[-1][0].append(_Atom(atom, line))
    if stack:
        raise VnnlibError(source, stack[-1][1], "'(' is never closed")
    return top


@dataclass(slots=True)
class _Linear:
    """``sum coefficient * variable + constant``; variables are ``("X"|"Y", index)``."""

    terms: dict[tuple[str, int], float] = field(default_factory=dict)
    constant: float = 0.0

    def scaled(self, factor: float) -> _Linear:
        return _Linear({k: v * factor for k, v in self.terms.items()}, self.constant * factor)

    def plus(self, other: _Linear) -> _Linear:
        terms = dict(self.terms)
        for key, value in other.terms.items():
            terms[key] = terms.get(key, 0.0) + value
        return _Linear(terms, self.constant + other.constant)


@dataclass(slots=True)
class _Conjunction:
    """Input bounds per index and output rows ``a . y <= b``."""

    lower: dict[int, float] = field(default_factory=dict)
    upper: dict[int, float] = field(default_factory=dict)
    rows: list[tuple[dict[int, float], float]] = field(default_factory=list)

    def absorb(self, other: _Conjunction) -> None:
        """Intersect with ``other`` in place."""
        for index, value in other.lower.items():
            self.lower[index] = max(value, self.lower.get(index, -math.inf))
        for index, value in other.upper.items():
            self.upper[index] = min(value, self.upper.get(index, math.inf))
        self.rows.extend(other.rows)

    def merged(self, other: _Conjunction) -> _Conjunction:
        lower = dict(self.lower)
        for index, value in other.lower.items():
            lower[index] = max(value, lower.get(index, -math.inf))
        upper = dict(self.upper)
        for index, value in other.upper.items():
            upper[index] = min(value, upper.get(index, math.inf))
        return _Conjunction(lower, upper, self.rows + other.rows)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.inputs: set[int] = set()
        self.outputs: set[int] = set()

    def error(self, line: int | None, message: str) -> VnnlibError:
        return VnnlibError(self.source, line, message)

    def declare(self, command: _List) -> None:
        items = command.items
        if len(items) != 3 or not all(isinstance(i, _Atom) for i in items[1:]):
            raise self.error(command.line, "expected (declare-const NAME Real)")
        name, sort = items[1], items[2]
        if not isinstance(name, _Atom) or not isinstance(sort, _Atom):
            raise self.error(command.line, "expected (declare-const NAME Real)")
        if sort.text != "Real":
            raise self.error(command.line, f"variable {name.text} has sort {sort.text}; only "
                                           "Real is supported")
        match = _VARIABLE.match(name.text)
        if match is None:
            raise self.error(command.line, f"variable {name.text!r} must be named X_i (input) "
                                           "or Y_i (output)")
        declared = self.inputs if match.group(1) == "X" else self.outputs
        index = int(match.group(2))
        if index in declared:
            raise self.error(command.line, f"{name.text} is declared twice")
        declared.add(index)

    def term(self, expr: _Expr) -> _Linear:
        if isinstance(expr, _Atom):
            match = _VARIABLE.match(expr.text)
            if match is not None:
                kind, index = match.group(1), int(match.group(2))
                if index not in (self.inputs if kind == "X" else self.outputs):
                    raise self.error(expr.line, f"{expr.text} is used before it is declared")
                return _Linear({(kind, index): 1.0})
            try:
                value = float(expr.text)
            except ValueError:
                raise self.error(expr.line, f"expected a number or a variable, got "
                                            f"{expr.text!r}") from None
            if not math.isfinite(value):
                raise self.error(expr.line, f"constant {expr.text} is not finite")
            return _Linear({}, value)
        if not expr.items or not isinstance(expr.items[0], _Atom):
            raise self.error(expr.line, "expected an arithmetic term")
        op = expr.items[0].text
        args = [self.term(item) for item in expr.items[1:]]
        if not args:
            raise self.error(expr.line, f"({op}) needs arguments")
        if op == "+":
            total = args[0]
            for arg in args[1:]:
                total = total.plus(arg)
            return total
        if op == "-":
            if len(args) == 1:
                return args[0].scaled(-1.0)
            total = args[0]
            for arg in args[1:]:
                total = total.plus(arg.scaled(-1.0))
            return total
        if op == "*":
            product = args[0]
            for arg in args[1:]:
                if arg.terms and product.terms:
                    raise self.error(expr.line, "(* ...) of two variables is not linear")
                product = arg.scaled(product.constant) if arg.terms else product.scaled(
                    arg.constant)
            return product
        raise self.error(expr.line, f"unsupported arithmetic operator {op!r}")

    def comparison(self, op: str, expr: _List) -> list[_Conjunction]:
        if len(expr.items) != 3:
            raise self.error(expr.line, f"({op} a b) needs exactly two arguments")
        left, right = self.term(expr.items[1]), self.term(expr.items[2])
        # Normalise to  lhs <= 0.
        lhs = left.plus(right.scaled(-1.0)) if op in ("<=", "<") else right.plus(left.scaled(-1.0))
        terms = {k: v for k, v in lhs.terms.items() if v != 0.0}
        kinds = {kind for kind, _ in terms}
        conjunction = _Conjunction()
        if not terms:  # a constant comparison: true or false
            return [conjunction] if lhs.constant <= 0 else []
        if kinds == {"X", "Y"}:
            raise self.error(expr.line, "constraints mixing inputs and outputs are not supported")
        if kinds == {"Y"}:
            conjunction.rows.append(({i: v for (_, i), v in terms.items()}, -lhs.constant))
            return [conjunction]
        if len(terms) != 1:
            raise self.error(expr.line, "input constraints must bound one variable each "
                                        "(the input region must be a box)")
        ((_, index), coefficient), = terms.items()
        bound = -lhs.constant / coefficient
        if coefficient > 0:
            conjunction.upper[index] = bound
        else:
            conjunction.lower[index] = bound
        return [conjunction]

    def dnf(self, expr: _Expr) -> list[_Conjunction]:
        if not isinstance(expr, _List) or not expr.items or not isinstance(expr.items[0], _Atom):
            raise self.error(expr.line, "expected a constraint like (<= X_0 1) or (and ...)")
        op = expr.items[0].text
        if op in ("<=", ">=", "<", ">"):
            return self.comparison(op, expr)
        if op not in ("and", "or"):
            raise self.error(expr.line, f"unsupported operator {op!r} (use and, or, <=, >=)")
        children = [self.dnf(item) for item in expr.items[1:]]
        if op == "or":
            return [c for child in children for c in child]
        result = [_Conjunction()]
        for child in children:
            if len(result) * len(child) > MAX_DISJUNCTS:
                raise self.error(expr.line, f"expanding this (and ...) gives more than "
                                            f"{MAX_DISJUNCTS} disjuncts")
            result = [a.merged(b) for a, b in itertools.product(result, child)]
        return result


def parse_vnnlib(
    text: str, input_shape: tuple[int, ...], *, num_outputs: int | None = None,
    input_order: Sequence[int] | None = None, source: str = "<vnnlib>",
) -> Specification:
    """Parse VNNLIB ``text`` into a :class:`Specification` over inputs of shape ``input_shape``.

    Args:
        text: the file's contents.
        input_shape: the per-sample input shape ``S``; ``prod(S)`` inputs ``X_0 ...`` must be
            declared. Boxes have shape ``(1, *S)``, float64.
        num_outputs: if given, the number of ``Y_j`` that must be declared.
        input_order: if given, boxes are laid out so that flat position ``i`` holds
            ``X_{input_order[i]}`` (``OnnxModel.input_order`` of a network whose graph reorders
            its input first).
        source: the name used in error messages.

    Raises:
        VnnlibError: with the line number, for malformed or unsupported content.
    """
    parser = _Parser(source)
    conjunctions = [_Conjunction()]
    for command in _parse_sexprs(text, source):
        head = command.items[0] if command.items else None
        if not isinstance(head, _Atom):
            raise parser.error(command.line, "expected (declare-const ...) or (assert ...)")
        if head.text == "declare-const":
            parser.declare(command)
        elif head.text == "assert":
            if len(command.items) != 2:
                raise parser.error(command.line, "(assert E) takes exactly one expression")
            child = parser.dnf(command.items[1])
            if len(conjunctions) == 1 and len(child) == 1:  # the common case: one more bound
                conjunctions[0].absorb(child[0])
                continue
            if len(conjunctions) * len(child) > MAX_DISJUNCTS:
                raise parser.error(command.line, f"more than {MAX_DISJUNCTS} disjuncts")
            conjunctions = [a.merged(b) for a, b in itertools.product(conjunctions, child)]
        else:
            raise parser.error(command.line, f"unsupported command {head.text!r}")
    return _specification(parser, conjunctions, input_shape, num_outputs, input_order)


def _specification(
    parser: _Parser, conjunctions: list[_Conjunction], input_shape: tuple[int, ...],
    num_outputs: int | None, input_order: Sequence[int] | None,
) -> Specification:
    size = math.prod(input_shape)
    if parser.inputs != set(range(len(parser.inputs))) or len(parser.inputs) != size:
        raise parser.error(None, f"declares {len(parser.inputs)} inputs X_i; the network takes "
                                 f"{size} (input shape {input_shape}), numbered from X_0")
    n_out = len(parser.outputs)
    if parser.outputs != set(range(n_out)) or n_out == 0:
        raise parser.error(None, "outputs must be declared as Y_0 ... Y_(n-1)")
    if num_outputs is not None and n_out != num_outputs:
        raise parser.error(None, f"declares {n_out} outputs Y_j; the network has {num_outputs}")
    regions: dict[tuple[tuple[float, ...], tuple[float, ...]], list[UnsafeSet]] = {}
    for conjunction in conjunctions:
        missing = [i for i in range(size)
                   if i not in conjunction.lower or i not in conjunction.upper]
        if missing:
            names = ", ".join(f"X_{i}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise parser.error(None, f"inputs {names} lack a lower or an upper bound in some "
                                     "disjunct; every input needs both")
        lower = tuple(conjunction.lower[i] for i in range(size))
        upper = tuple(conjunction.upper[i] for i in range(size))
        if any(lo > hi for lo, hi in zip(lower, upper, strict=True)):
            continue  # an empty box admits no counterexample
        A = torch.zeros(len(conjunction.rows), n_out, dtype=torch.float64)
        b = torch.zeros(len(conjunction.rows), dtype=torch.float64)
        for r, (coefficients, bound) in enumerate(conjunction.rows):
            for j, value in coefficients.items():
                A[r, j] = value
            b[r] = bound
        regions.setdefault((lower, upper), []).append(UnsafeSet(A, b))
    if not regions:
        raise parser.error(None, "every disjunct has an empty input box or a false constant "
                                 "comparison: the property holds trivially")
    if input_order is not None and sorted(input_order) != list(range(size)):
        raise ValueError(f"input_order must be a permutation of range({size})")
    index = None if input_order is None else torch.tensor(list(input_order))

    def box_tensor(values: tuple[float, ...]) -> torch.Tensor:
        flat = torch.tensor(values, dtype=torch.float64)
        return (flat if index is None else flat[index]).reshape(1, *input_shape)

    return Specification(tuple(
        Region(Box(box_tensor(lower), box_tensor(upper)), tuple(unsafe))
        for (lower, upper), unsafe in regions.items()
    ))


def load_vnnlib(
    path: str | os.PathLike[str], input_shape: tuple[int, ...], *, num_outputs: int | None = None,
    input_order: Sequence[int] | None = None,
) -> Specification:
    """Read a ``.vnnlib`` (or gzip-compressed ``.vnnlib.gz``) file; see :func:`parse_vnnlib`.

    Raises:
        VnnlibError: naming the file (and the line) for unreadable, malformed or unsupported
            content.
    """
    source = os.fspath(path)
    try:
        if source.endswith(".gz"):
            with gzip.open(source, "rt", encoding="utf-8") as handle:
                text = handle.read()
        else:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise VnnlibError(source, None, f"cannot read the file: {error}") from error
    return parse_vnnlib(text, input_shape, num_outputs=num_outputs, input_order=input_order,
                        source=source)
