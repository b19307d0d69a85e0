"""Checkpoints that cannot serve raise CheckpointError (a ValueError) naming the file and the
problem, never torch's advice to load with weights_only=False; a failed save keeps the previous
file and leaves no temporary file."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tightrope.train import CheckpointError, Trainer, load_checkpoint, save_checkpoint
from tightrope.train.rundir import MetricsTable


class _Hostile:
    """Pickles to a call of os.mkdir: loading it unsafely would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def damaged_checkpoint(good: Path, target: Path, kind: str) -> str:
    """Write a damaged copy of the trainer checkpoint ``good`` to ``target``; returns a phrase
    the error must contain."""
    data = good.read_bytes()
    stored = torch.load(good, weights_only=True)
    state = dict(stored["model"]["state_dict"])
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
        return "truncated"
    if kind == "empty":
        target.write_bytes(b"")
        return "the file is empty"
    if kind == "random":
        target.write_bytes(random.Random(0).randbytes(4096))
        return "unreadable checkpoint"
    if kind == "hostile":
        torch.save({"format": 1, "model": _Hostile(target.parent / "pwned")}, target)
        return "refused: it holds pickled Python objects (posix.mkdir)"
    if kind == "missing":
        del stored["dataset"], stored["optimizer"]
        torch.save(stored, target)
        return "missing dataset, optimizer"
    if kind == "shapes":
        state["1.weight"] = torch.zeros(8, 1, 5, 5, dtype=torch.float64)
        stored["model"] = dict(stored["model"], state_dict=state)
        torch.save(stored, target)
        return "1.weight has shape (8, 1, 5, 5), the model needs (4, 1, 5, 5)"
    assert kind == "nan"
    weight = state["1.weight"].clone()
    weight[0, 0, 0, 0] = float("nan")
    state["1.weight"] = weight
    stored["model"] = dict(stored["model"], state_dict=state)
    torch.save(stored, target)
    return "weight '1.weight' holds NaN or infinite values"


KINDS = ("truncated", "empty", "random", "hostile", "missing", "shapes", "nan")


@pytest.fixture
def good_checkpoint(tmp_path: Path, make_config: Callable[..., Any]) -> Path:
    """The ``last.pt`` of an untrained tiny run (CNN3 of width 4, float64)."""
    run = tmp_path / "good"
    Trainer(make_config(), run_dir=run).save("last.pt")
    return run / "last.pt"


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_that_cannot_serve_raises_a_value_error_naming_it(
        tmp_path: Path, good_checkpoint: Path, kind: str) -> None:
    path = tmp_path / "last.pt"
    phrase = damaged_checkpoint(good_checkpoint, path, kind)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, resume=True)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert message.startswith(str(path))
    assert phrase in message
    assert "weights_only" not in message
    assert "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_non_finite_weights_load_only_when_allowed(tmp_path: Path, good_checkpoint: Path) -> None:
    path = tmp_path / "nan.pt"
    damaged_checkpoint(good_checkpoint, path, "nan")
    checkpoint = load_checkpoint(path, allow_non_finite=True)
    assert torch.isnan(checkpoint.model[1].weight).any()


def test_resume_checks_the_optimizer_state_too(
        tmp_path: Path, good_checkpoint: Path, make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(), run_dir=tmp_path)
    trainer.train_one_epoch()
    trainer.save("last.pt")
    stored = torch.load(tmp_path / "last.pt", weights_only=True)
    moments = stored["optimizer"]["state"][0]
    moments["exp_avg"] = torch.full_like(moments["exp_avg"], float("inf"))
    torch.save(stored, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match="optimizer's exp_avg holds NaN or infinite"):
        trainer.restore(tmp_path / "inf.pt")
    old = torch.load(good_checkpoint, weights_only=True)  # before any step: no Adam moments
    old["optimizer"]["param_groups"] = old["optimizer"]["param_groups"] * 2
    torch.save(old, tmp_path / "groups.pt")
    with pytest.raises(CheckpointError, match=r"groups\.pt: its training state does not fit"):
        trainer.restore(tmp_path / "groups.pt")


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1102"),
])
def test_a_failed_save_keeps_the_previous_checkpoint_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"format": 1, "weights": torch.ones(3)})

    def full_disk(payload: object, target: Path) -> None:
        Path(target).write_bytes(b"PK\x03\x04 half a file")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*last\.pt"):
        save_checkpoint(path, {"format": 1, "weights": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))


def test_a_failed_metrics_write_keeps_the_previous_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = MetricsTable(tmp_path / "metrics.csv")
    table.append({"epoch": 1, "loss": 0.5})
    before = (tmp_path / "metrics.csv").read_text()

    def full_disk(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match=r"could not write .*metrics\.csv: No space left"):
        table.append({"epoch": 2, "loss": 0.4})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    assert (tmp_path / "metrics.csv").read_text() == before
