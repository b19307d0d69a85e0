"""Argument parsing of ``tightrope-certify checkpoint`` and ``tightrope-certify merge``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tightrope.apps.certify.arguments import one_line, radius, seconds

__all__ = ["add_checkpoint", "add_merge"]

CHECKPOINT_EPILOG = """\
stages (each batched over the chunk's undecided samples, first decisive answer wins):
  clean prediction (wrong -> falsified) -> PGD -> IBP -> CROWN -> alpha-CROWN -> APGD with
  restarts -> branch-and-bound (beta-CROWN) per sample with what is left of --timeout.
  verified comes only from sound bounds (float32 bounds must clear a 1e-5 margin);
  falsified only with an input inside the eps box whose float64 forward pass misclassifies.

output (in --out, default <checkpoint dir>/certify-eps<eps>):
  samples.shard-III-of-NNN.jsonl  one record per sample, appended per chunk (resumable)
  samples.csv, summary.json, summary.txt  written at the end of an unsharded run or by merge
  run.json  the run's settings; a rerun with other settings into the same --out is refused

resuming and sharding:
  Rerun the same command after a crash: recorded samples are skipped. With --shard i/n a
  process takes every n-th sample; then run `tightrope-certify merge DIR` for the summary.
  Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) each process is a shard,
  --device cuda means cuda:LOCAL_RANK, and when every shard is done rank 0 merges them and
  prints the summary (the processes meet through a gloo process group).

bad input (exit status 2, one line on stderr, nothing written): a bad option value (--eps
and --timeout must be finite, --timeout > 0), a checkpoint that is missing, empty, cut short,
corrupt, foreign or holds pickled objects (never loaded: they could run code), or whose model
has NaN or inf weights. A record cut short by a killed run is dropped when the run resumes (a
note on stderr) and that sample redone; merge skips such a line with a note.

The short form `tightrope-certify --checkpoint RUN/best.pt ...` means the same.
"""


def add_checkpoint(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "checkpoint",
        help="certify a tightrope-train checkpoint on its test set",
        description="Certify l_inf robustness of a tightrope-train checkpoint on its data "
        "set's test split: per-sample records, a summary table (clean, adversarial and "
        "certified accuracy, counts per deciding stage, time).",
        epilog=CHECKPOINT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="RUN/best.pt",
                        help="checkpoint written by tightrope-train")
    parser.add_argument("--eps", type=radius, help="l_inf radius in pixel units, >= 0 "
                        "(default: the checkpoint's test eps)")
    parser.add_argument("--samples", type=int, metavar="N",
                        help="certify N test samples from --start (default: all)")
    parser.add_argument("--start", type=int, default=0, metavar="I",
                        help="index of the first test sample (default 0)")
    parser.add_argument("--timeout", type=seconds, default=30.0, metavar="S",
                        help="seconds per sample (> 0), batched stages included (default 30)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="results directory")
    parser.add_argument("--shard", metavar="i/n", help="take every n-th sample from the i-th "
                        "(0-based); default: torchrun's RANK/WORLD_SIZE, else 0/1")
    parser.add_argument("--chunk", type=int, default=100, metavar="N",
                        help="samples per batched call and per write to disk (default 100)")
    parser.add_argument("--data-root", type=Path, metavar="DIR",
                        help="where the data set lives (default: its standard place)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; "
                        "cuda under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    parser.add_argument("--no-bab", action="store_true",
                        help="stop after the bounds and attacks (no branch-and-bound)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the ReLU step of CROWN-style bounds with torch.compile "
                             "(tightrope.bounds.compile_kernels): seconds of compilation per "
                             "kernel variant at start, faster bounds after; for long runs")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(run=_run_checkpoint)


def _run_checkpoint(args: argparse.Namespace) -> int:
    from tightrope.apps.certify.checkpoint_command import CheckpointJob, parse_shard
    from tightrope.apps.certify.records import format_summary

    torchrun = args.shard is None and "WORLD_SIZE" in os.environ and "RANK" in os.environ
    device = args.device
    if torchrun and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        shard, shards = parse_shard(args.shard)
        job = CheckpointJob(
            checkpoint=args.checkpoint, eps=args.eps, samples=args.samples, start=args.start,
            timeout=args.timeout, out=args.out, shard=shard, shards=shards, chunk=args.chunk,
            data_root=args.data_root, device=device, bab=not args.no_bab,
        )
    except ValueError as error:
        print(f"tightrope-certify checkpoint: error: {one_line(error)}", file=sys.stderr)
        return 2
    import torch

    from tightrope.apps.certify.checkpoint_command import run_checkpoint
    from tightrope.bounds import compile_kernels

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.compile:
        compile_kernels()
    try:
        out, summary = run_checkpoint(job, quiet=args.quiet)
    except (OSError, ValueError) as error:  # bad checkpoints (see CHECKPOINT_EPILOG), data sets
        print(f"tightrope-certify checkpoint: error: {one_line(error)}", file=sys.stderr)
        return 2
    if summary is None and torchrun and shards > 1:
        return _merge_when_all_done(out, shard)
    if summary is None:
        print(f"shard {shard}/{shards} done; results in {out}. When every shard is done: "
              f"tightrope-certify merge {out}")
    else:
        print(format_summary(summary, summary_eps(out)))
        print(f"results: {out}")
    return 0


def _merge_when_all_done(out: Path, rank: int) -> int:
    """Under torchrun: wait for every shard (a gloo barrier), then rank 0 merges and prints the
    summary; the exit status is ``merge``'s on rank 0, 0 elsewhere."""
    from datetime import timedelta

    import torch.distributed as dist

    # Shards may finish hours apart: wait up to a day for the slowest.
    dist.init_process_group("gloo", timeout=timedelta(hours=24))
    try:
        dist.barrier()
        if rank != 0:
            return 0
        status = _merge_and_print(out, "checkpoint")
        if status != 2:
            print(f"results: {out}")
        return status
    finally:
        dist.destroy_process_group()


def summary_eps(out: Path) -> float:
    import json

    return float(json.loads((out / "run.json").read_text())["eps"])


def add_merge(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="join the shards of a sharded checkpoint certification",
        description="Join samples.shard-*.jsonl of a results directory into samples.csv and "
        "summary.{json,txt}, and print the summary. A last line cut short by a crash is "
        "skipped with a note. Exit status 0, 1 when samples of the run have no record yet, 2 "
        "when DIR is not a results directory or holds a malformed record.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="the results directory")
    parser.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    return _merge_and_print(args.directory, "merge")


def _merge_and_print(out: Path, command: str) -> int:
    """Join the shards of ``out`` and print the summary; exit status 0, 1 when samples of the
    run have no record yet, 2 (with a one-line error) when ``out`` cannot be merged."""
    from tightrope.apps.certify.checkpoint_command import merge_directory
    from tightrope.apps.certify.records import format_summary

    try:
        summary, missing = merge_directory(out)
    except (OSError, ValueError) as error:
        print(f"tightrope-certify {command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(format_summary(summary, summary_eps(out)))
    if missing:
        print(f"warning: {missing} samples of the run have no record yet (a shard is "
              "unfinished)", file=sys.stderr)
        return 1
    return 0
