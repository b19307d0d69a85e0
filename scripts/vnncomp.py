#!/usr/bin/env python3
"""Run a VNN-COMP-style suite with ``tightrope-certify vnnlib`` and score it.

    .venv/bin/python scripts/vnncomp.py --suite /work/shared/benchmarks/vnncomp2021 \\
        --filter 256x2 --timeout 300 --out results.csv

The suite directory holds ``expected.csv`` (columns ``benchmark,onnx,vnnlib,expected``; the
expected answer is ``unsat``, ``sat`` or ``unknown``) and one folder per benchmark with the
``.onnx`` and ``.vnnlib`` files (and optionally ``<benchmark>_instances.csv`` with per-instance
timeouts, used unless ``--timeout`` is given).

Each instance runs in this process by default (``run_vnnlib``, the code behind the CLI; torch
is imported once), or with ``--subprocess`` as a fresh ``tightrope-certify vnnlib`` process
(start-up included in its time). Either way the answer is read back from the result file it
wrote, and every ``sat`` is re-checked here independently: the counterexample must have one
value per input, lie in an input box of the property, and its float64 forward pass (of the
network loaded afresh) must violate the property.

Scoring as VNN-COMP: +1 for a correct ``unsat`` or a ``sat`` whose counterexample checks; 0 for
``timeout``, ``unknown`` or an error; a ``sat`` that fails the check, or an ``unsat`` where
``sat`` is expected, is WRONG and makes the exit status 1. An ``unsat`` on an instance whose
answer is not known scores 0 and is listed as unconfirmed.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CORRECT, WRONG, UNCONFIRMED, NO_ANSWER, ERROR = "correct", "WRONG", "unconfirmed", "-", "error"
# The CLI's summary line on stderr: "# unsat by crown: load ..." (the stage is optional).
_SUMMARY = re.compile(r"^# \w+(?: by (\S+?))?(?: \(.*\))?:", re.MULTILINE)


@dataclass(frozen=True)
class Instance:
    benchmark: str
    onnx: Path
    vnnlib: Path
    expected: str
    timeout: float
    #: The reference tool's answer and time from expected.csv, when given.
    reference: str = ""
    reference_seconds: float | None = None

    @property
    def name(self) -> str:
        return f"{self.benchmark}/{self.onnx.stem}/{self.vnnlib.stem}"


@dataclass(frozen=True)
class Row:
    instance: str
    expected: str
    answer: str
    verdict: str
    stage: str
    seconds: float
    note: str
    reference: str = ""
    reference_seconds: float | None = None


def read_suite(
    suite: Path, pattern: str | None, every: int, timeout: float | None, known: bool = False
) -> list[Instance]:
    """The instances of ``suite/expected.csv`` whose name contains ``pattern`` (with ``known``,
    only those whose answer is known: ``sat`` or ``unsat``), every ``every``-th one."""
    expected_csv = suite / "expected.csv"
    if not expected_csv.exists():
        raise SystemExit(f"vnncomp.py: {expected_csv} not found")
    instances = []
    timeouts: dict[tuple[str, str, str], float] = {}
    with expected_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for benchmark in sorted({row["benchmark"] for row in rows}):
        listing = suite / benchmark / f"{benchmark}_instances.csv"
        if listing.exists():
            with listing.open(newline="") as handle:
                for fields in csv.reader(handle):
                    if len(fields) >= 3:
                        timeouts[(benchmark, fields[0], fields[1])] = float(fields[2])
    for row in rows:
        key = (row["benchmark"], row["onnx"], row["vnnlib"])
        instance = Instance(
            benchmark=row["benchmark"],
            onnx=suite / row["benchmark"] / row["onnx"],
            vnnlib=suite / row["benchmark"] / row["vnnlib"],
            expected=row["expected"].strip().lower(),
            timeout=timeout if timeout is not None else timeouts.get(key, 300.0),
            reference=(row.get("reference_tool_result") or "").strip().lower(),
            reference_seconds=_float_or_none(row.get("reference_tool_time_s")),
        )
        if known and instance.expected not in ("sat", "unsat"):
            continue
        if pattern is None or pattern in instance.name:
            instances.append(instance)
    return instances[::every]


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def check_result(instance: Instance, text: str) -> tuple[str, str]:
    """``(answer, problem)`` for a result file's text; ``problem`` is ``""`` when a ``sat``
    counterexample checks out (or the answer is not ``sat``)."""
    import torch

    from tightrope.verify.onnx import load_onnx
    from tightrope.verify.spec import VerifyStatus
    from tightrope.verify.vnnlib import load_vnnlib
    from tightrope.verify.vnnlib_result import parse_result, status_word

    try:
        result = parse_result(text)
    except ValueError as error:
        return "sat" if text.strip().startswith("sat") else "?", f"unreadable result: {error}"
    answer = status_word(result.status)
    if result.status is not VerifyStatus.FALSIFIED:
        return answer, ""
    net = load_onnx(instance.onnx, dtype=torch.float64)
    spec = load_vnnlib(instance.vnnlib, net.input_shape, num_outputs=net.num_outputs,
                       input_order=net.input_order)
    if len(result.inputs) != net.input_size or len(result.outputs) != net.num_outputs:
        return answer, (f"counterexample has {len(result.inputs)} inputs and "
                        f"{len(result.outputs)} outputs, the network {net.input_size} and "
                        f"{net.num_outputs}")
    x = net.from_onnx_order(torch.tensor(result.inputs, dtype=torch.float64))
    if not any(bool(region.box.contains(x).all()) for region in spec.regions):
        return answer, "counterexample lies outside every input box"
    with torch.no_grad():
        y = net.module(x)
    if not spec.violated_by(x, y):
        return answer, "the network's output at the counterexample does not violate the property"
    written = torch.tensor(result.outputs, dtype=torch.float64)
    if not torch.allclose(written, y.reshape(-1), rtol=1e-4, atol=1e-4):
        return answer, "the written outputs differ from the network's outputs"
    return answer, ""


def score(expected: str, answer: str, problem: str) -> str:
    if answer == "sat":
        return WRONG if problem else CORRECT
    if answer == "unsat":
        if expected == "sat":
            return WRONG
        return CORRECT if expected == "unsat" else UNCONFIRMED
    return NO_ANSWER


def run_instance(instance: Instance, result_path: Path, subprocess_mode: bool,
                 verifier: Any = None) -> tuple[str, str, float]:
    """Run one instance; ``(result text or "", stage or error note, seconds)``."""
    start = time.perf_counter()
    if subprocess_mode:
        command = [sys.executable, "-m", "tightrope.apps.certify.cli", "vnnlib", "--onnx",
                   str(instance.onnx), "--spec", str(instance.vnnlib), "--timeout",
                   str(instance.timeout), "--out", str(result_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=instance.timeout + 60)
        except subprocess.TimeoutExpired:
            return "timeout\n", "killed after the timeout", time.perf_counter() - start
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            return "", (done.stderr.strip().splitlines() or ["failed"])[-1], seconds
        summary = _SUMMARY.search(done.stderr)
        stage = summary.group(1) if summary else ""
        return result_path.read_text(), stage, seconds
    from tightrope.apps.certify.vnnlib_command import run_vnnlib

    try:
        outcome = run_vnnlib(instance.onnx, instance.vnnlib, instance.timeout, out=result_path,
                             verifier=verifier)
    except Exception as error:  # an error is a non-answer, reported, never a crash of the run
        return "", f"{type(error).__name__}: {error}".splitlines()[0], time.perf_counter() - start
    stage = outcome.stage + (f" ({outcome.note})" if outcome.note else "")
    return outcome.text, stage, time.perf_counter() - start


def run_suite(instances: list[Instance], results_dir: Path, *, subprocess_mode: bool = False,
              verifier: Any = None,
              report: Callable[[Row], None] | None = None) -> list[Row]:
    rows = []
    if not subprocess_mode and verifier is None:
        # Import the engine once, outside any instance's time (a process pays it at start-up).
        from tightrope.apps.certify.vnnlib_command import default_verifier
        from tightrope.bounds import keep_freed_memory

        keep_freed_memory()  # as tightrope-certify does
        verifier = default_verifier()
    for instance in instances:
        result_path = results_dir / instance.benchmark / (
            f"{instance.onnx.stem}__{instance.vnnlib.stem}.txt")
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        text, stage, seconds = run_instance(instance, result_path, subprocess_mode, verifier)
        reference = (instance.reference, instance.reference_seconds)
        if not text:
            row = Row(instance.name, instance.expected, ERROR, NO_ANSWER, "", seconds, stage,
                      *reference)
        else:
            answer, problem = check_result(instance, text)
            verdict = score(instance.expected, answer, problem)
            if verdict == CORRECT and answer == "sat" and instance.expected == "unsat":
                problem = "checked counterexample on an instance expected unsat"
            row = Row(instance.name, instance.expected, answer, verdict, stage, seconds,
                      problem, *reference)
        rows.append(row)
        if report is not None:
            report(row)
    return rows


def summary(rows: list[Row]) -> list[str]:
    correct = [r for r in rows if r.verdict == CORRECT]
    solved_times = [r.seconds for r in correct]
    lines = [
        f"instances {len(rows)}: correct {len(correct)} "
        f"(unsat {sum(r.answer == 'unsat' for r in correct)}, "
        f"sat {sum(r.answer == 'sat' for r in correct)}), "
        f"WRONG {sum(r.verdict == WRONG for r in rows)}, "
        f"unconfirmed {sum(r.verdict == UNCONFIRMED for r in rows)}, "
        f"timeout {sum(r.answer == 'timeout' for r in rows)}, "
        f"unknown {sum(r.answer == 'unknown' for r in rows)}, "
        f"errors {sum(r.answer == ERROR for r in rows)}",
        f"score {len(correct)}; time total {sum(r.seconds for r in rows):.1f} s"
        + (f", solved: median {statistics.median(solved_times):.2f} s, max "
           f"{max(solved_times):.2f} s, sum {sum(solved_times):.1f} s" if solved_times else ""),
    ]
    timed = [r for r in rows if r.reference_seconds is not None]
    if timed:
        solved = [r for r in timed if r.reference in ("sat", "unsat")]
        lines.append(
            f"reference tool (expected.csv): solved {len(solved)} of {len(timed)}, solved sum "
            f"{sum(r.reference_seconds or 0.0 for r in solved):.1f} s, all "
            f"{sum(r.reference_seconds or 0.0 for r in timed):.1f} s (its times include its "
            "start-up)"
        )
    return lines


def _print_row(row: Row) -> None:
    note = f"  {row.note}" if row.note else ""
    print(f"{row.instance:<48} {row.expected:>8} {row.answer:>8} {row.verdict:>11} "
          f"{row.seconds:8.2f}  {row.stage}{note}", flush=True)


def main(argv: Sequence[str] | None = None, *, verifier: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--suite", type=Path, required=True,
                        help="folder with expected.csv and one folder per benchmark")
    parser.add_argument("--filter", help="only instances whose benchmark/net/property name "
                        "contains this (e.g. 256x2)")
    parser.add_argument("--every", type=int, default=1, metavar="K",
                        help="only every K-th matching instance (default 1: all)")
    parser.add_argument("--known", action="store_true",
                        help="only instances whose answer is known (sat or unsat), before "
                        "--every picks among them")
    parser.add_argument("--timeout", type=float, help="seconds per instance (default: the "
                        "benchmark's instances.csv, else 300)")
    parser.add_argument("--out", type=Path, help="write the table as CSV here")
    parser.add_argument("--results-dir", type=Path, default=Path("vnncomp-results"),
                        help="where the per-instance result files go (default: %(default)s)")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each instance as a fresh tightrope-certify process")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be >= 1")
    instances = read_suite(args.suite, args.filter, args.every, args.timeout, args.known)
    if not instances:
        print("vnncomp.py: no instance matches", file=sys.stderr)
        return 2
    mode = "subprocess" if args.subprocess else "in-process"
    print(f"{len(instances)} instances, {mode}")
    print(f"{'instance':<48} {'expected':>8} {'answer':>8} {'verdict':>11} {'seconds':>8}  stage")
    rows = run_suite(instances, args.results_dir, subprocess_mode=args.subprocess,
                     verifier=verifier, report=_print_row)
    for line in summary(rows):
        print(line)
    if args.out is not None:
        with args.out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    wrong = [r for r in rows if r.verdict == WRONG]
    for row in wrong:
        print(f"WRONG: {row.instance}: answered {row.answer}, expected {row.expected}"
              + (f" ({row.note})" if row.note else ""), file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
