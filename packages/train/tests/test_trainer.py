"""The trainer: phases pick their losses, checkpoints rebuild the model, resumption is exact,
non-finite losses stop the run."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tightrope.losses import IBPLoss, Regularized, StandardLoss, TAPSLoss
from tightrope.train import NonFiniteLossError, Trainer, load_checkpoint


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phases_choose_the_loss(
        make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(loss={"method": "taps"},
                                  regularizers={"shi_lambda": 0.5, "l1": 1e-5}))
    steps = len(trainer.train_loader)
    warm, ramp, full = (trainer.loss_for_step(s) for s in (0, steps, 2 * steps))
    assert isinstance(warm, Regularized)
    assert isinstance(warm.loss, StandardLoss)
    assert warm.config.tightness == 0.0
    assert warm.config.l1 == 1e-5
    assert isinstance(ramp, Regularized)
    assert isinstance(ramp.loss, IBPLoss)
    assert ramp.config.tightness == pytest.approx(0.5 * (1 - trainer.schedule.eps_at(steps) / 0.05))
    assert isinstance(full, Regularized)
    assert isinstance(full.loss, TAPSLoss)
    assert full.config.tightness == 0.0


def test_crown_ibp_beta_follows_the_ramp(
        make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(loss={"method": "crown_ibp", "beta": [1.0, 0.0]}))
    steps = len(trainer.train_loader)
    betas = [trainer.loss_for_step(s).config.beta  # type: ignore[attr-defined]
             for s in (steps, 2 * steps - 1, 2 * steps)]
    assert betas[0] == pytest.approx(1 - 1 / steps)
    assert betas[1] == 0.0
    assert betas[2] == 0.0


def test_run_directory_checkpoint_and_metrics(
    tmp_path: Path, make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(), run_dir=tmp_path)
    result = trainer.fit()
    for name in ("config.yaml", "meta.json", "metrics.csv", "last.pt", "best.pt"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for column in ("val/clean_accuracy", "val/pgd_accuracy", "val/ibp_verified_accuracy",
                   "val/crown_ibp_verified_accuracy", "train/loss", "train/eps"):
        assert column in rows[0]
    # Verified (sound) <= PGD-robust <= clean.
    for row in rows:
        assert float(row["val/verified_accuracy"]) <= float(row["val/pgd_accuracy"])
        assert float(row["val/pgd_accuracy"]) <= float(row["val/clean_accuracy"])
    assert result.best_epoch == 3  # the only epoch at full eps
    checkpoint = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint.dataset == "synthetic"
    assert checkpoint.test_eps == 0.05
    assert checkpoint.input_shape == (1, 12, 12)
    assert checkpoint.num_classes == 4
    x = torch.rand(5, 1, 12, 12, dtype=torch.float64)
    trainer.model.eval()
    assert torch.equal(checkpoint.model(x), trainer.model(x))
    stored = torch.load(tmp_path / "last.pt", weights_only=True)
    assert stored["epoch"] == 3
    assert stored["step"] == 3 * len(trainer.train_loader)


@pytest.mark.parametrize("method", ["ibp", "cc_ibp"])
def test_resume_is_bitwise_identical(tmp_path: Path, method: str,
        make_config: Callable[..., Any]) -> None:
    config = make_config(loss={"method": method}, checkpoint={"every_steps": 4},
                         regularizers={"shi_lambda": 0.5, "ibp_init": True})
    whole = Trainer(config, run_dir=tmp_path / "whole")
    whole.fit()
    steps = len(whole.train_loader)

    # 6 steps per epoch, a checkpoint every 4: interrupted after step 9, the run lost step 9
    # and resumes from step 8, batch 2 of the ramp's epoch.
    assert steps == 6
    stop_at = 9

    def interrupt(progress: object) -> None:
        if getattr(progress, "step", 0) == stop_at:
            raise KeyboardInterrupt

    first = Trainer(config, run_dir=tmp_path / "cut", on_progress=interrupt)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["step"] == 8
    assert saved["batch"] == 2
    assert saved["epoch"] == 1
    second = Trainer(config, run_dir=tmp_path / "cut")
    second.restore(tmp_path / "cut" / "last.pt")
    second.fit()
    assert _states_equal(whole.model.state_dict(), second.model.state_dict())
    assert torch.equal(whole.loss_generator.get_state(), second.loss_generator.get_state())
    rows = []
    for run in ("whole", "cut"):
        with open(tmp_path / run / "metrics.csv") as handle:
            rows.append(list(csv.DictReader(handle)))
    assert rows[0] == [dict(r, epoch_seconds=rows[0][i]["epoch_seconds"])
                       for i, r in enumerate(rows[1])]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(checkpoint={"every_steps": 2}), run_dir=tmp_path)
    steps = len(trainer.train_loader)
    trainer.train_one_epoch()
    trainer.save("last.pt")
    good = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model[-1].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, batch 1.*last\.pt"):
        trainer.train_one_epoch()
    stored = load_checkpoint(tmp_path / "last.pt")
    assert stored.step == steps
    assert _states_equal(stored.model.state_dict(), good)


def test_float64_and_config_in_checkpoint_round_trip(
    tmp_path: Path, make_config: Callable[..., Any]) -> None:
    config = make_config(epochs=1, eps={"train": 0.05, "test": 0.03})
    Trainer(config, run_dir=tmp_path).fit()
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert next(checkpoint.model.parameters()).dtype == torch.float64
    assert checkpoint.train_eps == 0.05
    assert checkpoint.test_eps == 0.03
    from tightrope.train import parse_config

    assert parse_config(checkpoint.config) == config
    assert dataclasses.asdict(parse_config(checkpoint.config)) == dataclasses.asdict(config)
