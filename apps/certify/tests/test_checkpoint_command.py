"""tightrope-certify checkpoint on a freshly trained checkpoint: the summary adds up, the
cascade certifies at least what IBP and CROWN alone do, reruns resume, shards merge, and bad
input is refused without results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tightrope.apps.certify.checkpoint_command import parse_shard
from tightrope.apps.certify.cli import main as certify_main
from tightrope.apps.certify.records import read_records, shard_file
from tightrope.apps.train.cli import main as train_main
from tightrope.bounds import Box, crown, ibp, margin_spec
from tightrope.train import load_checkpoint, load_test_split

# Trained at eps 0.02, certified at 0.1: IBP alone certifies little there, CROWN and
# alpha-CROWN most, and a few samples are left to branch-and-bound.
CONFIG = """\
epochs: 4
precision: float64
data: {dataset: synthetic, batch_size: 32, validation_size: 32, synthetic_size: 512}
model: {name: cnn3, options: {width: 4}}
loss: {method: ibp}
eps: {train: 0.02, test: 0.1, warmup_epochs: 1, ramp_epochs: 1}
optim: {lr: 0.005}
evaluation: {pgd_steps: 2}
"""

SAMPLES = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    config = root / "c.yaml"
    config.write_text(CONFIG)
    assert train_main(["--config", str(config), "--out", str(root / "runs"), "--device", "cpu",
                       "--quiet"]) == 0
    torch.set_flush_denormal(False)  # training flushed denormals here; certification does not
    (found,) = list((root / "runs").glob("*/best.pt"))
    return found


def _certify(*args: str) -> int:
    return certify_main(["--checkpoint", *args, "--samples", str(SAMPLES), "--timeout", "1",
                         "--quiet", "--threads", "1"])


def test_summary_adds_up_and_beats_ibp_and_crown(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cert"
    assert _certify(str(checkpoint), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "certified accuracy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == SAMPLES
    assert sum(summary["counts"].values()) == SAMPLES
    assert sum(summary["stages"].values()) == SAMPLES
    records = read_records(shard_file(out, 0, 1))
    assert sorted(r.index for r in records) == list(range(SAMPLES))
    for record in records:
        if record.prediction != record.label:
            assert (record.status, record.stage) == ("falsified", "clean")
    # The cascade certifies at least what IBP or CROWN certify alone.
    loaded = load_checkpoint(checkpoint)
    x, y = load_test_split(loaded.dataset, dtype=torch.float64)
    x, y = x[:SAMPLES], y[:SAMPLES]
    box, C = Box.from_linf(x, loaded.test_eps), margin_spec(y, loaded.num_classes,
                                                           dtype=torch.float64)
    with torch.no_grad():
        by_ibp = (ibp(loaded.model, box, C).lower > 0).all(1)
        by_crown = (crown(loaded.model, box, C).lower > 0).all(1)
    verified = torch.tensor([r.status == "verified" for r in sorted(records,
                                                                    key=lambda r: r.index)])
    assert int(by_crown.sum()) > 0, "the trained model should certify something"
    assert bool((verified | ~by_ibp).all())
    assert bool((verified | ~by_crown).all())
    assert summary["certified_accuracy"] * SAMPLES >= int(by_crown.sum())


def test_rerun_skips_recorded_samples_and_refuses_other_settings(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cert"
    assert _certify(str(checkpoint), "--out", str(out), "--chunk", "8", "--no-bab") == 0
    lines = shard_file(out, 0, 1).read_text().splitlines()
    assert len(lines) == SAMPLES
    # A crash after the first chunk: drop the rest, rerun, and only the rest is redone.
    shard_file(out, 0, 1).write_text("\n".join(lines[:8]) + "\n")
    assert _certify(str(checkpoint), "--out", str(out), "--chunk", "8", "--no-bab") == 0
    again = shard_file(out, 0, 1).read_text().splitlines()
    assert again[:8] == lines[:8]
    assert len(again) == SAMPLES
    capsys.readouterr()
    assert _certify(str(checkpoint), "--out", str(out), "--eps", "0.2", "--no-bab") == 2
    assert "different run" in capsys.readouterr().err


def test_shards_merge_into_one_summary(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cert"
    assert _certify(str(checkpoint), "--out", str(out), "--shard", "0/2", "--no-bab") == 0
    assert certify_main(["merge", str(out)]) == 1  # shard 1 is missing
    assert _certify(str(checkpoint), "--out", str(out), "--shard", "1/2", "--no-bab") == 0
    first = {r.index for r in read_records(shard_file(out, 0, 2))}
    second = {r.index for r in read_records(shard_file(out, 1, 2))}
    assert first.isdisjoint(second)
    assert first | second == set(range(SAMPLES))
    capsys.readouterr()
    assert certify_main(["merge", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["samples"] == SAMPLES


def test_bad_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert _certify(str(foreign), "--out", str(tmp_path / "a")) == 2
    assert "not a tightrope-train checkpoint" in capsys.readouterr().err
    assert _certify(str(tmp_path / "missing.pt")) == 2
    assert _certify(str(foreign), "--shard", "3/2") == 2
    assert "--shard" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert parse_shard(None, {}) == (0, 1)
