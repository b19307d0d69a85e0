"""tightrope-report on two small run directories written with tightrope-train's and
tightrope-certify's own writers: the numbers land in the right rows and columns, the commands
are rebuilt, the figures are PNG files, the markdown is regenerated identically, and bad input
ends with exit status 2 and one line on stderr."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.image import imread

from tightrope.apps.certify.records import (
    SampleRecord,
    append_records,
    shard_file,
    summarise,
    write_csv,
)
from tightrope.apps.report.cli import build_parser, main
from tightrope.apps.report.markdown import MARKER
from tightrope.apps.report.rows import BLANK, eps_text
from tightrope.train import parse_config, write_provenance
from tightrope.train.rundir import MetricsTable

EPS = 0.05
BASE = {
    "epochs": 2,
    "data": {"dataset": "synthetic", "batch_size": 32, "validation_size": 32,
             "synthetic_size": 160},
    "model": {"name": "cnn3", "options": {"width": 4}},
    "eps": {"train": EPS, "ramp_epochs": 1},
    "evaluation": {"pgd_steps": 2},
}


def _config(method: str, options: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "loss": {"method": method, "options": options}}


def _write_run(path: Path, config: dict[str, Any], epochs: list[dict[str, float]],
               test: dict[str, float] | None) -> None:
    """A run directory as tightrope-train leaves it (no checkpoints: the report reads none)."""
    path.mkdir(parents=True)
    write_provenance(path, parse_config(config, check_data=False), {
        "device": "cpu", "world_size": 1, "model_selection": "last",
        "model_selection_source": "test"})
    table = MetricsTable(path / "metrics.csv")
    for number, row in enumerate(epochs, start=1):
        table.append({"epoch": number, "step": 5 * number, **row})
    if test is not None:
        report = {**test, "samples": 100.0, "eps": EPS, "epoch": len(epochs), "selection": "last"}
        (path / "test_metrics.json").write_text(json.dumps(report, indent=2) + "\n")


def _write_certification(out: Path, checkpoint: Path, records: list[SampleRecord], *,
                         end: int, timeout: float, merged: bool) -> None:
    """What tightrope-certify --checkpoint CHECKPOINT --out OUT writes."""
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({
        "checkpoint": str(checkpoint.resolve()), "dataset": "synthetic", "eps": EPS,
        "start": 0, "end": end, "shards": 1, "timeout_per_sample": timeout, "bab": True,
    }, indent=2) + "\n")
    append_records(shard_file(out, 0, 1), records)
    if merged:
        write_csv(out / "samples.csv", records)
        (out / "summary.json").write_text(json.dumps(asdict(summarise(records)), indent=2))


def _record(index: int, status: str, stage: str, prediction: int = 1) -> SampleRecord:
    return SampleRecord(index=index, label=1, prediction=prediction, status=status, stage=stage,
                        seconds=0.25 * (index + 1), eps=EPS)


def _epoch(seconds: float, clean: float, pgd: float, verified: float, loss: float
           ) -> dict[str, float]:
    return {"epoch_seconds": seconds, "train/loss": loss, "val/clean_accuracy": clean,
            "val/pgd_accuracy": pgd, "val/verified_accuracy": verified}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    ibp = root / "runs" / "synthetic-ibp-cnn3-1"
    cc = root / "runs" / "synthetic-cc_ibp-cnn3-1"
    _write_run(ibp, _config("ibp", {}),
               [_epoch(10.0, 0.5, 0.2, 0.1, 2.0), _epoch(20.5, 0.6, 0.4, 0.3, 1.5)],
               {"clean_accuracy": 0.61, "pgd_accuracy": 0.42, "verified_accuracy": 0.33})
    _write_run(cc, _config("cc_ibp", {"alpha": 0.3}),
               [_epoch(3600.0, 0.7, 0.3, 0.2, 1.0), _epoch(125.0, 0.8, 0.5, 0.25, 0.9)],
               {"clean_accuracy": 0.875, "pgd_accuracy": 0.5, "verified_accuracy": 0.25})
    # ibp: certified inside its run directory, merged: 4 samples, 2 verified, 1 falsified.
    _write_certification(ibp / "certify", ibp / "best.pt", [
        _record(0, "verified", "ibp"), _record(1, "verified", "crown"),
        _record(2, "falsified", "clean", prediction=0), _record(3, "timeout", "none"),
    ], end=4, timeout=2.0, merged=True)
    # cc_ibp: last.pt certified into a directory of its own, 4 of 8 samples, not merged yet.
    _write_certification(root / "elsewhere" / "cc-last", cc / "last.pt", [
        _record(0, "verified", "ibp"), _record(1, "verified", "ibp"),
        _record(2, "verified", "bab"), _record(3, "falsified", "attack"),
    ], end=8, timeout=30.0, merged=False)
    configs = root / "configs"
    configs.mkdir()
    (configs / "ibp.yaml").write_text(yaml.safe_dump(_config("ibp", {})))
    (configs / "cc_ibp.yaml").write_text(yaml.safe_dump(_config("cc_ibp", {"alpha": 0.1})))
    return root


def _report(workspace: Path, out: Path, *extra: str) -> int:
    return main([str(workspace / "runs" / "*"), str(workspace / "elsewhere" / "cc-last"),
                 "--out", str(out), "--configs", str(workspace / "configs"), *extra])


def _table(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[1:]:
        if line.startswith("| method") or line.startswith("| array"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")),
                             strict=True)))
    return rows


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), path
    image = imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 100
    assert image.shape[1] > 100


def test_the_table_holds_each_runs_numbers(workspace: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    assert _report(workspace, out) == 0
    assert "wrote" in capsys.readouterr().out
    markdown = (out / "README.md").read_text()
    assert markdown.startswith(MARKER + "\n")
    assert "## synthetic, eps = 0.05" in markdown
    rows = _table(markdown)
    assert [row["method"] for row in rows] == ["cc_ibp", "ibp"]  # sorted by method
    cc, ibp = rows
    assert ibp["run"] == "`synthetic-ibp-cnn3-1`"
    assert (ibp["clean"], ibp["PGD"], ibp["verified (train eval)"]) == ("61.00", "42.00", "33.00")
    assert (ibp["certified"], ibp["not falsified"], ibp["n"]) == ("50.00", "75.00", "4")
    assert ibp["train time"] == "0:00:30"  # 10 + 20.5 s of epochs
    assert ibp["certify time"] == "2.5 s (0.625 s)"
    assert ibp["timeout"] == "2 s"
    assert ibp["deciding stage"] == "clean 1, ibp 1, crown 1, undecided 1"
    assert ibp["`loss.options.alpha`"] == BLANK
    assert cc["run"] == "`synthetic-cc_ibp-cnn3-1` (last.pt)"
    assert cc["`loss.options.alpha`"] == "0.3"
    assert (cc["clean"], cc["PGD"], cc["verified (train eval)"]) == ("87.50", "50.00", "25.00")
    assert (cc["certified"], cc["not falsified"], cc["n"]) == ("75.00", "75.00", "4")
    assert cc["train time"] == "1:02:05"
    assert cc["timeout"] == "30 s"
    assert cc["deciding stage"] == "attack 1, ibp 2, bab 1"
    assert "partial certification, 4 of 8 samples" in markdown
    assert "no `summary.json` yet" in markdown


def test_commands_are_rebuilt_from_the_run_files(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    assert _report(workspace, out) == 0
    markdown = (out / "README.md").read_text()
    runs, configs = workspace / "runs", workspace / "configs"
    assert (f"tightrope-train --config {configs / 'cc_ibp.yaml'} --out {runs} --device cpu "
            "loss.options.alpha=0.3") in markdown
    assert f"tightrope-train --config {configs / 'ibp.yaml'} --out {runs} --device cpu\n" in (
        markdown)
    ibp = runs / "synthetic-ibp-cnn3-1"
    assert (f"tightrope-certify --checkpoint {ibp / 'best.pt'} --eps 0.05 --samples 4 "
            f"--timeout 2 --out {ibp / 'certify'}") in markdown
    assert (f"--checkpoint {runs / 'synthetic-cc_ibp-cnn3-1' / 'last.pt'} --eps 0.05 "
            "--samples 8 --timeout 30") in markdown
    assert "model selection last, epoch 2" in markdown


def test_figures_are_png_files_and_the_markdown_is_reproducible(workspace: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "results"
    arrays = tmp_path / "gap.npz"
    np.savez(arrays, crown=np.array([0.5, 1.0, 1.5, np.inf]), ibp=np.array([2.0, 3.0]))
    listed = tmp_path / "gap.json"
    listed.write_text(json.dumps({"taps": [[-0.5, 0.0], [0.5]], "sabr": [1, 2, 3]}))
    extra = ["--histogram", str(arrays), "--histogram", str(listed)]
    assert _report(workspace, out, *extra) == 0
    first = (out / "README.md").read_text()
    for name in ("curves-synthetic-eps0.05.png", "tradeoff-synthetic-eps0.05.png",
                 "hist-gap.png", "hist-gap-2.png"):
        _assert_png(out / name)
        assert f"]({name})" in first
    assert "| `crown` | 3 | 1 | 1 | 0.5 | 1.5 | 1 |" in first
    assert "| `sabr` | 3 | 2 | 2 | 1 | 3 | 0 |" in first
    assert _report(workspace, out, *extra) == 0  # its own file: overwritten
    assert (out / "README.md").read_text() == first


def test_only_histograms(tmp_path: Path) -> None:
    listed = tmp_path / "gap.json"
    listed.write_text(json.dumps({"a": [0.1, 0.2], "b": [0.3]}))
    assert main(["--histogram", str(listed), "--out", str(tmp_path / "out"), "--bins", "5"]) == 0
    _assert_png(tmp_path / "out" / "hist-gap.png")
    assert "## Histograms" in (tmp_path / "out" / "README.md").read_text()


def test_eps_text() -> None:
    assert eps_text(0.1) == "0.1"
    assert eps_text(0.2) == "0.2"
    assert eps_text(2 / 255) == "2/255"
    assert eps_text(8 / 255) == "8/255"


def test_notes_and_published_rows_go_where_they_belong(workspace: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("## What the numbers say\n\nIBP is below CC-IBP here.\n")
    published = tmp_path / "published.csv"
    published.write_text("dataset,eps,method,model,clean,certified,source\n"
                         "synthetic,0.05,ibp,cnn7,98.84,97.95,Shi et al. 2021\n"
                         "synthetic,0.3,sabr,cnn7,98.75,93.40,Mueller et al. 2023\n")
    out = tmp_path / "results"
    assert _report(workspace, out, "--notes", str(notes), "--published", str(published)) == 0
    markdown = (out / "README.md").read_text()
    assert markdown.index("## What the numbers say") < markdown.index("## synthetic, eps = 0.05")
    assert "| ibp | cnn7 | 98.84 | 97.95 | Shi et al. 2021 |" in markdown
    assert "Mueller" not in markdown  # no runs at eps 0.3: its published row is not listed
    assert [row["method"] for row in _table(markdown)] == ["cc_ibp", "ibp"]


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.dest
    for word in ("RUN_OR_GLOB", "run.json", "curves-", "tradeoff-", "hist-", "exit status"):
        assert word in text


def _copy_run(workspace: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(workspace / "runs" / "synthetic-ibp-cnn3-1", run)
    return run


def _broken(kind: str, workspace: Path, tmp_path: Path) -> list[str]:
    if kind == "missing":
        return [str(tmp_path / "nowhere")]
    if kind == "glob-without-match":
        return [str(tmp_path / "nothing-*")]
    run = _copy_run(workspace, tmp_path)
    if kind == "no-metrics":
        (run / "metrics.csv").unlink()
    elif kind == "not-a-run":
        for child in run.iterdir():
            if child.is_file():
                child.unlink()
    elif kind == "bad-test-json":
        (run / "test_metrics.json").write_text('{"clean_accuracy": 0.6')
    elif kind == "bad-meta-json":
        (run / "meta.json").write_bytes(b"\xff\xfe garbage")
    elif kind == "bad-summary":
        (run / "certify" / "summary.json").write_text('{"samples": 4}')
    elif kind == "bad-run-json":
        (run / "certify" / "run.json").write_text("[1, 2]")
    elif kind == "bad-metrics":
        (run / "metrics.csv").write_text("epoch,val/clean_accuracy\n1,high\n")
    elif kind == "bad-config":
        (run / "config.yaml").write_text("epochs: [1\n")
    elif kind == "orphan-certification":
        return [str(run / "certify")]
    elif kind == "bad-published":
        (tmp_path / "p.csv").write_text("dataset,eps,method,model,clean,certified,source\n"
                                        "synthetic,0.05,ibp,cnn7,high,50,a paper\n")
        return [str(run), "--published", str(tmp_path / "p.csv")]
    elif kind == "missing-notes":
        return [str(run), "--notes", str(tmp_path / "no-notes.md")]
    elif kind == "bad-histogram":
        (tmp_path / "h.json").write_text("[1, 2]")
        return [str(run), "--histogram", str(tmp_path / "h.json")]
    return [str(run)]


@pytest.mark.parametrize("kind", [
    "missing", "glob-without-match", "no-metrics", "not-a-run", "bad-test-json",
    "bad-meta-json", "bad-summary", "bad-run-json", "bad-metrics", "bad-config",
    "orphan-certification", "bad-histogram", "bad-published", "missing-notes",
])
def test_bad_input_exits_2_with_one_line(kind: str, workspace: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main([*_broken(kind, workspace, tmp_path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tightrope-report: error: ")
    assert error.count("\n") == 1
    assert not out.exists()  # nothing written


def test_a_markdown_file_it_did_not_write_is_kept(workspace: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "README.md").write_text("# hand-written\n")
    assert _report(workspace, out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "README.md").read_text() == "# hand-written\n"
    assert _report(workspace, out, "--force") == 0
    assert (out / "README.md").read_text().startswith(MARKER)


def test_a_certification_copied_from_another_machine_matches_by_name(
        workspace: Path, tmp_path: Path) -> None:
    run = _copy_run(workspace, tmp_path)
    shutil.rmtree(run / "certify")
    _write_certification(tmp_path / "copied", Path("/another/machine/runs/run/best.pt"),
                         [_record(0, "verified", "ibp")], end=1, timeout=5.0, merged=True)
    out = tmp_path / "out"
    assert main([str(run), str(tmp_path / "copied"), "--out", str(out), "--configs",
                 str(tmp_path / "no-configs")]) == 0
    markdown = (out / "README.md").read_text()
    (row,) = _table(markdown)
    assert (row["certified"], row["n"], row["timeout"]) == ("100.00", "1", "5 s")
    assert "# not recorded, and no config under" in markdown


def test_no_inputs_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
