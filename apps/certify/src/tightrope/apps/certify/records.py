"""Per-sample results of ``tightrope-certify checkpoint``: the JSON-lines files each shard
appends to (so a crashed run resumes where it stopped), merging, CSV and the summary table.

A process killed while appending can leave the last line of a file cut short. Readers skip
such a line (:func:`read_records`, :func:`cut_line` says whether there is one) and a resumed
run removes it with :func:`drop_cut_line` before it appends, so the sample is redone and the
next record starts on a line of its own.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = [
    "SampleRecord",
    "Summary",
    "append_records",
    "cut_line",
    "drop_cut_line",
    "format_summary",
    "merge_records",
    "read_records",
    "shard_file",
    "summarise",
    "write_csv",
]

STATUSES = ("verified", "falsified", "unknown", "timeout")
#: The stages whose time a record keeps (``bab``: the per-sample search, MILP included).
TIMED_STAGES = ("clean", "attack", "ibp", "crown", "alpha_crown", "strong_attack", "bab")


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """The answer for one test sample.

    Attributes:
        index: position in the data set's test split.
        label: its class.
        prediction: the model's clean prediction.
        status: ``verified``, ``falsified``, ``unknown`` or ``timeout``.
        stage: the cascade stage that decided (``clean``, ``attack``, ``ibp``, ``crown``,
            ``alpha_crown``, ``strong_attack``, ``bab``, ``milp``; ``none`` when undecided).
        seconds: verification wall time of the sample (its share of batched stages).
        eps: the l_inf radius certified.
        stage_seconds: ``seconds`` split by stage (names of :data:`TIMED_STAGES`); empty in
            records written before it was kept.
    """

    index: int
    label: int
    prediction: int
    status: str
    stage: str
    seconds: float
    eps: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if not isinstance(self.stage_seconds, dict) or not all(
            name in TIMED_STAGES and isinstance(value, (int, float)) and not isinstance(value, bool)
            for name, value in self.stage_seconds.items()
        ):
            raise ValueError(f"stage_seconds must map stages of {TIMED_STAGES} to seconds, got "
                             f"{self.stage_seconds!r}")


def shard_file(directory: Path, shard: int, shards: int) -> Path:
    """The JSON-lines file of shard ``shard`` (0-based) of ``shards``."""
    return directory / f"samples.shard-{shard:03d}-of-{shards:03d}.jsonl"


def append_records(path: Path, records: Iterable[SampleRecord]) -> None:
    """Append ``records`` to ``path``, one JSON object per line, flushed to disk at once.

    The file must end with a whole line (call :func:`drop_cut_line` first on a file a killed
    process may have written)."""
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(asdict(record), sort_keys=True) + "\n")
        handle.flush()


def read_records(path: Path) -> list[SampleRecord]:
    """The records of a JSON-lines file; a last line cut short by a crash (see :func:`cut_line`)
    is skipped, any other malformed line raises ``ValueError`` naming the file and line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = _cut_offset(data)
    records: list[SampleRecord] = []
    for number, line in enumerate(data[:cut].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(SampleRecord(**json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: not a sample record ({error}); remove the "
                             "line to redo that sample") from error
    return records


def _is_record(line: bytes) -> bool:
    try:
        SampleRecord(**json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
        return False
    return True


def _cut_offset(data: bytes) -> int | None:
    """Where the last line of ``data`` starts if it was cut short, else ``None``."""
    if not data:
        return None
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    last = data[start:]
    if last.endswith(b"\n") and (not last.strip() or _is_record(last)):
        return None
    return start


def cut_line(path: Path) -> str | None:
    """The last line of ``path`` if a crash cut it short (it has no line end, or is not a
    sample record); ``None`` when the file is whole, empty or absent."""
    if not path.exists():
        return None
    data = path.read_bytes()
    cut = _cut_offset(data)
    return None if cut is None else data[cut:].decode("utf-8", errors="replace").rstrip("\n")


def drop_cut_line(path: Path) -> str | None:
    """Truncate ``path`` to the end of its last whole line if :func:`cut_line` finds a cut one
    (so the next append starts a line of its own); returns the dropped text, else ``None``."""
    if not path.exists():
        return None
    data = path.read_bytes()
    cut = _cut_offset(data)
    if cut is None:
        return None
    with path.open("r+b") as handle:
        handle.truncate(cut)
    return data[cut:].decode("utf-8", errors="replace").rstrip("\n")


def merge_records(paths: Sequence[Path]) -> list[SampleRecord]:
    """All records of ``paths``, one per sample index (the last one written wins), by index."""
    by_index: dict[int, SampleRecord] = {}
    for path in paths:
        for record in read_records(path):
            by_index[record.index] = record
    return [by_index[index] for index in sorted(by_index)]


def write_csv(path: Path, records: Sequence[SampleRecord]) -> None:
    """``records`` as a CSV file with a header; the time by stage in columns
    ``seconds_<stage>`` (empty where a record has none)."""
    fields = [name for name in SampleRecord.__dataclass_fields__ if name != "stage_seconds"]
    timed = [f"seconds_{stage}" for stage in TIMED_STAGES]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields + timed)
        writer.writeheader()
        for record in records:
            row: dict[str, object] = {name: getattr(record, name) for name in fields}
            row.update({f"seconds_{stage}": record.stage_seconds.get(stage, "")
                        for stage in TIMED_STAGES})
            writer.writerow(row)


@dataclass(frozen=True, slots=True)
class Summary:
    """Accuracies (fractions of ``samples``) and times of a certification run."""

    samples: int
    clean_accuracy: float
    adversarial_accuracy: float
    certified_accuracy: float
    counts: dict[str, int]
    stages: dict[str, int]
    total_seconds: float
    mean_seconds: float
    median_seconds: float
    max_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


def summarise(records: Sequence[SampleRecord]) -> Summary:
    """Clean accuracy (clean prediction right), adversarial accuracy (not falsified: an upper
    bound on robust accuracy), certified accuracy (verified: a lower bound) and time."""
    n = len(records)
    if n == 0:
        raise ValueError("no sample records to summarise")
    counts = Counter(record.status for record in records)
    stages = Counter(record.stage for record in records)
    times = [record.seconds for record in records]
    return Summary(
        samples=n,
        clean_accuracy=sum(r.prediction == r.label for r in records) / n,
        adversarial_accuracy=(n - counts["falsified"]) / n,
        certified_accuracy=counts["verified"] / n,
        counts={status: counts[status] for status in STATUSES},
        stages=dict(sorted(stages.items())),
        total_seconds=sum(times),
        mean_seconds=sum(times) / n,
        median_seconds=statistics.median(times),
        max_seconds=max(times),
        stage_seconds={stage: sum(r.stage_seconds.get(stage, 0.0) for r in records)
                       for stage in TIMED_STAGES if any(stage in r.stage_seconds for r in records)},
    )


def format_summary(summary: Summary, eps: float) -> str:
    """The summary as a small plain-text table."""
    rows = [
        ("samples", f"{summary.samples}"),
        ("eps", f"{eps:g}"),
        ("clean accuracy", f"{100 * summary.clean_accuracy:.2f} %"),
        ("adversarial accuracy", f"{100 * summary.adversarial_accuracy:.2f} %  (not falsified)"),
        ("certified accuracy", f"{100 * summary.certified_accuracy:.2f} %  (verified)"),
    ]
    rows += [(f"  {status}", str(count)) for status, count in summary.counts.items()]
    rows += [(f"  decided by {stage}" if stage != "none" else "  undecided", str(count))
             for stage, count in summary.stages.items()]
    rows += [
        ("time, total", f"{summary.total_seconds:.1f} s"),
        *[(f"  in {stage}", f"{seconds:.1f} s")
          for stage, seconds in summary.stage_seconds.items()],
        ("time per sample", f"mean {summary.mean_seconds:.3f} s, median "
         f"{summary.median_seconds:.3f} s, max {summary.max_seconds:.3f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
