"""VNNLIB parsing, VNN-COMP result files, and the importer on the shared mnistfc instances."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from tightrope.verify.onnx import load_onnx
from tightrope.verify.spec import VerifyStatus
from tightrope.verify.vnnlib import VnnlibError, load_vnnlib, parse_vnnlib
from tightrope.verify.vnnlib_result import format_result, parse_result

SUITE = Path("/work/shared/benchmarks/vnncomp2021")

HEADER = "\n".join(f"(declare-const X_{i} Real)" for i in range(4)) + "\n" + "\n".join(
    f"(declare-const Y_{j} Real)" for j in range(3)
)
BOX = "\n".join(f"(assert (<= X_{i} {i + 1}))\n(assert (>= X_{i} -{i}))" for i in range(4))


def test_box_and_output_disjunction_of_conjunctions() -> None:
    text = HEADER + "\n; a comment (with parens\n" + BOX + """
(assert (or
    (and (>= Y_0 Y_1) (<= Y_2 0.5))
    (and (<= (+ Y_1 (* 2 Y_2)) (- 3)))
))"""
    spec = parse_vnnlib(text, (2, 2))
    (region,) = spec.regions
    assert region.box.lower.shape == (1, 2, 2)
    assert region.box.lower.reshape(-1).tolist() == [0.0, -1.0, -2.0, -3.0]
    assert region.box.upper.reshape(-1).tolist() == [1.0, 2.0, 3.0, 4.0]
    first, second = region.unsafe
    # Y_1 - Y_0 <= 0 and Y_2 <= 0.5
    assert first.A.tolist() == [[-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert first.b.tolist() == [0.0, 0.5]
    assert second.A.tolist() == [[0.0, 1.0, 2.0]]
    assert second.b.tolist() == [-3.0]
    # Membership agrees with evaluating the constraints directly.
    generator = torch.Generator().manual_seed(0)
    for y in torch.randn(200, 3, generator=generator, dtype=torch.float64):
        expected = bool(y[0] >= y[1] and y[2] <= 0.5) or bool(y[1] + 2 * y[2] <= -3)
        x = region.box.center
        assert spec.violated_by(x, y.unsqueeze(0)) == expected


def test_top_level_disjunction_of_boxes_gives_several_regions() -> None:
    one = " ".join(f"(>= X_{i} 0) (<= X_{i} 1)" for i in range(4))
    two = " ".join(f"(>= X_{i} 2) (<= X_{i} 3)" for i in range(4))
    text = HEADER + f"""
