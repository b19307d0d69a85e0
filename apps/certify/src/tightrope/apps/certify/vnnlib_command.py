"""``tightrope-certify vnnlib``: one VNN-COMP instance (ONNX network + VNNLIB property).

The answer follows VNN-COMP: ``unsat`` (the property holds: the verifier proved it from sound
bounds), ``sat`` (a counterexample exists: one is written), ``timeout`` or ``unknown``. A
``sat`` from the verifier is re-checked here before it is reported: the counterexample must lie
in a region's input box and its forward pass must land in one of that region's unsafe sets,
both in float64 and in the network's own dtype (how VNN-COMP's checker runs the ONNX file).
If either check fails the answer is ``unknown``, never ``sat``.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from tightrope.apps.certify.answer_file import clear_answer, write_answer
from tightrope.verify import (
    OnnxImportError,
    OnnxModel,
    Specification,
    VerifyStatus,
    format_result,
    load_onnx,
    load_vnnlib,
    status_word,
)

__all__ = ["Outcome", "Verdictlike", "Verifier", "check_counterexample", "run_vnnlib"]


class Verdictlike(Protocol):
    """What a verifier returns (``tightrope.verify.Verdict`` has these fields)."""

    @property
    def status(self) -> VerifyStatus: ...

    @property
    def counterexample(self) -> Tensor | None: ...


class Verifier(Protocol):
    """``verify(model, spec, timeout=...)`` as ``tightrope.verify.verify`` provides it."""

    def __call__(self, model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
        ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the command answered, with the time it took.

    Attributes:
        status: the reported answer (a verifier's ``FALSIFIED`` that failed the re-check is
            reported as ``UNKNOWN``).
        text: the result file's content (status word, and the counterexample for ``sat``).
        verifier_status: what the verifier itself said.
        stage: the verifier's deciding stage, when it reports one (``""`` otherwise).
        load_seconds: reading and converting the ONNX and VNNLIB files.
        verify_seconds: the verifier call.
        note: why a counterexample was rejected (``""`` otherwise).
    """

    status: VerifyStatus
    text: str
    verifier_status: VerifyStatus
    stage: str
    load_seconds: float
    verify_seconds: float
    note: str = ""

    @property
    def word(self) -> str:
        return status_word(self.status)


@dataclass(frozen=True, slots=True)
class _Timeout:
    status: VerifyStatus = VerifyStatus.TIMEOUT
    counterexample: Tensor | None = None
    stage: str = "loading"


def default_verifier() -> Verifier:
    """``tightrope.verify.verify`` (the cascade and branch-and-bound), imported on first use."""
    from tightrope.verify import verify

    return verify


def check_counterexample(
    net: OnnxModel, spec: Specification, x: Tensor
) -> tuple[Tensor, Tensor] | str:
    """Re-check a counterexample ``x`` (the module's input, ``net.input_size`` values).

    Returns:
        ``(x64, y64)``: the input ``(1, *net.input_shape)`` and output ``(1, n_out)`` in float64,
        when ``x`` violates ``spec`` in float64 and in the network's dtype; otherwise a
        sentence saying which check failed.
    """
    if x.numel() != net.input_size:
        return f"the counterexample has {x.numel()} values, the network takes {net.input_size}"
    x64 = x.detach().to("cpu", torch.float64).reshape(1, *net.input_shape)
    if not bool(torch.isfinite(x64).all()):
        return "the counterexample is not finite"
    with torch.no_grad():
        y64 = _copy_in(net.module, torch.float64)(x64)
        if not spec.violated_by(x64, y64):
            return "its float64 forward pass does not violate the property"
        # VNN-COMP's checker runs the network in its own dtype on the written input values.
        y_native = _copy_in(net.module, net.dtype)(x64.to(net.dtype))
        if not spec.violated_by(x64, y_native.to(torch.float64)):
            return f"its forward pass in {net.dtype} does not violate the property"
    return x64, y64


def _copy_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(module).to(dtype).eval()


def run_vnnlib(
    onnx_path: str | os.PathLike[str],
    vnnlib_path: str | os.PathLike[str],
    timeout: float,
    *,
    out: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    verifier: Verifier | None = None,
    started: float | None = None,
) -> Outcome:
    """Answer one instance and write the result file to ``out`` (when given).

    Args:
        onnx_path, vnnlib_path: the instance.
        timeout: seconds for the whole instance, loading included (the verifier gets what is
            left after loading).
        out: where to write the result (VNN-COMP format); removed first, so a call that
            raises leaves no answer there.
        dtype: the dtype to verify in; the network's own by default.
        verifier: the engine (``tightrope.verify.verify`` by default).
        started: ``time.perf_counter()`` at process start, to charge start-up to the budget.

    Raises:
        tightrope.verify.onnx.OnnxImportError, tightrope.verify.vnnlib.VnnlibError: bad input
            (including a network with NaN or inf weights, in its own dtype or in ``dtype``).
        OSError: ``out`` cannot be removed or written.
    """
    begin = time.perf_counter() if started is None else started
    if out is not None:
        clear_answer(os.fspath(out))
    net = load_onnx(onnx_path)
    spec = load_vnnlib(vnnlib_path, net.input_shape, num_outputs=net.num_outputs,
                       input_order=net.input_order)
    model = net.module if dtype is None else _copy_in(net.module, dtype)
    if model is not net.module and not all(bool(torch.isfinite(t).all())
                                           for t in model.parameters()):
        raise OnnxImportError(os.fspath(onnx_path), [
            f"its weights overflow to inf in {dtype}: verify in the network's own dtype "
            "(leave out --dtype)"])
    engine = default_verifier() if verifier is None else verifier
    loaded = time.perf_counter()
    remaining = timeout - (time.perf_counter() - begin)
    if remaining <= 0:  # start-up and loading used the whole budget
        verdict: Verdictlike = _Timeout()
    else:
        verdict = engine(model, spec, timeout=remaining)
    finished = time.perf_counter()
    status = verdict.status
    note = ""
    x64 = y64 = None
    if status is VerifyStatus.FALSIFIED:
        found = verdict.counterexample
        checked = "the verifier gave no counterexample" if found is None else (
            check_counterexample(net, spec, found))
        if isinstance(checked, str):
            status, note = VerifyStatus.UNKNOWN, f"counterexample rejected: {checked}"
        else:
            x64, y64 = checked
    text = format_result(status, None if x64 is None else net.to_onnx_order(x64), y64)
    if out is not None:
        write_answer(os.fspath(out), text)
    stage = getattr(verdict, "stage", "")
    stage_name = str(getattr(stage, "value", stage))
    return Outcome(status, text, verdict.status, stage_name, loaded - begin, finished - loaded,
                   note)
