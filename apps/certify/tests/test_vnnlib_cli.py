"""``tightrope-certify vnnlib``: answers, the counterexample re-check, output files, errors."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tightrope.apps.certify.cli import _Deadline, build_parser, main
from tightrope.apps.certify.vnnlib_command import Verdictlike, run_vnnlib
from tightrope.bounds import ibp
from tightrope.verify.onnx import OnnxImportError, export_onnx
from tightrope.verify.spec import Specification, VerifyStatus
from tightrope.verify.vnnlib_result import parse_result

SUITE = Path("/work/shared/benchmarks/vnncomp2021")


@dataclass(frozen=True)
class FakeVerdict:
    status: VerifyStatus
    counterexample: Tensor | None = None
    stage: str = "fake"


def interval_verifier(model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
    """A small sound verifier: IBP proves, random sampling falsifies, else UNKNOWN."""
    generator = torch.Generator().manual_seed(0)
    model = copy.deepcopy(model).double()
    open_sets = 0
    for region in spec.regions:
        box = region.box
        bounds = ibp(model, box)
        for unsafe in region.unsafe:
            # lower bound of each row of A y over the output box [l, u]
            A, low, high = unsafe.A, bounds.lower[0], bounds.upper[0]
            row_low = A.clamp(min=0) @ low + A.clamp(max=0) @ high
            if bool((row_low > unsafe.b).any()):
                continue  # some constraint can never hold: this unsafe set is empty
            open_sets += 1
        points = box.lower + (box.upper - box.lower) * torch.rand(
            (512, *box.lower.shape[1:]), generator=generator, dtype=torch.float64)
        with torch.no_grad():
            outputs = model(points)
        for i in range(points.shape[0]):
            if spec.violated_by(points[i : i + 1], outputs[i : i + 1]):
                return FakeVerdict(VerifyStatus.FALSIFIED, points[i : i + 1].float(), "sampling")
    return FakeVerdict(VerifyStatus.VERIFIED if open_sets == 0 else VerifyStatus.UNKNOWN,
                       None, "ibp")


def write_instance(tmp_path: Path, threshold: float) -> tuple[Path, Path]:
    """A tiny net on [0, 1]^3 and the property ``Y_0 >= threshold`` (the unsafe set)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    onnx_path = tmp_path / "net.onnx"
    export_onnx(model, (3,), onnx_path)
    lines = [f"(declare-const X_{i} Real)" for i in range(3)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(2)]
    lines += [f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))" for i in range(3)]
    lines.append(f"(assert (>= Y_0 {threshold}))")
    spec_path = tmp_path / f"prop_{threshold}.vnnlib"
    spec_path.write_text("\n".join(lines) + "\n")
    return onnx_path, spec_path


def test_unsat_and_sat_answers_with_a_rechecked_counterexample(tmp_path: Path) -> None:
    onnx_path, unsat_spec = write_instance(tmp_path, 1000.0)
    outcome = run_vnnlib(onnx_path, unsat_spec, 10, out=tmp_path / "r1.txt",
                         verifier=interval_verifier)
    assert outcome.status is VerifyStatus.VERIFIED
    assert (tmp_path / "r1.txt").read_text() == "unsat\n"
    _, sat_spec = write_instance(tmp_path, -1000.0)
    outcome = run_vnnlib(onnx_path, sat_spec, 10, out=tmp_path / "r2.txt",
                         verifier=interval_verifier)
    assert outcome.status is VerifyStatus.FALSIFIED
    result = parse_result((tmp_path / "r2.txt").read_text())
    assert result.status is VerifyStatus.FALSIFIED
    assert len(result.inputs) == 3
    assert len(result.outputs) == 2
    assert all(0 <= v <= 1 for v in result.inputs)