(assert (or (and {one} (>= Y_0 1)) (and {two} (>= Y_1 1)) (and {one} (>= Y_2 1))))"""
    spec = parse_vnnlib(text, (4,))
    assert len(spec.regions) == 2
    first, second = spec.regions
    assert len(first.unsafe) == 2  # the two disjuncts sharing box one
    assert second.box.lower.tolist() == [[2.0] * 4]
    inside_two = torch.full((1, 4), 2.5, dtype=torch.float64)
    assert spec.violated_by(inside_two, torch.tensor([[0.0, 2.0, 0.0]]))
    assert not spec.violated_by(inside_two, torch.tensor([[0.0, 0.0, 2.0]]))


def test_and_of_ors_is_expanded() -> None:
    text = HEADER + "\n" + BOX + "\n(assert (or (>= Y_0 1) (>= Y_1 1)))\n" \
        "(assert (or (<= Y_2 0) (<= Y_0 -5)))"
    (region,) = parse_vnnlib(text, (4,)).regions
    assert len(region.unsafe) == 4


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (HEADER + "\n(assert (<= X_0 1)", 8, "never closed"),
        (HEADER + "\n(assert (<= X_0 1)))", 8, "without a matching"),
        (HEADER + "\n\n(assert (<= X_9 1))", 9, "before it is declared"),
        (HEADER + "\n(assert (<= (* X_0 X_1) 1))", 8, "not linear"),
        (HEADER + "\n(assert (<= X_0 Y_1))", 8, "mixing inputs and outputs"),
        (HEADER + "\n(assert (<= (+ X_0 X_1) 1))", 8, "must be a box"),
        (HEADER + "\n(assert (=> X_0 1))", 8, "unsupported operator"),
        (HEADER + "\n(check-sat)", 8, "unsupported command"),
        (HEADER + "\n(assert (<= X_0 abc))", 8, "expected a number"),
        ("(declare-const X_0 Int)", 1, "only Real"),
        ("(declare-const Z_0 Real)", 1, "X_i"),
    ],
)
def test_malformed_files_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(VnnlibError, match=message) as info:
        parse_vnnlib(text, (4,), source="prop.vnnlib")
    assert info.value.line == line
    assert str(info.value).startswith(f"prop.vnnlib:{line}: ")


def test_file_level_problems_are_reported() -> None:
    with pytest.raises(VnnlibError, match="network takes 5"):
        parse_vnnlib(HEADER + "\n" + BOX, (5,))
    with pytest.raises(VnnlibError, match="lack a lower or an upper bound"):
        parse_vnnlib(HEADER + "\n(assert (<= X_0 1))", (4,))
    with pytest.raises(VnnlibError, match="network has 10"):
        parse_vnnlib(HEADER + "\n" + BOX + "\n(assert (<= Y_0 1))", (4,), num_outputs=10)
    with pytest.raises(VnnlibError, match="cannot read"):
        load_vnnlib("/nonexistent/prop.vnnlib", (4,))


def test_result_files_round_trip() -> None:
    x = torch.tensor([[0.1, -1 / 3], [2e-300, 7.0]], dtype=torch.float64)
    y = torch.tensor([[math.pi, -0.0]], dtype=torch.float64)
    text = format_result(VerifyStatus.FALSIFIED, x, y)
    assert text.startswith("sat\n((X_0 0.1)\n (X_1 ")
    parsed = parse_result(text)
    assert parsed.status is VerifyStatus.FALSIFIED
    assert torch.equal(parsed.input_tensor((2, 2)), x.unsqueeze(0).reshape(1, 2, 2))
    assert parsed.outputs == (math.pi, -0.0)
    for status, word in [(VerifyStatus.VERIFIED, "unsat"), (VerifyStatus.TIMEOUT, "timeout"),
                         (VerifyStatus.UNKNOWN, "unknown")]:
        assert format_result(status) == word + "\n"
        assert parse_result(word).status is status
    assert parse_result("holds").status is VerifyStatus.VERIFIED
    with pytest.raises(ValueError, match="needs the counterexample"):
        format_result(VerifyStatus.FALSIFIED)
    with pytest.raises(ValueError, match="unknown result"):
        parse_result("maybe")
    with pytest.raises(ValueError, match="gaps"):
        parse_result("sat\n((X_0 1) (X_2 1) (Y_0 1))")
    with pytest.raises(ValueError, match="not finite"):
        parse_result("sat\n((X_0 nan) (Y_0 1))")


# --- the shared mnistfc instances ----------------------------------------------------------


def _instances(expected: str) -> list[tuple[str, str]]:
    path = SUITE / "expected.csv"
    if not path.exists():
        pytest.skip("shared VNN-COMP suite not present")
    with path.open() as handle:
        return [(row["onnx"], row["vnnlib"]) for row in csv.DictReader(handle)
                if row["benchmark"] == "mnistfc" and row["expected"] == expected]


def _pgd_violation(onnx_name: str, vnnlib_name: str, steps: int = 100,
                   restarts: int = 32) -> bool:
    """Signed-gradient PGD with restarts on how far the output is from each unsafe set; True
    when a point it finds is a counterexample by the spec's own float64 check."""
    net = load_onnx(SUITE / "mnistfc" / onnx_name, dtype=torch.float64)
    spec = load_vnnlib(SUITE / "mnistfc" / vnnlib_name, net.input_shape,
                       num_outputs=net.num_outputs)
    generator = torch.Generator().manual_seed(0)
    for region in spec.regions:
        lower, upper = region.box.lower, region.box.upper
        for unsafe in region.unsafe:
            noise = torch.rand((restarts, *lower.shape[1:]), generator=generator,
                               dtype=torch.float64)
            x = (lower + (upper - lower) * noise).requires_grad_()
            for t in range(steps):
                step = float((upper - lower).max()) / 4 * (1 - t / steps) + 1e-4
                distance = (net.module(x) @ unsafe.A.T - unsafe.b).max(dim=1).values
                (gradient,) = torch.autograd.grad(distance.sum(), x)
                with torch.no_grad():
                    x = torch.minimum(torch.maximum(x - step * gradient.sign(), lower), upper)
                x.requires_grad_()
            with torch.no_grad():
                outputs = net.module(x)
            if any(spec.violated_by(x[i : i + 1], outputs[i : i + 1]) for i in range(restarts)):
                return True
    return False


