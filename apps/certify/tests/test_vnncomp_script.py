"""scripts/vnncomp.py: running and scoring a tiny generated suite (one sat, one unsat)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from tightrope.bounds import ibp
from tightrope.verify.onnx import export_onnx
from tightrope.verify.spec import Specification, VerifyStatus

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "vnncomp.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vnncomp_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vnncomp_script"] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Answer:
    status: VerifyStatus
    counterexample: Tensor | None = None
    stage: str = "test"


def sound_verifier(model: nn.Module, spec: Specification, *, timeout: float) -> Answer:
    """IBP proves unsafe sets empty; random points falsify; otherwise UNKNOWN."""
    model = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(0)
    undecided = False
    for region in spec.regions:
        bounds = ibp(model, region.box)
        for unsafe in region.unsafe:
            low = unsafe.A.clamp(min=0) @ bounds.lower[0] + unsafe.A.clamp(max=0) @ bounds.upper[0]
            undecided |= not bool((low > unsafe.b).any())
        box = region.box
        points = box.lower + (box.upper - box.lower) * torch.rand(
            (256, *box.lower.shape[1:]), generator=generator, dtype=torch.float64)
        with torch.no_grad():
            outputs = model(points)
        for i in range(points.shape[0]):
            if spec.violated_by(points[i : i + 1], outputs[i : i + 1]):
                return Answer(VerifyStatus.FALSIFIED, points[i : i + 1].float())
    return Answer(VerifyStatus.UNKNOWN if undecided else VerifyStatus.VERIFIED)


def always_unsat(model: nn.Module, spec: Specification, *, timeout: float) -> Answer:
    return Answer(VerifyStatus.VERIFIED)


def make_suite(root: Path) -> Path:
    """``root/expected.csv`` and ``root/tiny/``: a 3-8-2 net and three properties."""
    torch.manual_seed(0)
    (root / "tiny").mkdir(parents=True)
    export_onnx(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)), (3,),
                root / "tiny" / "net.onnx")
    header = [f"(declare-const X_{i} Real)" for i in range(3)]
    header += [f"(declare-const Y_{j} Real)" for j in range(2)]
    header += [f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))" for i in range(3)]
    for name, threshold in [("sat", -1000.0), ("unsat", 1000.0), ("open", 1000.0)]:
        text = "\n".join([*header, f"(assert (>= Y_0 {threshold}))"]) + "\n"
        (root / "tiny" / f"{name}.vnnlib").write_text(text)
    (root / "expected.csv").write_text(
        "benchmark,onnx,vnnlib,expected,reference_tool_result,reference_tool_time_s\n"
        "tiny,net.onnx,sat.vnnlib,sat,sat,2.5\n"
        "tiny,net.onnx,unsat.vnnlib,unsat,unsat,1.5\n"
        "tiny,net.onnx,open.vnnlib,unknown,other,9\n"
    )
    (root / "tiny" / "tiny_instances.csv").write_text(
        "net.onnx,sat.vnnlib,7\nnet.onnx,unsat.vnnlib,8\nnet.onnx,open.vnnlib,9\n")
    return root


def test_a_sound_verifier_scores_both_instances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    suite = make_suite(tmp_path / "suite")
    out = tmp_path / "results.csv"
    status = script.main(["--suite", str(suite), "--out", str(out), "--results-dir",
                          str(tmp_path / "results")], verifier=sound_verifier)
    printed = capsys.readouterr().out
    assert status == 0
    assert "correct 2 (unsat 1, sat 1), WRONG 0, unconfirmed 1" in printed
    assert "reference tool (expected.csv): solved 2 of 3, solved sum 4.0 s, all 13.0 s" in printed
    rows = out.read_text().splitlines()
    assert len(rows) == 4
    assert rows[1].startswith("tiny/net/sat,sat,sat,correct")
    assert rows[2].startswith("tiny/net/unsat,unsat,unsat,correct")
    assert rows[3].startswith("tiny/net/open,unknown,unsat,unconfirmed")
    instances = script.read_suite(suite, None, 1, None)
    assert [i.timeout for i in instances] == [7.0, 8.0, 9.0]


def test_a_wrong_unsat_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script()
    suite = make_suite(tmp_path / "suite")
    status = script.main(["--suite", str(suite), "--filter", "sat", "--results-dir",
                          str(tmp_path / "results")], verifier=always_unsat)
    captured = capsys.readouterr()
    assert status == 1
    assert "WRONG: tiny/net/sat: answered unsat, expected sat" in captured.err


def test_the_scorer_rechecks_counterexamples_itself(tmp_path: Path) -> None:
    script = _script()
    suite = make_suite(tmp_path / "suite")
    sat, unsat = script.read_suite(suite, None, 1, None)[:2]
    values = "\n".join(f"(X_{i} 0.5)" for i in range(3))
    assert script.check_result(unsat, f"sat\n({values}\n(Y_0 1.0)\n(Y_1 0.0))") == (
        "sat", "the network's output at the counterexample does not violate the property")
    outside = "\n".join(f"(X_{i} 2.0)" for i in range(3))
    answer, problem = script.check_result(sat, f"sat\n({outside}\n(Y_0 1.0)\n(Y_1 0.0))")
    assert problem == "counterexample lies outside every input box"
    assert script.score("sat", answer, problem) == script.WRONG
    answer, problem = script.check_result(sat, f"sat\n({values}\n(Y_0 1e9)\n(Y_1 0.0))")
    assert problem == "the written outputs differ from the network's outputs"
    assert script.check_result(sat, "unsat\n") == ("unsat", "")
    assert script.score("sat", "timeout", "") == script.NO_ANSWER
    assert script.score("unsat", "unsat", "") == script.CORRECT


def test_every_and_missing_suite(tmp_path: Path) -> None:
    script = _script()
    suite = make_suite(tmp_path / "suite")
    assert [i.vnnlib.stem for i in script.read_suite(suite, None, 2, 5.0)] == ["sat", "open"]
    # --known keeps the instances with an expected answer before --every picks among them.
    known = script.read_suite(suite, None, 1, None, known=True)
    assert [i.vnnlib.stem for i in known] == ["sat", "unsat"]
    assert [i.vnnlib.stem for i in script.read_suite(suite, None, 2, None, True)] == ["sat"]
    with pytest.raises(SystemExit, match=r"expected\.csv"):
        script.read_suite(tmp_path / "nowhere", None, 1, None)


@pytest.mark.slow
def test_subprocess_mode_with_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script()
    suite = make_suite(tmp_path / "suite")
    out = tmp_path / "results.csv"
    status = script.main(["--suite", str(suite), "--subprocess", "--timeout", "60",
                          "--results-dir", str(tmp_path / "results"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "correct 2 (unsat 1, sat 1), WRONG 0, unconfirmed 1" in printed
    # the deciding stage comes from the CLI's summary line
    stages = [line.split(",")[4] for line in out.read_text().splitlines()[1:]]
    assert all(stages), stages