def test_a_bogus_counterexample_is_reported_unknown_never_sat(tmp_path: Path) -> None:
    onnx_path, spec_path = write_instance(tmp_path, 1000.0)

    def outside_box(model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
        return FakeVerdict(VerifyStatus.FALSIFIED, torch.full((1, 3), 5.0))

    def no_violation(model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
        return FakeVerdict(VerifyStatus.FALSIFIED, torch.full((1, 3), 0.5))

    def missing(model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
        return FakeVerdict(VerifyStatus.FALSIFIED, None)

    for liar in (outside_box, no_violation, missing):
        outcome = run_vnnlib(onnx_path, spec_path, 10, out=tmp_path / "r.txt", verifier=liar)
        assert outcome.status is VerifyStatus.UNKNOWN
        assert outcome.verifier_status is VerifyStatus.FALSIFIED
        assert "rejected" in outcome.note
        assert (tmp_path / "r.txt").read_text() == "unknown\n"


def test_timeout_and_unknown_pass_through_and_budget_shrinks(tmp_path: Path) -> None:
    onnx_path, spec_path = write_instance(tmp_path, 0.0)
    budgets: list[float] = []

    def slow(model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
        budgets.append(timeout)
        return FakeVerdict(VerifyStatus.TIMEOUT)

    outcome = run_vnnlib(onnx_path, spec_path, 5.0, verifier=slow, started=0.0)
    assert outcome.word == "timeout"
    assert outcome.stage == "loading"
    assert budgets == []  # started long ago: nothing left of the budget, no verifier call
    outcome = run_vnnlib(onnx_path, spec_path, 5.0, verifier=slow)
    assert 0 < budgets[-1] <= 5.0


def test_cli_errors_name_the_file_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path, spec_path = write_instance(tmp_path, 0.0)
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"\x0a\xff")
    out = tmp_path / "result.txt"
    assert main(["vnnlib", "--onnx", str(bad_onnx), "--spec", str(spec_path), "--timeout", "5",
                 "--out", str(out)]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    assert not out.exists()
    bad_spec = tmp_path / "bad.vnnlib"
    bad_spec.write_text(spec_path.read_text() + "\n(assert (<= Y_0 Y_9))\n")
    assert main(["vnnlib", "--onnx", str(onnx_path), "--spec", str(bad_spec), "--timeout", "5"]) \
        == 2
    err = capsys.readouterr().err
    assert "bad.vnnlib:" in err
    assert "Y_9" in err
    assert main(["vnnlib", "--onnx", str(onnx_path), "--spec", str(spec_path), "--timeout",
                 "0"]) == 2


@pytest.mark.parametrize(("layer", "name", "value"), [(0, "W0", float("nan")),
                                                 (2, "b2", float("inf"))])
def test_networks_with_nan_or_inf_weights_are_refused_before_bounding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layer: int, name: str, value: float
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        (model[layer].weight if name.startswith("W") else model[layer].bias).view(-1)[1] = value
    _, spec_path = write_instance(tmp_path, 0.0)
    onnx_path = tmp_path / "broken.onnx"
    export_onnx(model, (3,), onnx_path)
    calls: list[float] = []

    def never(model: nn.Module, spec: Specification, *, timeout: float) -> Verdictlike:
        calls.append(timeout)
        return FakeVerdict(VerifyStatus.VERIFIED)

    with pytest.raises(OnnxImportError, match=rf"broken\.onnx: .*NaN or inf.*initializer '{name}'"):
        run_vnnlib(onnx_path, spec_path, 10, verifier=never)
    assert calls == []
    out = tmp_path / "result.txt"
    assert main(["vnnlib", "--onnx", str(onnx_path), "--spec", str(spec_path), "--timeout", "10",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"initializer '{name}'" in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-3", "0", "soon"])
def test_a_bad_timeout_is_refused_when_parsing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    onnx_path, spec_path = write_instance(tmp_path, 0.0)
    out = tmp_path / "result.txt"
    assert main(["vnnlib", "--onnx", str(onnx_path), "--spec", str(spec_path),
                 f"--timeout={value}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --timeout" in err
    assert "Traceback" not in err
    assert not out.exists()
    # A finite timeout past what threading can wait for does not overflow the hard deadline.
    deadline = _Deadline(1e300, None)
    deadline.start()
    deadline.finish()


def test_a_failed_run_leaves_no_stale_answer_in_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, spec_path = write_instance(tmp_path, 0.0)
    out = tmp_path / "result.txt"
    for bad in (tmp_path / "missing.onnx", tmp_path / "bad.onnx"):
        (tmp_path / "bad.onnx").write_bytes(b"\x0a\xff")
        out.write_text("unsat\n")  # the answer of an earlier instance
        assert main(["vnnlib", "--onnx", str(bad), "--spec", str(spec_path), "--timeout", "5",
                     "--out", str(out)]) == 2
        assert bad.name in capsys.readouterr().err
        assert not out.exists() or "unsat" not in out.read_text()
    out.write_text("unsat\n")
    with pytest.raises(OnnxImportError):
        run_vnnlib(tmp_path / "bad.onnx", spec_path, 5, out=out, verifier=interval_verifier)
    assert not out.exists()
    # An --out in a missing folder is refused before any work.
    assert main(["vnnlib", "--onnx", str(tmp_path / "bad.onnx"), "--spec", str(spec_path),
                 "--timeout", "5", "--out", str(tmp_path / "nowhere" / "r.txt")]) == 2
    assert "cannot clear --out" in capsys.readouterr().err


def test_help_lists_the_options_and_the_answers() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    text = subparsers.choices["vnnlib"].format_help()  # type: ignore[index]
    for option in ("--onnx", "--spec", "--timeout", "--out", "--dtype", "unsat", "sat",
                   "timeout", "unknown", "exit status"):
        assert option in text


def _engine_available() -> bool:
    return getattr(importlib.import_module("tightrope.verify"), "verify", None) is not None


@pytest.mark.skipif(not _engine_available(), reason="tightrope.verify.verify not installed")
def test_main_with_the_engine_answers_the_nano_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not (SUITE / "test").exists():
        pytest.skip("shared VNN-COMP suite not present")
    out = tmp_path / "result.txt"
    assert main(["vnnlib", "--onnx", str(SUITE / "test" / "test_nano.onnx"), "--spec",
                 str(SUITE / "test" / "test_nano.vnnlib"), "--timeout", "30", "--out",
                 str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == "unsat\n"
    assert out.read_text() == "unsat\n"


@pytest.mark.slow
@pytest.mark.skipif(not _engine_available(), reason="tightrope.verify.verify not installed")
def test_console_script_answers_the_shared_test_instances(tmp_path: Path) -> None:
    if not (SUITE / "test").exists():
        pytest.skip("shared VNN-COMP suite not present")
    for onnx_name, spec_name, expected in [("test_nano.onnx", "test_nano.vnnlib", "unsat"),
                                           ("test_sat.onnx", "test_prop.vnnlib", "sat")]:
        out = tmp_path / "result.txt"
        done = subprocess.run(
            [sys.executable, "-m", "tightrope.apps.certify.cli", "vnnlib", "--onnx",
             str(SUITE / "test" / onnx_name), "--spec", str(SUITE / "test" / spec_name),
             "--timeout", "60", "--out", str(out)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected + "\n"
        assert parse_result(out.read_text()).status.value == (
            "verified" if expected == "unsat" else "falsified")


def _robustness_vnnlib(x: Tensor, label: int, eps: float, classes: int) -> str:
    flat = x.reshape(-1).tolist()
    lines = [f"(declare-const X_{i} Real)" for i in range(len(flat))]
    lines += [f"(declare-const Y_{j} Real)" for j in range(classes)]
    for i, v in enumerate(flat):
        lines.append(f"(assert (>= X_{i} {max(v - eps, 0.0)!r}))")
        lines.append(f"(assert (<= X_{i} {min(v + eps, 1.0)!r}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(classes) if j != label)
    return "\n".join([*lines, f"(assert (or {others}))"]) + "\n"


@pytest.mark.skipif(not _engine_available(), reason="tightrope.verify.verify not installed")
def test_engine_on_an_exported_convolutional_network(tmp_path: Path) -> None:
    from tightrope.bounds import Normalize

    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()
    onnx_path = tmp_path / "cnn.onnx"
    export_onnx(model, (1, 8, 8), onnx_path)
    x = torch.rand(1, 1, 8, 8)
    label = int(model(x).argmax())
    answers = {}
    for eps in (1e-4, 0.5):
        spec_path = tmp_path / f"robust_{eps}.vnnlib"
        spec_path.write_text(_robustness_vnnlib(x, label, eps, 3))
        outcome = run_vnnlib(onnx_path, spec_path, 30, out=tmp_path / f"r_{eps}.txt")
        answers[eps] = outcome.word
    # a tiny radius is provable; at radius 0.5 (most of [0, 1]) the class changes
    assert answers == {1e-4: "unsat", 0.5: "sat"}, answers


def test_counterexamples_of_a_reordering_network_are_written_in_onnx_order(
    tmp_path: Path,
) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = torch.tensor([[[[1.0]], [[-2.0]]]])  # Conv 2 -> 1 channels, 1x1
    nodes = [helper.make_node("Transpose", ["x"], ["t"], "to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "W"], ["c"], "conv"),
             helper.make_node("Flatten", ["c"], ["y"], "flat")]
    graph = helper.make_graph(
        nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 2, 2, 2))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 4))],
        initializer=[numpy_helper.from_array(weight.numpy(), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_path = tmp_path / "nhwc.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    # X_i in [i, i + 0.5]: a value written at the wrong index falls outside its interval.
    lines = [f"(declare-const X_{i} Real)" for i in range(8)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(4)]
    lines += [f"(assert (>= X_{i} {i}))\n(assert (<= X_{i} {i + 0.5}))" for i in range(8)]
    lines.append("(assert (<= Y_0 1000))")
    spec_path = tmp_path / "prop.vnnlib"
    spec_path.write_text("\n".join(lines) + "\n")
    outcome = run_vnnlib(onnx_path, spec_path, 10, out=tmp_path / "r.txt",
                         verifier=interval_verifier)
    assert outcome.word == "sat"
    result = parse_result((tmp_path / "r.txt").read_text())
    assert all(i <= v <= i + 0.5 for i, v in enumerate(result.inputs)), result.inputs
    # Y_j is the ONNX output: x_hwc[h, w, 0] - 2 x_hwc[h, w, 1] for pixel j = 2 h + w
    x = torch.tensor(result.inputs).reshape(2, 2, 2)
    expected = (x[..., 0] - 2 * x[..., 1]).reshape(-1)
    torch.testing.assert_close(torch.tensor(result.outputs), expected, rtol=1e-6, atol=1e-6)


def test_the_hard_deadline_writes_timeout_and_ends_the_process(tmp_path: Path) -> None:
    out = tmp_path / "result.txt"
    code = ("import time\n"
            "from tightrope.apps.certify.cli import _Deadline\n"
            f"_Deadline(0.2, {str(out)!r}).start()\n"
            "time.sleep(30)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout == "timeout\n"
    assert out.read_text() == "timeout\n"
    # finished in time: the deadline never fires
    code = ("import time\n"
            "from tightrope.apps.certify.cli import _Deadline\n"
            "deadline = _Deadline(0.5, None)\n"
            "deadline.start()\n"
            "deadline.finish()\n"
            "time.sleep(1.0)\n"
            "print('answered')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout == "answered\n"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius", ["1e4", "1e8"])
def test_a_violated_property_at_huge_magnitudes_is_never_unsat(
    tmp_path: Path, dtype: torch.dtype, radius: str
) -> None:
    """``y = sum_i relu(1e4 (x_i - 0.37)) + relu(-1e4 (x_i - 0.37)) - 1`` over 20 inputs in
    ``[-radius, radius]``, unsafe ``Y_0 <= 0``: x = 0.37 gives y = -1, so the property is
    violated; float32 interval arithmetic once proved it (the rounding of terms of 1e12)."""
    first, second = nn.Linear(20, 40), nn.Linear(40, 1)
    with torch.no_grad():
        first.weight.zero_()
        for i in range(20):
            first.weight[2 * i, i], first.bias[2 * i] = 1e4, -1e4 * 0.37
            first.weight[2 * i + 1, i], first.bias[2 * i + 1] = -1e4, 1e4 * 0.37
        second.weight.fill_(1.0)
        second.bias.fill_(-1.0)
    onnx_path = tmp_path / "cancel.onnx"
    export_onnx(nn.Sequential(first, nn.ReLU(), second).to(dtype), (20,), onnx_path, dtype=dtype)
    lines = [f"(declare-const X_{i} Real)" for i in range(20)] + ["(declare-const Y_0 Real)"]
    lines += [f"(assert (>= X_{i} -{radius}))\n(assert (<= X_{i} {radius}))" for i in range(20)]
    lines.append("(assert (<= Y_0 0))")
    spec_path = tmp_path / "prop.vnnlib"
    spec_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answer.txt"
    code = main(["vnnlib", "--onnx", str(onnx_path), "--spec", str(spec_path), "--timeout", "8",
                 "--out", str(out), "--quiet"])
    assert code == 0
    assert out.read_text().split()[0] in ("sat", "unknown", "timeout")
