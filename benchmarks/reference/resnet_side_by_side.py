"""IBP and CROWN bounds on VNN-COMP 2021's resnet_2b, tightrope against auto_LiRPA.

Three steps, the middle one in the auto_LiRPA venv (``$REF_ROOT/venvs/Fast-Certified-Robust-
Training``, auto_LiRPA 0.7.1; see README.md), the others in tightrope's:

    .venv/bin/python benchmarks/reference/resnet_side_by_side.py export OUT/problem.pt
    $REF_ROOT/venvs/Fast-Certified-Robust-Training/bin/python \\
        benchmarks/reference/resnet_side_by_side.py lirpa OUT/problem.pt OUT/lirpa.pt
    .venv/bin/python benchmarks/reference/resnet_side_by_side.py compare OUT/problem.pt \\
        OUT/lirpa.pt

``export`` reads the network with ``tightrope.verify.load_onnx`` and every 4th property of the
benchmark with a known answer, and writes the ONNX weights (by initializer name), each
property's input box and its rows ``C`` (float32, as the network). ``lirpa`` rebuilds the
network as a plain PyTorch module from those weights (the ONNX graph's layers, written here)
and bounds ``C f`` with auto_LiRPA's IBP and CROWN. ``compare`` bounds the same with
tightrope's ``ibp`` and ``crown`` and prints both, their largest differences and the median
times (``--repeats`` runs each, after one warm-up; one torch thread on both sides).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SUITE = Path("/work/shared/benchmarks/vnncomp2021")


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def export(out: Path, suite: Path) -> None:
    import csv

    import onnx
    from onnx import numpy_helper

    from tightrope.verify import load_onnx
    from tightrope.verify.vnnlib import load_vnnlib

    bench = suite / "cifar10_resnet"
    onnx_path = bench / "onnx" / "resnet_2b.onnx"
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
               for i in onnx.load(str(onnx_path)).graph.initializer}
    net = load_onnx(onnx_path)
    with (suite / "expected.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["benchmark"] == "cifar10_resnet"
                and r["expected"] in ("sat", "unsat")]
    problems = []
    for row in rows[::4]:
        spec = load_vnnlib(bench / row["vnnlib"], net.input_shape, num_outputs=net.num_outputs)
        (region,) = spec.regions
        C = torch.cat([u.A for u in region.unsafe]).to(torch.float32)
        problems.append({"name": Path(row["vnnlib"]).stem,
                         "lower": region.box.lower.to(torch.float32),
                         "upper": region.box.upper.to(torch.float32), "C": C})
    torch.save({"weights": weights, "problems": problems}, out)
    print(f"wrote {out}: {len(problems)} properties")


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class _ResNet2b(nn.Module):
    """resnet_2b's ONNX graph as PyTorch layers (initializer names match the state dict)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1)
        self.layer1 = nn.Sequential(_Block(8, 16, 2), _Block(16, 16, 1))
        self.linear1 = nn.Linear(1024, 100)
        self.linear2 = nn.Linear(100, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(torch.relu(self.conv1(x)))
        return self.linear2(torch.relu(self.linear1(torch.flatten(x, 1))))


def lirpa(problem_path: Path, out: Path, repeats: int) -> None:
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    torch.set_num_threads(1)
    data = torch.load(problem_path)
    model = _ResNet2b()
    model.load_state_dict(data["weights"])
    model.eval()
    found = []
    for problem in data["problems"]:
        lower, upper, C = problem["lower"], problem["upper"], problem["C"].unsqueeze(0)
        bounded = BoundedModule(model, torch.zeros_like(lower), device="cpu", verbose=0)
        x = BoundedTensor((lower + upper) / 2,
                          PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper))
        row: dict[str, Any] = {"name": problem["name"]}
        with torch.no_grad():
            for method in ("IBP", "CROWN"):
                (lb, ub), seconds = _timed(
                    lambda m=method, b=bounded, x=x, C=C: b.compute_bounds(x=(x,), C=C, method=m),
                    repeats)
                row[method] = (lb, ub, seconds)
        found.append(row)
        print(problem["name"], {m: f"{row[m][2]:.4f} s" for m in ("IBP", "CROWN")})
    torch.save(found, out)


def compare(problem_path: Path, lirpa_path: Path, repeats: int) -> None:
    from tightrope.bounds import Box, crown, ibp
    from tightrope.verify import load_onnx

    torch.set_num_threads(1)
    data = torch.load(problem_path)
    theirs = torch.load(lirpa_path)
    net = load_onnx(SUITE / "cifar10_resnet" / "onnx" / "resnet_2b.onnx")
    model = net.module.eval()
    print(f"{'property':<24} {'method':<6} {'max |lower diff|':>16} {'max |upper diff|':>16} "
          f"{'ours s':>8} {'auto_LiRPA s':>12} {'ratio':>6}")
    ratios: dict[str, list[float]] = {"IBP": [], "CROWN": []}
    for problem, other in zip(data["problems"], theirs, strict=True):
        box = Box(problem["lower"].view(1, *net.input_shape),
                  problem["upper"].view(1, *net.input_shape))
        C = problem["C"].unsqueeze(0)
        with torch.no_grad():
            for method, fn in (("IBP", ibp), ("CROWN", crown)):
                ours, seconds = _timed(lambda f=fn, box=box, C=C: f(model, box, C), repeats)
                lb, ub, their_seconds = other[method]
                ratios[method].append(seconds / their_seconds)
                print(f"{problem['name']:<24} {method:<6} "
                      f"{float((ours.lower - lb).abs().max()):16.3e} "
                      f"{float((ours.upper - ub).abs().max()):16.3e} {seconds:8.4f} "
                      f"{their_seconds:12.4f} {seconds / their_seconds:6.2f}")
    for method, values in ratios.items():
        print(f"{method}: median time ratio ours / auto_LiRPA {statistics.median(values):.2f} "
              f"over {len(values)} properties")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("export")
    first.add_argument("out", type=Path)
    first.add_argument("--suite", type=Path, default=SUITE)
    second = commands.add_parser("lirpa")
    second.add_argument("problem", type=Path)
    second.add_argument("out", type=Path)
    second.add_argument("--repeats", type=int, default=5)
    third = commands.add_parser("compare")
    third.add_argument("problem", type=Path)
    third.add_argument("lirpa", type=Path)
    third.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.out, args.suite)
    elif args.command == "lirpa":
        lirpa(args.problem, args.out, args.repeats)
    else:
        compare(args.problem, args.lirpa, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
