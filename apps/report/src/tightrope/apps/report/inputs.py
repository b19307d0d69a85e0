"""Reading what ``tightrope-train`` and ``tightrope-certify`` wrote.

A run directory (``tightrope.train.rundir``) holds ``config.yaml``, ``meta.json``,
``metrics.csv`` (one row per epoch), ``test_metrics.json`` (``best.pt`` on the test split, unless
``--no-test``) and the checkpoints. A certification directory (``tightrope-certify --checkpoint
... --out DIR``) holds ``run.json`` (its settings), ``summary.json`` and the per-sample
``samples.shard-*.jsonl`` files; it usually lies inside its run directory (``certify/``,
``certify-eps<eps>/``) but may be given on its own, and is then matched to its run by the
checkpoint path that ``run.json`` records.

Anything unreadable raises :class:`ReportError` with a one-line message naming the file.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightrope.apps.certify.records import Summary, merge_records, summarise

__all__ = ["Certification", "Published", "ReportError", "Run", "collect", "load_certification",
           "load_run", "lookup", "read_json", "read_published", "read_text"]

CERTIFY_FILE = "run.json"
METRICS_FILE = "metrics.csv"


class ReportError(ValueError):
    """Bad input; the message is one line that names the file and what to do."""


@dataclass(frozen=True, slots=True)
class Certification:
    """One ``tightrope-certify checkpoint`` results directory.

    Attributes:
        path: the directory.
        checkpoint: the checkpoint it certified, as ``run.json`` records it (absolute).
        eps: the l_inf radius certified.
        start, end: the test samples ``start <= i < end`` the run covers.
        shards: how many processes shared it.
        timeout: seconds per sample.
        bab: whether branch-and-bound ran.
        summary: the accuracies, counts and times (``summary.json``, or computed from the shard
            files when the run has not been merged yet).
        from_records: ``summary`` was computed from the shard files.
    """

    path: Path
    checkpoint: Path
    eps: float
    start: int
    end: int
    shards: int
    timeout: float
    bab: bool
    summary: Summary
    from_records: bool

    @property
    def complete(self) -> bool:
        return self.summary.samples >= self.end - self.start


@dataclass(frozen=True, slots=True)
class Run:
    """One ``tightrope-train`` run directory and the certifications found for it.

    Attributes:
        path: the directory, as given.
        config: ``config.yaml`` (the resolved config).
        meta: ``meta.json`` (empty when absent).
        epochs: ``metrics.csv``, one mapping per epoch (empty cells are NaN).
        test: ``test_metrics.json``, or ``None`` (a run trained with ``--no-test``).
        certifications: sorted by directory.
    """

    path: Path
    config: Mapping[str, Any]
    meta: Mapping[str, Any]
    epochs: tuple[Mapping[str, float], ...]
    test: Mapping[str, Any] | None
    certifications: tuple[Certification, ...]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def dataset(self) -> str:
        return str(lookup(self.config, "data.dataset"))

    @property
    def method(self) -> str:
        return str(lookup(self.config, "loss.method"))

    @property
    def model(self) -> str:
        return str(lookup(self.config, "model.name"))

    @property
    def test_eps(self) -> float:
        """``eps.test``, or ``eps.train`` when the config leaves it unset (as training does)."""
        test = lookup(self.config, "eps.test", None)
        return float(lookup(self.config, "eps.train") if test is None else test)


_MISSING = object()


def lookup(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """The value of a dotted ``key`` (``loss.options.alpha``) in ``config``. A key under
    ``loss.options`` that the run left at its default is read from ``loss.resolved`` (the
    loss's full config that ``tightrope-train`` writes)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            prefix = "loss.options."
            if key.startswith(prefix):
                return lookup(config, "loss.resolved." + key[len(prefix):], default)
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def read_json(path: Path, expected: str = "a JSON object") -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`ReportError` naming the file when it cannot be
    read, is no JSON or is not an object (``expected`` says what was expected)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected {expected}, got {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class Published:
    """One published result (a ``--published`` row): accuracies in %, for context."""

    dataset: str
    eps: float
    method: str
    model: str
    clean: float
    certified: float
    source: str


PUBLISHED_COLUMNS = ("dataset", "eps", "method", "model", "clean", "certified", "source")


def read_text(path: Path) -> str:
    """The text of ``path`` (UTF-8); a :class:`ReportError` naming it when unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise ReportError(f"{path}: not UTF-8 text ({error})") from error


def _eps_value(text: str) -> float:
    """``0.1`` or ``2/255``."""
    numerator, _, denominator = text.partition("/")
    value = float(numerator) / float(denominator) if denominator else float(numerator)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def read_published(path: Path) -> list[Published]:
    """The rows of a ``--published`` CSV file (columns :data:`PUBLISHED_COLUMNS`; ``eps`` as
    ``0.1`` or ``2/255``, accuracies in %)."""
    rows = list(csv.DictReader(read_text(path).splitlines()))
    found: list[Published] = []
    for number, row in enumerate(rows, start=2):
        missing = [c for c in PUBLISHED_COLUMNS if not (row.get(c) or "").strip()]
        if missing:
            raise ReportError(f"{path}:{number}: missing {', '.join(missing)} (columns: "
                              f"{', '.join(PUBLISHED_COLUMNS)})")
        try:
            eps = _eps_value(row["eps"].strip())
            clean, certified = float(row["clean"]), float(row["certified"])
        except ValueError:
            raise ReportError(f"{path}:{number}: eps, clean and certified must be numbers "
                              "(eps also as 2/255)") from None
        if not (0 <= certified <= 100 and 0 <= clean <= 100):
            raise ReportError(f"{path}:{number}: accuracies are percentages in [0, 100]")
        found.append(Published(row["dataset"].strip(), eps, row["method"].strip(),
                               row["model"].strip(), clean, certified, row["source"].strip()))
    if not found:
        raise ReportError(f"{path}: no rows (columns: {', '.join(PUBLISHED_COLUMNS)})")
    return found


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from error
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        text = " ".join(str(error).split())
        raise ReportError(f"{path}: not valid YAML ({text})") from error
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected the YAML mapping tightrope-train writes")
    for key in ("data.dataset", "loss.method", "model.name", "eps.train"):
        try:
            lookup(data, key)
        except KeyError:
            raise ReportError(f"{path}: no {key}; not a config.yaml written by "
                              "tightrope-train") from None
    return data


def _number(text: str | None, path: Path, line: int, column: str) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ReportError(f"{path}:{line}: column {column} holds {text!r}, not a number"
                          ) from None


def _read_metrics(path: Path) -> tuple[dict[str, float], ...]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "epoch" not in reader.fieldnames:
                raise ReportError(f"{path}: no epoch column; not a metrics.csv written by "
                                  "tightrope-train")
            rows = tuple(
                {column: _number(value, path, number, column)
                 for column, value in row.items() if column is not None}
                for number, row in enumerate(reader, start=2)
            )
    except OSError as error:
        raise ReportError(f"{path}: cannot read it ({error.strerror or error})") from error
    except (UnicodeDecodeError, csv.Error) as error:
        raise ReportError(f"{path}: not a CSV file ({error})") from error
    if not rows:
        raise ReportError(f"{path}: no epoch recorded yet (the run has not finished an epoch)")
    return rows


def _summary(data: dict[str, Any], path: Path) -> Summary:
    try:
        summary = Summary(**data)
    except TypeError:
        raise ReportError(f"{path}: not a tightrope-certify summary (its entries are "
                          f"{', '.join(sorted(data))})") from None
    numbers = [getattr(summary, name) for name in Summary.__dataclass_fields__
               if name not in ("counts", "stages", "stage_seconds")]
    tables = [summary.counts, summary.stages]
    times = summary.stage_seconds
    if not (all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers)
            and all(isinstance(t, dict) and all(isinstance(v, int) for v in t.values())
                    for t in tables)
            and isinstance(times, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                    for v in times.values())):
        raise ReportError(f"{path}: not a tightrope-certify summary (an entry has the wrong "
                          "type)")
    return summary


def load_certification(path: Path) -> Certification:
    """Read a ``tightrope-certify checkpoint`` results directory."""
    settings = read_json(path / CERTIFY_FILE)
    try:
        checkpoint = Path(str(settings["checkpoint"]))
        eps = float(settings["eps"])
        start, end = int(settings["start"]), int(settings["end"])
        shards = int(settings["shards"])
        timeout = float(settings["timeout_per_sample"])
        bab = bool(settings["bab"])
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{path / CERTIFY_FILE}: missing or bad entry {error}; not written by "
                          "tightrope-certify") from None
    summary_path = path / "summary.json"
    if summary_path.is_file():
        data = read_json(summary_path)
        summary = _summary(data, summary_path)
        from_records = False
    else:
        shards_found = sorted(path.glob("samples.shard-*.jsonl"))
        try:
            records = [r for r in merge_records(shards_found) if r.eps == eps]
        except OSError as error:
            raise ReportError(f"{path}: cannot read its sample records "
                              f"({error.strerror or error})") from error
        except ValueError as error:  # a malformed record line; the message names it
            raise ReportError(str(error)) from error
        if not records:
            raise ReportError(f"{path}: no summary.json and no sample records yet")
        summary = summarise(records)
        from_records = True
    return Certification(path=path, checkpoint=checkpoint, eps=eps, start=start, end=end,
                         shards=shards, timeout=timeout, bab=bab, summary=summary,
                         from_records=from_records)


def load_run(path: Path, extra: Sequence[Certification] = ()) -> Run:
    """Read a ``tightrope-train`` run directory, with the certification directories inside it
    (those holding ``run.json``) and ``extra`` ones given on their own."""
    if not (path / METRICS_FILE).is_file():
        raise ReportError(f"{path}: no {METRICS_FILE}; not a tightrope-train run directory, or "
                          "one that has not finished an epoch")
    config = _read_config(path / "config.yaml")
    meta_path = path / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    test_path = path / "test_metrics.json"
    test = read_json(test_path) if test_path.is_file() else None
    inside = [load_certification(child) for child in sorted(path.iterdir())
              if child.is_dir() and (child / CERTIFY_FILE).is_file()]
    seen = {c.path.resolve() for c in inside}
    certifications = inside + [c for c in extra if c.path.resolve() not in seen]
    certifications.sort(key=lambda c: str(c.path))
    return Run(path=path, config=config, meta=meta, epochs=_read_metrics(path / METRICS_FILE),
               test=test, certifications=tuple(certifications))


def _expand(arguments: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for argument in arguments:
        if glob.has_magic(argument):
            matches = [Path(m) for m in sorted(glob.glob(argument)) if Path(m).is_dir()]
            if not matches:
                raise ReportError(f"{argument}: matches no directory")
            paths.extend(matches)
        else:
            path = Path(argument)
            if not path.exists():
                raise ReportError(f"{argument}: no such directory")
            if not path.is_dir():
                raise ReportError(f"{argument}: not a directory; pass run directories written "
                                  "by tightrope-train (or tightrope-certify --out directories)")
            paths.append(path)
    return paths


def _owner(certification: Certification, runs: Sequence[Path]) -> Path | None:
    """The run whose checkpoint ``certification`` certified: by the absolute path ``run.json``
    records, else (results copied from another machine) by the run directory's name."""
    parent = certification.checkpoint.parent
    by_path = [p for p in runs if p.resolve() == parent]
    by_name = [p for p in runs if p.resolve().name == parent.name]
    owners = by_path or by_name
    return owners[0] if owners else None


def collect(arguments: Sequence[str]) -> list[Run]:
    """The runs named by ``arguments`` (directories or glob patterns), sorted by path.

    Each argument is a run directory (it has ``metrics.csv``) or a certification directory (it
    has ``run.json``), which is attached to the run whose checkpoint it certified; that run must
    be given too.
    """
    run_paths: list[Path] = []
    separate: list[Certification] = []
    for path in _expand(arguments):
        if (path / METRICS_FILE).is_file():
            if path.resolve() not in {p.resolve() for p in run_paths}:
                run_paths.append(path)
        elif (path / CERTIFY_FILE).is_file():
            if path.resolve() not in {c.path.resolve() for c in separate}:
                separate.append(load_certification(path))
        elif (path / "config.yaml").is_file():
            raise ReportError(f"{path}: no {METRICS_FILE}; a tightrope-train run directory that "
                              "has not finished an epoch")
        else:
            raise ReportError(f"{path}: neither a tightrope-train run directory (no "
                              f"{METRICS_FILE}) nor a tightrope-certify results directory (no "
                              f"{CERTIFY_FILE}); for a folder of runs pass {path}/*")
    extra: dict[Path, list[Certification]] = {p: [] for p in run_paths}
    for certification in separate:
        owner = _owner(certification, run_paths)
        if owner is None:
            raise ReportError(f"{certification.path}: certifies {certification.checkpoint}, "
                              "whose run directory is not among the inputs; pass it too")
        extra[owner].append(certification)
    runs = [load_run(path, extra[path]) for path in run_paths]
    runs.sort(key=lambda run: str(run.path))
    return runs