def test_mnistfc_properties_parse_against_their_networks() -> None:
    instances = _instances("unsat")[:3] + _instances("sat")[:3]
    for onnx_name, vnnlib_name in instances:
        net = load_onnx(SUITE / "mnistfc" / onnx_name)
        spec = load_vnnlib(SUITE / "mnistfc" / vnnlib_name, net.input_shape,
                           num_outputs=net.num_outputs)
        (region,) = spec.regions
        assert region.box.lower.shape == (1, *net.input_shape)
        assert len(region.unsafe) == 9  # one per class other than the label
        eps = float(vnnlib_name.rsplit("_", 1)[1].removesuffix(".vnnlib"))
        width = region.box.upper - region.box.lower
        assert float(width.max()) <= 2 * eps + 1e-6
        # the box centre (near the image) is classified as the label: not a counterexample
        with torch.no_grad():
            centre = region.box.center.to(torch.float32)
            assert not spec.violated_by(centre, net.module(centre))


def test_pgd_finds_counterexamples_on_sat_mnistfc_instances() -> None:
    # Three sat instances on which a plain attack succeeds quickly: the imported network and
    # the parsed property are consistent with the known answer.
    _instances("sat")
    for vnnlib_name in ("prop_12_0.05.vnnlib", "prop_13_0.05.vnnlib", "prop_14_0.05.vnnlib"):
        assert _pgd_violation("mnist-net_256x2.onnx", vnnlib_name), vnnlib_name


def test_pgd_finds_nothing_on_unsat_instances() -> None:
    for onnx_name, vnnlib_name in _instances("unsat")[:2]:
        assert not _pgd_violation(onnx_name, vnnlib_name, steps=30, restarts=8)


@pytest.mark.slow
def test_pgd_finds_counterexamples_on_most_sat_mnistfc_instances() -> None:
    instances = _instances("sat")
    found = sum(_pgd_violation(o, v) for o, v in instances)
    assert found >= len(instances) * 3 // 4, f"{found} of {len(instances)}"


def test_input_order_lays_out_boxes_for_a_reordering_network() -> None:
    text = HEADER + "\n" + BOX + "\n(assert (<= Y_0 0))"
    order = (2, 0, 3, 1)  # model input position i holds X_{order[i]}
    (region,) = parse_vnnlib(text, (4,), input_order=order).regions
    assert region.box.lower.tolist() == [[-2.0, 0.0, -3.0, -1.0]]
    assert region.box.upper.tolist() == [[3.0, 1.0, 4.0, 2.0]]
    with pytest.raises(ValueError, match="permutation"):
        parse_vnnlib(text, (4,), input_order=(0, 0, 1, 2))


def test_gzip_compressed_files_are_read(tmp_path: Path) -> None:
    import gzip

    from torch import nn

    from tightrope.verify.onnx import export_onnx

    text = HEADER + "\n" + BOX + "\n(assert (<= Y_0 0))"
    with gzip.open(tmp_path / "prop.vnnlib.gz", "wt") as handle:
        handle.write(text)
    spec = load_vnnlib(tmp_path / "prop.vnnlib.gz", (4,))
    assert spec.regions[0].box.upper.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    torch.manual_seed(0)
    with gzip.open(tmp_path / "net.onnx.gz", "wb") as handle:
        handle.write(export_onnx(nn.Sequential(nn.Linear(4, 3)), (4,)))
    assert load_onnx(tmp_path / "net.onnx.gz").num_outputs == 3
    (tmp_path / "broken.onnx.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot read the file"):
        load_onnx(tmp_path / "broken.onnx.gz")
