"""Measure `tightrope.verify.verify` on the VNN-COMP 2021 mnistfc instances with known answers.

Usage (from the repository root)::

    .venv/bin/python benchmarks/verify_vnncomp.py --net 256x2 --timeout 120
    .venv/bin/python benchmarks/verify_vnncomp.py --net 256x4 --every 3 --timeout 300

Prints one line per instance (answer, expected answer, seconds, deciding stage, subdomains) and
a summary; a wrong answer (``verified`` on a ``sat`` instance or ``falsified`` on an ``unsat``
one) is reported as WRONG. Writes a CSV with ``--out``. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from tightrope.verify import VerifierConfig, VerifyStatus, verify
from tightrope.verify.onnx import load_onnx
from tightrope.verify.vnnlib import load_vnnlib

SUITE = Path("/work/shared/benchmarks/vnncomp2021")
ANSWERS = {VerifyStatus.VERIFIED: "unsat", VerifyStatus.FALSIFIED: "sat"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--net", default="256x2", help="256x2, 256x4 or 256x6")
    parser.add_argument("--every", type=int, default=1, help="take every n-th instance")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", default=None, help="run only this vnnlib file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a CPU shared with other jobs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.suite / "expected.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if f"net_{args.net}." in r["onnx"]]
    rows = rows[:: args.every]
    if args.only:
        rows = [r for r in rows if r["vnnlib"] == args.only]
    results = []
    for row in rows:
        start = time.monotonic()
        onnx = load_onnx(args.suite / "mnistfc" / row["onnx"], dtype=torch.float32)
        spec = load_vnnlib(args.suite / "mnistfc" / row["vnnlib"], onnx.input_shape,
                           num_outputs=onnx.num_outputs)
        load_seconds = time.monotonic() - start
        verdict = verify(onnx.module, spec, timeout=args.timeout, config=VerifierConfig())
        answer = ANSWERS.get(verdict.status, verdict.status.value)
        expected = row["expected"]
        wrong = answer in ("sat", "unsat") and expected in ("sat", "unsat") and answer != expected
        if verdict.counterexample is not None and verdict.output is not None:
            wrong |= not spec.violated_by(verdict.counterexample, verdict.output)
        results.append((row, answer, verdict, load_seconds, wrong))
        print(f"{row['vnnlib']:24s} {answer:8s} expected {expected:8s} "
              f"{verdict.seconds:7.2f}s  stage {verdict.stage.value:12s} "
              f"domains {verdict.domains:7d}{'  WRONG' if wrong else ''}", flush=True)
    solved = [r for r in results if r[1] in ("sat", "unsat") and not r[4]]
    times = [r[2].seconds for r in solved]
    print(f"\n{args.net}: solved {len(solved)}/{len(results)} "
          f"({sum(r[1] == 'unsat' for r in solved)} unsat, {sum(r[1] == 'sat' for r in solved)} "
          f"sat), wrong {sum(r[4] for r in results)}; solver time of solved: total "
          f"{sum(times):.1f} s, median {statistics.median(times) if times else 0:.2f} s, "
          f"max {max(times, default=0):.1f} s; all instances "
          f"{sum(r[2].seconds for r in results):.1f} s")
    if args.out:
        with open(args.out, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["onnx", "vnnlib", "answer", "expected", "seconds", "stage",
                             "domains", "load_seconds", "wrong"])
            for row, answer, verdict, load_seconds, wrong in results:
                writer.writerow([row["onnx"], row["vnnlib"], answer, row["expected"],
                                 f"{verdict.seconds:.3f}", verdict.stage.value, verdict.domains,
                                 f"{load_seconds:.3f}", wrong])
    return 1 if any(r[4] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
