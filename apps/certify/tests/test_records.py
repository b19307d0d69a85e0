"""Per-sample records: append/read with a crash-cut last line, merging shards, CSV, summary."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tightrope.apps.certify.cli import main as certify_main
from tightrope.apps.certify.records import (
    SampleRecord,
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


@pytest.mark.parametrize("tail", [
    b'{"index": 2, "lab',  # killed mid-line
    b"\x00" * 40,  # file-system garbage after a crash
    b"\x00" * 40 + b"\n",  # a whole line, but not a record
    b'{"eps": 0.1, "index": 2, "label": 1, "prediction": 1, "seconds": 0.5, "stage": "ibp", '
    b'"status": "verified"}',  # no line end: the write may not have finished
])
def test_a_cut_last_line_is_dropped_before_appending(tmp_path: Path, tail: bytes) -> None:
    path = shard_file(tmp_path, 0, 1)
    records = [_record(0, "verified", "ibp"), _record(1, "falsified", "attack")]
    append_records(path, records)
    whole = path.read_bytes()
    assert cut_line(path) is None
    assert drop_cut_line(path) is None
    with path.open("ab") as handle:
        handle.write(tail)
    assert cut_line(path) is not None
    assert read_records(path) == records  # skipped, not counted as done
    assert drop_cut_line(path) == tail.decode("utf-8", errors="replace").rstrip("\n")
    assert path.read_bytes() == whole
    # The redone sample starts a line of its own: every later read still works.
    append_records(path, [_record(2, "verified", "crown")])
    assert [r.index for r in read_records(path)] == [0, 1, 2]
    assert cut_line(path) is None
    assert drop_cut_line(tmp_path / "absent.jsonl") is None


def test_merge_skips_and_reports_a_cut_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"eps": 0.1, "start": 0, "end": 3}))
    first, second = shard_file(tmp_path, 0, 2), shard_file(tmp_path, 1, 2)
    append_records(first, [_record(0, "verified", "ibp"), _record(2, "timeout", "none")])
    append_records(second, [_record(1, "verified", "bab")])
    with second.open("a") as handle:
        handle.write('{"index": 3, "label": 1, "pred')
    assert certify_main(["merge", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert re.match(r"samples +3\n", captured.out)
    assert "samples.shard-001-of-002.jsonl" in captured.err
    assert "cut short" in captured.err
    assert json.loads((tmp_path / "summary.json").read_text())["samples"] == 3
    assert second.read_text().endswith('"pred')  # merge reads, it never changes a shard


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
    assert summary.stage_seconds == {}  # records written before the time by stage was kept
    with pytest.raises(ValueError, match="no sample records"):
        summarise([])
    with pytest.raises(ValueError, match="status"):
        _record(0, "proved", "ibp")


def test_time_by_stage_is_summed_written_and_read_back(tmp_path: Path) -> None:
    records = [
        SampleRecord(index=0, label=1, prediction=1, status="verified", stage="ibp",
                     seconds=0.3, eps=0.1, stage_seconds={"clean": 0.1, "ibp": 0.2}),
        SampleRecord(index=1, label=1, prediction=1, status="timeout", stage="none",
                     seconds=2.4, eps=0.1,
                     stage_seconds={"clean": 0.1, "ibp": 0.2, "bab": 2.1}),
    ]
    summary = summarise(records)
    assert summary.stage_seconds == pytest.approx({"clean": 0.2, "ibp": 0.4, "bab": 2.1})
    assert "  in bab" in format_summary(summary, 0.1)
    path = tmp_path / "s.jsonl"
    append_records(path, records)
    assert read_records(path) == records
    write_csv(tmp_path / "s.csv", records)
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert float(rows[1]["seconds_bab"]) == pytest.approx(2.1)
    assert rows[0]["seconds_bab"] == ""
    with pytest.raises(ValueError, match="stage_seconds"):
        SampleRecord(index=0, label=1, prediction=1, status="verified", stage="ibp",
                     seconds=0.3, eps=0.1, stage_seconds={"lunch": 0.3})
