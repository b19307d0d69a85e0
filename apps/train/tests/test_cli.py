"""tightrope-train: help, config errors before any work, a run end to end and --resume."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tightrope.apps.train.cli import ProgressPrinter, build_parser, main
from tightrope.bounds import compile_kernels, kernels_compiled
from tightrope.train import Progress, load_checkpoint

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
    for words in ("key.sub=value", "torchrun", "tensorboard --logdir", "exit status"):
        assert words in text


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lrr=1", "optim.lrr: unknown key"),
    ("eps.train=3", "eps.train must lie in"),
    ("epochs=many", "epochs: expected an integer"),
    ("data.dataset=cifar10", "CIFAR-10 not found"),
])
def test_bad_configs_are_rejected_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    assert main(["--config", str(config), "--out", str(tmp_path / "runs"), override]) == 2
    assert message in capsys.readouterr().err
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
    before = torch.load(run / "last.pt", weights_only=True)["model"]["state_dict"]
    assert kernels_compiled(), "tightrope-train compiles the bound kernels by default"
    # A finished run resumes to the same state (nothing left to train).
    compile_kernels(False)
    assert main(["--resume", str(run), "--quiet", "--no-test", "--no-compile"]) == 0
    assert not kernels_compiled()
    after = torch.load(run / "last.pt", weights_only=True)["model"]["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


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
