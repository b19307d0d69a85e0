"""``tightrope-certify checkpoint``: certify a ``tightrope-train`` checkpoint on its test set.

Samples are processed in chunks through :func:`tightrope.verify.certify` (each stage batched
over the chunk's undecided samples); every chunk's records are appended to the shard's JSON-lines
file before the next starts, so a killed run loses at most one chunk and a rerun with the same
arguments skips the samples already recorded. ``--shard i/n`` (or ``torchrun``'s ``RANK`` and
``WORLD_SIZE``) takes every n-th sample; ``tightrope-certify merge DIR`` joins the shards. A
record cut short by a kill is dropped (with a note) when the run resumes, and that sample redone.

Bad input raises ``ValueError`` (or ``OSError``) before anything is written: a file that is not a
loadable ``tightrope-train`` checkpoint (missing, empty, cut short, corrupt, holding pickled
objects, missing entries, weights that do not fit its model) or a model with NaN or inf weights.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tightrope.apps.certify.records import (
    SampleRecord,
    Summary,
    append_records,
    cut_line,
    drop_cut_line,
    format_summary,
    merge_records,
    read_records,
    shard_file,
    summarise,
    write_csv,
)

if TYPE_CHECKING:
    from tightrope.train import Checkpoint

__all__ = ["CheckpointJob", "load_certifiable", "merge_directory", "parse_shard",
           "run_checkpoint"]

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
        if self.eps is not None and not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"--eps must be a finite number >= 0, got {self.eps}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.start < 0:
            raise ValueError(f"--start must be >= 0, got {self.start}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"--timeout must be a finite number of seconds > 0, got "
                             f"{self.timeout}")
        if self.chunk < 1:
            raise ValueError(f"--chunk must be >= 1, got {self.chunk}")


#: What to do about a checkpoint that cannot be used.
_ADVICE = "pass the best.pt or last.pt of a tightrope-train run"


def _load_problem(error: Exception) -> str:
    """Why ``torch.load``/``load_checkpoint`` failed, in one line (never torch's advice to load
    with ``weights_only=False``, which would run whatever code the file holds)."""
    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        return ("torch.load(weights_only=True) refuses it: it is corrupt or holds pickled "
                "objects other than tensors and plain values, which are never loaded (they "
                "could run code)")
    if isinstance(error, (EOFError, OSError)) or "PytorchStreamReader" in text:
        return "it is empty, cut short or corrupt"
    if isinstance(error, KeyError):
        return f"the entry {text} is missing"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_certifiable(path: Path, device: str) -> Checkpoint:
    """:func:`tightrope.train.load_checkpoint`, with every way the file can fail to give a
    certifiable model raised as one ``ValueError`` that names the file and says what to do.

    Raises:
        ValueError: no such file, not a loadable checkpoint, or a model with NaN or inf
            parameters or buffers (no bound over it means anything).
    """
    from tightrope.train import load_checkpoint

    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file; {_ADVICE}")
    try:
        loaded = load_checkpoint(path, map_location=device)
    except ValueError as error:  # load_checkpoint's own message names the file
        text = " ".join(str(error).split())
        if "weights_only" in text:
            text = (f"{path}: not a usable tightrope-train checkpoint: {_load_problem(error)}; "
                    f"{_ADVICE}")
        raise ValueError(text) from error
    except Exception as error:  # torch.load and the model rebuild fail in many ways
        if isinstance(error, OSError) and error.filename is not None:
            raise  # unreadable (permissions): the message names the file
        raise ValueError(f"{path}: not a usable tightrope-train checkpoint: "
                         f"{_load_problem(error)}; {_ADVICE}") from error
    tensors = [*loaded.model.named_parameters(), *loaded.model.named_buffers()]
    bad = [name for name, tensor in tensors
           if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if bad:
        raise ValueError(f"{path}: the model has non-finite values (NaN or inf) in "
                         f"{', '.join(bad)}; it cannot be certified: take an earlier checkpoint "
                         "of the run, or retrain")
    return loaded


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


def run_checkpoint(job: CheckpointJob, *, stream: TextIO | None = None, quiet: bool = False
                   ) -> tuple[Path, Summary | None]:
    """Certify the job's samples; returns the results directory and, for an unsharded run, the
    summary (sharded runs are summarised by :func:`merge_directory`). Progress and notes go to
    ``stream`` (standard error by default)."""
    import torch

    stream = sys.stderr if stream is None else stream

    from tightrope.train import load_test_split
    from tightrope.verify import VerifierConfig, certify

    loaded = load_certifiable(job.checkpoint, job.device)
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
    dropped = drop_cut_line(records_path)
    if dropped is not None:
        stream.write(f"note: {records_path}: dropped its last line, cut short when an earlier "
                     f"run was killed ({_clip(dropped)}); that sample will be redone\n")
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
            elapsed = time.monotonic() - started
            write(f"[{processed + decided}/{len(mine)}] verified {counts['verified']} "
                  f"falsified {counts['falsified']} open {counts['open']}  stage {name} "
                  f"({decided}/{total} of this chunk decided)  {elapsed:.0f} s, "
                  f"ETA {_eta(elapsed, processed - len(done), len(todo))}", False)

        with torch.no_grad():
            predictions = model(x).argmax(dim=1).tolist()
        result = certify(model, x, y, eps, timeout_per_sample=job.timeout, config=config,
                         progress=progress)
        records = []
        for position, verdict in enumerate(result.verdicts):
            status = verdict.status.value
            counts[status if status in counts else "open"] += 1
            spent = result.stage_seconds[position] if result.stage_seconds else {}
            records.append(SampleRecord(
                index=chunk[position], label=int(y[position]), prediction=predictions[position],
                status=status, stage=verdict.stage.value, seconds=verdict.seconds, eps=eps,
                stage_seconds={stage.value: seconds for stage, seconds in spent.items()},
            ))
        append_records(records_path, records)
    write(f"[{len(mine)}/{len(mine)}] verified {counts['verified']} falsified "
          f"{counts['falsified']} open {counts['open']} (this run); "
          f"{time.monotonic() - started:.0f} s", True)
    if job.shards > 1:
        return out, None
    return out, _finish(out, [records_path], eps)


def _eta(elapsed: float, finished: int, todo: int) -> str:
    """Time left for ``todo`` samples at the pace of the ``finished`` ones (whole chunks), as
    ``h:mm:ss``; ``?`` before the first chunk has finished."""
    if finished <= 0:
        return "?"
    left = int(elapsed / finished * max(0, todo - finished))
    return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


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


def _clip(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def merge_directory(out: Path, *, stream: TextIO | None = None) -> tuple[Summary, int]:
    """Join the shard files of ``out`` into ``samples.csv``/``summary.*``; returns the summary
    and the number of samples of the run that no shard has recorded yet. A shard file's last
    line cut short by a crash is skipped, with a note on ``stream`` (standard error by
    default)."""
    stream = sys.stderr if stream is None else stream
    run_file = out / RUN_FILE
    if not run_file.exists():
        raise ValueError(f"{out} is not a tightrope-certify results directory (no {RUN_FILE})")
    description = json.loads(run_file.read_text())
    paths = sorted(out.glob("samples.shard-*.jsonl"))
    if not paths:
        raise ValueError(f"{out} holds no shard results (samples.shard-*.jsonl)")
    for path in paths:
        cut = cut_line(path)
        if cut is not None:
            stream.write(f"note: {path}: skipped its last line, cut short by a crash "
                         f"({_clip(cut)}); rerun that shard to redo the sample\n")
    summary = _finish(out, paths, float(description["eps"]))
    expected = int(description["end"]) - int(description["start"])
    return summary, expected - summary.samples
