"""``tightrope-certify checkpoint``: certify a ``tightrope-train`` checkpoint on its test set.

Samples are processed in chunks through :func:`tightrope.verify.certify` (each stage batched
over the chunk's undecided samples); every chunk's records are appended to the shard's JSON-lines
file before the next starts, so a killed run loses at most one chunk and a rerun with the same
arguments skips the samples already recorded. ``--shard i/n`` (or ``torchrun``'s ``RANK`` and
``WORLD_SIZE``) takes every n-th sample; ``tightrope-certify merge DIR`` joins the shards.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from tightrope.apps.certify.records import (
    SampleRecord,
    Summary,
    append_records,
    format_summary,
    merge_records,
    read_records,
    shard_file,
    summarise,
    write_csv,
)

__all__ = ["CheckpointJob", "merge_directory", "parse_shard", "run_checkpoint"]

RUN_FILE = "run.json"


def parse_shard(text: str | None, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``; without it, torchrun's ``RANK``/``WORLD_SIZE``
    (else ``(0, 1)``)."""
    environ = dict(os.environ) if environ is None else environ
    if text is None:
        if "WORLD_SIZE" in environ and "RANK" in environ:
            return int(environ["RANK"]), int(environ["WORLD_SIZE"])
        return 0, 1
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return index, count


@dataclass(frozen=True, slots=True)
class CheckpointJob:
    """What one ``tightrope-certify checkpoint`` process does.

    Attributes:
        checkpoint: path of a ``tightrope-train`` checkpoint (``best.pt``/``last.pt``).
        eps: l_inf radius (None: the checkpoint's test eps).
        samples: how many test samples, from ``start`` (None: to the end of the test split).
        start: index of the first test sample.
        timeout: seconds per sample.
        out: results directory (None: ``<checkpoint dir>/certify-eps<eps>``).
        shard, shards: this process takes samples ``start + shard, start + shard + shards, ...``.
        chunk: samples per batched call (and per append to the records file).
        data_root: where the data set lives (None: its default place).
        device: torch device.
        bab: run branch-and-bound on what the bounds and attacks leave open.
    """

    checkpoint: Path
    eps: float | None = None
    samples: int | None = None
    start: int = 0
    timeout: float = 30.0
    out: Path | None = None
    shard: int = 0
    shards: int = 1
    chunk: int = 100
    data_root: Path | None = None
    device: str = "cpu"
    bab: bool = True

    def __post_init__(self) -> None:
        if self.eps is not None and self.eps < 0:
            raise ValueError(f"--eps must be >= 0, got {self.eps}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.start < 0:
            raise ValueError(f"--start must be >= 0, got {self.start}")
        if not self.timeout > 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout}")
        if self.chunk < 1:
            raise ValueError(f"--chunk must be >= 1, got {self.chunk}")


ProgressLine = Callable[[str, bool], None]


def _progress_writer(stream: TextIO, quiet: bool) -> ProgressLine:
    """On a terminal one line rewritten in place; otherwise a line at most every 10 s."""
    last = [0.0]
    tty = stream.isatty()

    def write(text: str, final: bool) -> None:
        if quiet:
            return
        if tty:
            stream.write("\r" + text + ("\n" if final else ""))
            stream.flush()
        elif final or time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            stream.write(text + "\n")
            stream.flush()

    return write


