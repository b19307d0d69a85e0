"""tightrope-train: help, config errors before any work, a run end to end and --resume; bad
checkpoints, unwritable outputs and a full disk end with exit status 2, one line on stderr and
nothing half-made."""

from __future__ import annotations

import errno
import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tightrope.apps.train.cli import ProgressPrinter, build_parser, main
from tightrope.bounds import compile_kernels, kernels_compiled
from tightrope.train import Progress, Trainer, load_checkpoint, load_config

CONFIG = """\
epochs: 2
precision: float64
data: {dataset: synthetic, batch_size: 32, validation_size: 32, synthetic_size: 160}
model: {name: cnn3, options: {width: 4}}
loss: {method: ibp}
eps: {train: 0.05, ramp_epochs: 1}
evaluation: {pgd_steps: 2}
"""


@pytest.fixture(autouse=True)
def _ieee_denormals() -> Iterator[None]:
    # main() flushes denormals to zero in the calling thread; the rest of the session keeps
    # IEEE arithmetic.
    yield
    torch.set_flush_denormal(False)


def test_training_flushes_denormals_from_the_start(tmp_path: Path) -> None:
    # Called first thing, before the config is read: even a rejected config has set it.
    denormal = torch.tensor([1 << 20], dtype=torch.int32).view(torch.float32)  # 1.5e-39
    assert (denormal * 1.0).item() != 0.0
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    assert main(["--config", str(config), "--out", str(tmp_path / "runs"), "epochs=many"]) == 2
    assert (denormal * 1.0).item() == 0.0


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, action.dest
    for words in ("key.sub=value", "torchrun", "tensorboard --logdir", "exit status",
                  "--resume checkpoint that", "cannot be written"):
        assert words in text


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("tightrope-train: error: "), err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.mark.parametrize(("overrides", "message"), [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("eps.train=3", "eps.train must lie in"),
    ("epochs=many", "epochs: expected an integer"),
    ("data.dataset=cifar10", "CIFAR-10 not found"),
    ("eps.train=.nan", "eps.train: expected a finite number, got nan"),
    ("eps.train=.inf", "eps.train: expected a finite number, got inf"),
    ("eps.smoothed_power=.nan", "eps.smoothed_power: expected a finite number"),
    ("eps.train=1/0", "eps.train: '1/0' divides by zero"),
    ("eps.train=e/2", "eps.train: expected a number (or a fraction such as 2/255)"),
    ("model.options.bogus=1", "model: options.bogus: unknown option of cnn3; its options: width"),
    ("model.options.width=-1", "cnn3: width must be a positive integer, got -1"),
    ("data.dataset=fashion_mnist data.validation_size=60000",
     "validation_size 60000 leaves no training images: fashion_mnist has 60000"),
    ("optim.grad_clip=.nan", "optim.grad_clip: expected a finite number, got nan"),
    ("optim.grad_clip=-1", "grad_clip must be a finite number >= 0 (0 disables clipping)"),
])
def test_bad_configs_are_rejected_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: str, message: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    assert main(["--config", str(config), "--out", str(tmp_path / "runs"), "--no-compile",
                 *overrides.split()]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_config_directory_is_rejected(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path), "--out", str(tmp_path / "runs"),
                 "--no-compile"]) == 2
    assert f"{tmp_path} is a directory: pass a YAML config file" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_run_end_to_end_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    status = main(["--config", str(config), "--out", str(tmp_path / "runs"), "--device", "cpu",
                   "--quiet", "checkpoint.every_steps=2"])
    assert status == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    assert f"run directory: {run}" in out
    assert f"tensorboard --logdir {run / 'tensorboard'}" in out
    assert "test split (40 samples" in out
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["verified_accuracy"] <= report["pgd_accuracy"] <= report["clean_accuracy"]
    assert load_checkpoint(run / "best.pt").epoch == 2
    meta = json.loads((run / "meta.json").read_text())
    assert meta["argv"] == ["tightrope-train", "--config", str(config), "--out",
                            str(tmp_path / "runs"), "--device", "cpu", "--quiet",
                            "checkpoint.every_steps=2"]
    before = torch.load(run / "last.pt", weights_only=True)["model"]["state_dict"]
    assert kernels_compiled(), "tightrope-train compiles the bound kernels by default"
    # A finished run resumes to the same state (nothing left to train).
    compile_kernels(False)
    assert main(["--resume", str(run), "--quiet", "--no-test", "--no-compile"]) == 0
    assert not kernels_compiled()
    after = torch.load(run / "last.pt", weights_only=True)["model"]["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


class _Hostile:
    """Pickles to a call of os.mkdir: loading it unsafely would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _damage(last: Path, kind: str) -> str:
    """Replace the trainer checkpoint ``last`` by a damaged one; returns a phrase the error
    must contain."""
    data = last.read_bytes()
    stored = torch.load(last, weights_only=True)
    state = dict(stored["model"]["state_dict"])
    if kind == "truncated":
        last.write_bytes(data[: len(data) // 2])
        return "truncated"
    if kind == "empty":
        last.write_bytes(b"")
        return "the file is empty"
    if kind == "random":
        last.write_bytes(random.Random(0).randbytes(4096))
        return "unreadable checkpoint"
    if kind == "hostile":
        torch.save({"format": 1, "model": _Hostile(last.parent / "pwned")}, last)
        return "refused: it holds pickled Python objects (posix.mkdir)"
    if kind == "missing":
        del stored["optimizer"]
        torch.save(stored, last)
        return "missing optimizer"
    if kind == "shapes":
        state["1.weight"] = torch.zeros(8, 1, 5, 5, dtype=torch.float64)
    else:
        state["1.weight"] = state["1.weight"].clone().fill_(float("nan"))
    stored["model"] = dict(stored["model"], state_dict=state)
    torch.save(stored, last)
    return ("1.weight has shape (8, 1, 5, 5), the model needs (4, 1, 5, 5)" if kind == "shapes"
            else "weight '1.weight' holds NaN or infinite values")


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "hostile", "missing",
                                  "shapes", "nan"])
def test_resume_from_a_checkpoint_that_cannot_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    run = tmp_path / "run"
    Trainer(load_config(tmp_path / "c.yaml"), run_dir=run).save("last.pt")
    phrase = _damage(run / "last.pt", kind)
    before = sorted(run.iterdir())
    assert main(["--resume", str(run), "--no-compile", "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert f"error: {run / 'last.pt'}" in err
    assert phrase in err
    assert "weights_only" not in err
    assert sorted(run.iterdir()) == before
    assert not (run / "pwned").exists()


@pytest.mark.parametrize("where", ["file/run", "file"])
def test_an_output_that_cannot_hold_a_run_directory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    # Under a regular file, since chmod does not stop root (tests may run as root).
    (tmp_path / "c.yaml").write_text(CONFIG)
    (tmp_path / "file").write_text("not a directory\n")
    out = tmp_path / where
    assert main(["--config", str(tmp_path / "c.yaml"), "--out", str(out), "--no-compile"]) == 2
    err = _one_line_error(capsys)
    assert f"cannot create a run directory in {out}" in err
    assert "pass --out a writable directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "file"]


def test_a_read_only_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes into it anyway: refuse as the kernel would for others
        real_mkdir = Path.mkdir

        def refused(self: Path, *args: Any, **kwargs: Any) -> None:
            if self.parent == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refused)
    try:
        assert main(["--config", str(tmp_path / "c.yaml"), "--out", str(locked / "runs"),
                     "--no-compile"]) == 2
    finally:
        locked.chmod(0o700)
    err = _one_line_error(capsys)
    assert f"cannot create a run directory in {locked / 'runs'}: Permission denied" in err
    assert not any(locked.iterdir())


@pytest.mark.parametrize(("failing_save", "failure"), [
    (1, OSError(errno.ENOSPC, "No space left on device")),
    (2, OSError(errno.ENOSPC, "No space left on device")),
    (2, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1102")),
])
def test_a_full_disk_keeps_the_last_good_checkpoint_and_no_temporary_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        failing_save: int, failure: Exception) -> None:
    (tmp_path / "c.yaml").write_text(CONFIG)
    real_save = torch.save
    saves = []

    def full_disk(payload: Any, target: Any) -> None:
        saves.append(target)
        if len(saves) < failing_save:
            real_save(payload, target)
            return
        Path(target).write_bytes(b"PK\x03\x04 half a file")
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    # The first save is last.pt at step 2 (checkpoint.every_steps), the second at the end of
    # epoch 1 (4 steps).
    status = main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "runs"),
                   "--device", "cpu", "--quiet", "--no-compile", "checkpoint.every_steps=2",
                   "evaluation.crown_ibp=false"])
    monkeypatch.undo()
    assert status == 2
    err = _one_line_error(capsys)
    assert "could not write" in err
    assert "last.pt" in err
    if failing_save == 1:
        # No checkpoint yet: nothing is kept, not even --out, which this run created.
        assert "nothing was kept" in err
        assert not (tmp_path / "runs").exists()
        return
    (run,) = (tmp_path / "runs").iterdir()
    assert f"continue with `tightrope-train --resume {run}`" in err
    assert not list(run.glob("*.tmp"))
    assert load_checkpoint(run / "last.pt").step == 2


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_bar_on_a_terminal_and_lines_otherwise(tty: bool) -> None:
    stream = _Stream(tty)
    printer = ProgressPrinter(stream)
    for batch in range(20):
        printer(Progress(epoch=0, epochs=2, batch=batch, batches=20, step=batch + 1, eps=0.1,
                         loss=1.0, elapsed=0.5 * (batch + 1)))
    text = stream.getvalue()
    assert "epoch ETA 0:00, run ETA 0:10" in text  # 20 batches left at 0.5 s each
    if tty:
        assert text.count("\r") == 20
        assert "[####################]" in text
    else:
        assert "\r" not in text
        assert text.count("\n") == 10  # every second batch: a tenth of the epoch
