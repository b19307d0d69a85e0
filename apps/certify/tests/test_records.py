"""Per-sample records: append/read with a crash-cut last line, merging shards, CSV, summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tightrope.apps.certify.records import (
    SampleRecord,
    append_records,
    format_summary,
    merge_records,
    read_records,
    shard_file,
    summarise,
    write_csv,
)


def _record(index: int, status: str, stage: str, label: int = 1, prediction: int = 1,
            seconds: float = 0.5) -> SampleRecord:
    return SampleRecord(index=index, label=label, prediction=prediction, status=status,
                        stage=stage, seconds=seconds, eps=0.1)


def test_append_read_and_a_crash_cut_last_line(tmp_path: Path) -> None:
    path = shard_file(tmp_path, 0, 2)
    records = [_record(0, "verified", "ibp"), _record(1, "falsified", "attack")]
    append_records(path, records)
    assert read_records(path) == records
    with path.open("a") as handle:
        handle.write('{"index": 2, "lab')  # the process died while writing
    assert read_records(path) == records
    path.write_text(path.read_text().replace('"label": 1', '"label": "x', 1) + "\n")
    with pytest.raises(ValueError, match=r"samples\.shard-000-of-002\.jsonl:1"):
        read_records(path)


def test_merge_keeps_one_record_per_sample_in_index_order(tmp_path: Path) -> None:
    first, second = shard_file(tmp_path, 0, 2), shard_file(tmp_path, 1, 2)
    append_records(first, [_record(2, "timeout", "none"), _record(0, "verified", "crown")])
    append_records(second, [_record(1, "verified", "bab"), _record(2, "verified", "bab")])
    merged = merge_records([first, second])
    assert [r.index for r in merged] == [0, 1, 2]
    assert merged[2].status == "verified"
    out = tmp_path / "samples.csv"
    write_csv(out, merged)
    rows = list(csv.DictReader(out.open()))
    assert [row["status"] for row in rows] == ["verified", "verified", "verified"]


def test_summary_counts_and_accuracies() -> None:
    records = [
        _record(0, "verified", "ibp", seconds=0.1),
        _record(1, "verified", "bab", seconds=2.0),
        _record(2, "falsified", "clean", label=3, prediction=1, seconds=0.0),
        _record(3, "falsified", "attack", seconds=0.2),
        _record(4, "timeout", "none", seconds=5.0),
    ]
    summary = summarise(records)
    assert summary.samples == 5
    assert summary.clean_accuracy == pytest.approx(4 / 5)
    assert summary.adversarial_accuracy == pytest.approx(3 / 5)
    assert summary.certified_accuracy == pytest.approx(2 / 5)
    assert summary.counts == {"verified": 2, "falsified": 2, "unknown": 0, "timeout": 1}
    assert sum(summary.stages.values()) == 5
    assert summary.max_seconds == 5.0
    text = format_summary(summary, 0.1)
    assert "certified accuracy" in text
    assert "40.00 %" in text
    with pytest.raises(ValueError, match="no sample records"):
        summarise([])
    with pytest.raises(ValueError, match="status"):
        _record(0, "proved", "ibp")