def run_checkpoint(job: CheckpointJob, *, stream: TextIO = sys.stderr, quiet: bool = False
                   ) -> tuple[Path, Summary | None]:
    """Certify the job's samples; returns the results directory and, for an unsharded run, the
    summary (sharded runs are summarised by :func:`merge_directory`)."""
    import torch

    from tightrope.train import load_checkpoint, load_test_split
    from tightrope.verify import VerifierConfig, certify

    loaded = load_checkpoint(job.checkpoint, map_location=job.device)
    model = loaded.model.eval()
    dtype = next(model.parameters()).dtype
    eps = loaded.test_eps if job.eps is None else job.eps
    x_all, y_all = load_test_split(loaded.dataset, job.data_root, dtype=dtype)
    if tuple(x_all.shape[1:]) != tuple(loaded.input_shape):
        raise ValueError(
            f"{loaded.dataset}'s test images have shape {tuple(x_all.shape[1:])} but the "
            f"checkpoint's model expects {tuple(loaded.input_shape)}"
        )
    end = x_all.shape[0] if job.samples is None else min(x_all.shape[0], job.start + job.samples)
    if job.start >= end:
        raise ValueError(f"--start {job.start} is past the {x_all.shape[0]} test samples")
    mine = list(range(job.start + job.shard, end, job.shards))
    out = job.out or job.checkpoint.resolve().parent / f"certify-eps{eps:g}"
    out.mkdir(parents=True, exist_ok=True)
    _write_run_file(out, job, eps, end, loaded.dataset)
    records_path = shard_file(out, job.shard, job.shards)
    done = {r.index for r in read_records(records_path) if r.eps == eps}
    todo = [i for i in mine if i not in done]
    config = VerifierConfig() if job.bab else VerifierConfig(bab=None)
    write = _progress_writer(stream, quiet)
    counts = {"verified": 0, "falsified": 0, "open": 0}
    started = time.monotonic()
    for begin in range(0, len(todo), job.chunk):
        chunk = todo[begin : begin + job.chunk]
        index = torch.tensor(chunk)
        x = x_all[index].to(job.device)
        y = y_all[index].to(job.device)
        processed = len(done) + begin

        def progress(stage: object, decided: int, total: int, processed: int = processed) -> None:
            name = getattr(stage, "value", str(stage))
            write(f"[{processed + decided}/{len(mine)}] verified {counts['verified']} "
                  f"falsified {counts['falsified']} open {counts['open']}  stage {name} "
                  f"({decided}/{total} of this chunk decided)  "
                  f"{time.monotonic() - started:.0f} s", False)

        with torch.no_grad():
            predictions = model(x).argmax(dim=1).tolist()
        result = certify(model, x, y, eps, timeout_per_sample=job.timeout, config=config,
                         progress=progress)
        records = []
        for position, verdict in enumerate(result.verdicts):
            status = verdict.status.value
            counts[status if status in counts else "open"] += 1
            records.append(SampleRecord(
                index=chunk[position], label=int(y[position]), prediction=predictions[position],
                status=status, stage=verdict.stage.value, seconds=verdict.seconds, eps=eps,
            ))
        append_records(records_path, records)
    write(f"[{len(mine)}/{len(mine)}] verified {counts['verified']} falsified "
          f"{counts['falsified']} open {counts['open']} (this run); "
          f"{time.monotonic() - started:.0f} s", True)
    if job.shards > 1:
        return out, None
    return out, _finish(out, [records_path], eps)


def _write_run_file(out: Path, job: CheckpointJob, eps: float, end: int, dataset: str) -> None:
    description = {
        "checkpoint": str(job.checkpoint.resolve()),
        "dataset": dataset,
        "eps": eps,
        "start": job.start,
        "end": end,
        "shards": job.shards,
        "timeout_per_sample": job.timeout,
        "bab": job.bab,
    }
    path = out / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != description:
            changed = sorted(k for k in description if previous.get(k) != description[k])
            raise ValueError(
                f"{out} holds results of a different run (differs in: {', '.join(changed)}); "
                "pass another --out or remove the directory"
            )
    else:
        path.write_text(json.dumps(description, indent=2) + "\n")


def _finish(out: Path, paths: Sequence[Path], eps: float) -> Summary:
    records = [r for r in merge_records(paths) if r.eps == eps]
    write_csv(out / "samples.csv", records)
    summary = summarise(records)
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    (out / "summary.txt").write_text(format_summary(summary, eps) + "\n")
    return summary


def merge_directory(out: Path) -> tuple[Summary, int]:
    """Join the shard files of ``out`` into ``samples.csv``/``summary.*``; returns the summary
    and the number of samples of the run that no shard has recorded yet."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise ValueError(f"{out} is not a tightrope-certify results directory (no {RUN_FILE})")
    description = json.loads(run_file.read_text())
    paths = sorted(out.glob("samples.shard-*.jsonl"))
    if not paths:
        raise ValueError(f"{out} holds no shard results (samples.shard-*.jsonl)")
    summary = _finish(out, paths, float(description["eps"]))
    expected = int(description["end"]) - int(description["start"])
    return summary, expected - summary.samples
