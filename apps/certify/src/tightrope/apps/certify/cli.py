"""``tightrope-certify``: certify networks after training.

    tightrope-certify --checkpoint runs/RUN/best.pt --samples 1000 --timeout 30
    tightrope-certify checkpoint --checkpoint runs/RUN/best.pt --shard 0/4   # + merge DIR
    tightrope-certify vnnlib --onnx net.onnx --spec prop.vnnlib --timeout 120 --out result.txt

Each task is a subcommand registered in :data:`SUBCOMMANDS` (``checkpoint``, ``merge``,
``vnnlib``). Heavy imports
(torch, the verifier) happen inside the subcommand, so ``--help`` answers at once and the
start-up cost of a run is mostly importing torch.

Exit status: 0 done (vnnlib: any of its four answers); 2 bad input, with a one-line message on
stderr naming the file or option and what to do (a bad option value such as ``--timeout nan``,
a missing, corrupt or foreign checkpoint or ONNX file, a model with NaN or inf weights, a bad
VNNLIB file, a results directory of another run); 1 merge found samples no shard has recorded
yet, or an internal error (vnnlib reports it in one line; nothing is answered). Bad input is
refused before anything is written; ``vnnlib --out FILE`` is removed first, so a run that fails
or is killed leaves no answer there.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from tightrope.apps.certify.__about__ import __version__
from tightrope.apps.certify.answer_file import clear_answer, write_answer
from tightrope.apps.certify.arguments import one_line, seconds
from tightrope.apps.certify.checkpoint_cli import add_checkpoint, add_merge

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: Seconds past --timeout before the hard deadline ends a run that the verifier overran.
_GRACE = 1.0

VNNLIB_EPILOG = """\
output:
  The answer is one word, as in VNN-COMP: unsat (the property holds: proved from sound
  bounds), sat (violated: the counterexample follows as ((X_0 v) ... (Y_0 v) ...)), timeout
  or unknown. It is written to --out and printed; with --out only the word is printed.
  Should the verifier overrun --timeout, a hard deadline 1 s later answers timeout.
  A counterexample from the verifier is re-checked first (inside the input box, and its
  forward pass in float64 and in the network's dtype violates the property); if the check
  fails the answer is unknown, never sat. A one-line summary (deciding stage, times) goes to
  stderr unless --quiet.

inputs:
  ONNX: a chain of Gemm, MatMul, Add, Sub, Mul, Div, Neg, Conv, Relu, Flatten, Reshape,
  Squeeze, Unsqueeze, Transpose, Constant, BatchNormalization, AveragePool,
  Identity, Dropout, Cast. VNNLIB: input boxes and disjunctions of linear output constraints;
  X_i is element i of the flattened network input.

exit status: 0 answered (any of the four words), 2 bad input: an unreadable or unsupported
file, a network with NaN or inf weights (the message names the file and the problem), or a
bad option value; 1 internal error. --out is removed when the run starts, so a run that fails
or is killed leaves no answer there (not even an earlier one).
"""


def _add_vnnlib(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "vnnlib",
        help="answer one VNN-COMP instance (ONNX network + VNNLIB property)",
        description="Verify a VNNLIB property of an ONNX network: prints unsat, sat (with a\n"
        "counterexample), timeout or unknown.",
        epilog=VNNLIB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--onnx", required=True, metavar="NET",
                        help="the network (.onnx or .onnx.gz)")
    parser.add_argument("--spec", required=True, metavar="PROP",
                        help="the property (.vnnlib or .vnnlib.gz)")
    parser.add_argument("--timeout", required=True, type=seconds, metavar="T",
                        help="seconds for the instance (> 0), start-up and loading included")
    parser.add_argument("--out", metavar="FILE", help="write the result file here")
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        help="dtype of the network the attacks and bound searches run on "
                        "(default: the network's own); proofs are always checked in float64")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no summary line on stderr")
    parser.set_defaults(run=_run_vnnlib)


class _Deadline:
    """A hard stop for one instance: at ``seconds`` after start-up, if no answer was written,
    write and print ``timeout`` and end the process (the verifier may overrun its budget on a
    loaded machine; VNN-COMP's harness would kill it anyway)."""

    def __init__(self, seconds: float, out: str | None) -> None:
        self.out = out
        self.lock = threading.Lock()
        # threading refuses waits past TIMEOUT_MAX (about 292 years) with an OverflowError
        self.timer = threading.Timer(min(max(seconds, 0.0), threading.TIMEOUT_MAX),
                                     self._expire)
        self.timer.daemon = True

    def start(self) -> None:
        self.timer.start()

    def _expire(self) -> None:
        if not self.lock.acquire(blocking=False):
            return  # the answer is being written
        if self.out is not None:
            try:
                write_answer(self.out, "timeout\n")
            except OSError as error:
                print(f"tightrope-certify vnnlib: cannot write {self.out}: {error}",
                      file=sys.stderr, flush=True)
        print("timeout", flush=True)
        print("# timeout: hard deadline reached", file=sys.stderr, flush=True)
        os._exit(0)

    def finish(self) -> None:
        """Stop the clock; blocks for good if the deadline fired (the process is ending)."""
        self.lock.acquire()
        self.timer.cancel()


def _run_vnnlib(args: argparse.Namespace) -> int:
    if args.out is not None:
        try:
            clear_answer(args.out)  # an earlier answer must not outlive a failed run
        except OSError as error:
            print(f"tightrope-certify vnnlib: error: cannot clear --out {args.out}: "
                  f"{error.strerror or error}; pass a writable file path", file=sys.stderr)
            return 2
    import torch

    from tightrope.apps.certify.vnnlib_command import run_vnnlib
    from tightrope.verify import OnnxImportError, VnnlibError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    deadline = _Deadline(args.timeout + _GRACE - (time.perf_counter() - args.started), args.out)
    deadline.start()
    try:
        outcome = run_vnnlib(args.onnx, args.spec, args.timeout, dtype=dtype,
                             started=args.started)
    except (OnnxImportError, VnnlibError, OSError) as error:
        deadline.finish()
        print(f"tightrope-certify vnnlib: error: {one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # an engine failure is an internal error, never an answer
        deadline.finish()
        print(f"tightrope-certify vnnlib: internal error: {type(error).__name__}: "
              f"{one_line(error)}", file=sys.stderr)
        return 1
    deadline.finish()
    if args.out is not None:
        try:
            write_answer(args.out, outcome.text)
        except OSError as error:
            print(f"tightrope-certify vnnlib: error: cannot write {args.out}: {error}",
                  file=sys.stderr)
            return 2
    print(outcome.word if args.out else outcome.text, end="" if not args.out else "\n")
    if not args.quiet:
        detail = f" ({outcome.note})" if outcome.note else ""
        stage = f" by {outcome.stage}" if outcome.stage else ""
        print(f"# {outcome.word}{stage}{detail}: load {outcome.load_seconds:.2f} s, verify "
              f"{outcome.verify_seconds:.2f} s, total {time.perf_counter() - args.started:.2f} s",
              file=sys.stderr)
    return 0


#: Subcommand name -> function adding its parser (which sets ``run``).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = {
    "checkpoint": add_checkpoint,
    "merge": add_merge,
    "vnnlib": _add_vnnlib,
}


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line that points at ``--help`` (its subparsers are of this class
    too), rather than argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(  # its subparsers are _Parser too
        prog="tightrope-certify",
        description="Certify l_inf robustness of trained networks. Subcommands: "
        + ", ".join(SUBCOMMANDS) + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tightrope-certify``; returns the exit status."""
    started = time.perf_counter()  # time budgets count from here (torch is imported later)
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0].startswith("--checkpoint"):
        arguments.insert(0, "checkpoint")  # the short form: tightrope-certify --checkpoint ...
    try:
        args = parser.parse_args(arguments)
    except SystemExit as stop:  # --help, --version, or a bad argument (its error printed)
        return stop.code if isinstance(stop.code, int) else 2
    args.started = started
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from tightrope.bounds import keep_freed_memory  # imports torch, which every command needs

    keep_freed_memory()
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
