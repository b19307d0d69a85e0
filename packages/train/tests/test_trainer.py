"""The trainer: phases pick their losses, checkpoints rebuild the model, resumption is exact,
non-finite losses stop the run."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tightrope.losses import (
    METHODS,
    IBPConfig,
    IBPLoss,
    ModelSelection,
    Regularized,
    SABRLoss,
    StandardLoss,
    STAPSLoss,
    TAPSLoss,
    WarmupLoss,
    relu_balance_penalty,
    tightness_penalty,
)
from tightrope.losses.core import recording_pre_activations
from tightrope.train import NonFiniteLossError, Trainer, load_checkpoint


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phases_choose_the_loss(
        make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(loss={"method": "taps"},
                                  regularizers={"shi_lambda": 0.5, "l1": 1e-5}))
    steps = len(trainer.train_loader)
    warm, ramp, full = (trainer.loss_for_step(s) for s in (0, steps, 2 * steps))
    # Shi et al.'s code regularises the warm-up at full weight, on a box of radius 1e-6.
    assert isinstance(warm, Regularized)
    assert isinstance(warm.loss, WarmupLoss)
    assert warm.loss.config.min_eps == 1e-6
    assert warm.config.tightness == warm.config.relu_balance == 0.5
    assert warm.config.l1 == 1e-5
    assert isinstance(ramp, Regularized)
    assert isinstance(ramp.loss, IBPLoss)
    assert ramp.config.tightness == pytest.approx(0.5 * (1 - trainer.schedule.eps_at(steps) / 0.05))
    assert isinstance(full, Regularized)
    assert isinstance(full.loss, TAPSLoss)
    assert full.config.tightness == 0.0


def test_staps_trains_sabr_on_its_small_box_during_the_ramp(
        make_config: Callable[..., Any]) -> None:
    """Mao et al. 2023's code trains IBP on SABR's small box (SABR) while eps grows."""
    trainer = Trainer(make_config(loss={"method": "staps", "options": {"shrink": 0.4}}))
    steps = len(trainer.train_loader)
    ramp, full = trainer.loss_for_step(steps), trainer.loss_for_step(2 * steps)
    assert isinstance(ramp, SABRLoss)
    assert ramp.config.shrink == 0.4
    assert isinstance(full, STAPSLoss)


def test_warmup_without_regularisers_is_natural_training(
        make_config: Callable[..., Any]) -> None:
    for regularizers in ({"shi_lambda": 0.5, "warmup_eps": 0.0}, {"shi_lambda": 0.0}):
        warm = Trainer(make_config(regularizers=regularizers)).loss_for_step(0)
        assert isinstance(warm, StandardLoss)
    # PGD training computes no bounds: its warm-up stays natural (shi_lambda must be 0).
    assert isinstance(Trainer(make_config(loss={"method": "pgd"})).loss_for_step(0),
                      StandardLoss)


def test_warmup_step_is_natural_loss_plus_shi_terms_on_a_tiny_box(
        make_config: Callable[..., Any]) -> None:
    trainer = Trainer(make_config(regularizers={"shi_lambda": 0.5, "ibp_init": True}))
    x, y = next(iter(trainer.train_loader.epoch(0)))
    out = trainer.loss_for_step(0)(trainer.model, x, y, trainer.schedule.eps_at(0))
    # Direct: the clean cross-entropy plus 0.5 (tightness + ReLU balance) of the IBP bounds of
    # the box of radius 1e-6 (the model has BatchNorm: the bounds use the clean statistics).
    with recording_pre_activations() as traces:
        direct = IBPLoss(IBPConfig(kappa=1.0))(trainer.model, x, y, 1e-6)
    (box, pre), = traces
    delta_0 = box.radius.mean() / trainer.model[0].std.mean()
    expected = direct.metrics["natural_loss"] + 0.5 * (
        tightness_penalty(delta_0, pre) + relu_balance_penalty(pre))
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    assert float(out.metrics["tightness_penalty"]) > 0


def test_crown_ibp_beta_follows_eps(
        make_config: Callable[..., Any]) -> None:
    # No beta given: the reference's 1 -> 0, as 1 - eps_t / eps_max (Zhang et al. 2020,
    # Shi et al. 2021), not ramp progress; kappa stays 0 (no natural term) off MNIST.
    trainer = Trainer(make_config(loss={"method": "crown_ibp"}))
    steps = len(trainer.train_loader)
    ramp = range(steps, 2 * steps)
    losses = [trainer.loss_for_step(s) for s in (*ramp, 2 * steps)]
    betas = [loss.config.beta for loss in losses]  # type: ignore[attr-defined]
    kappas = {loss.config.kappa for loss in losses}  # type: ignore[attr-defined]
    eps_max = trainer.config.eps.train
    assert betas[:-1] == pytest.approx([1 - trainer.schedule.eps_at(s) / eps_max for s in ramp])
    # Step 2 of this 6-step ramp (progress 1/3): the smoothed eps is 7/39 of eps_max
    # ((256/13) (1/4^4 + 4/4^3 (1/3 - 1/4))), so beta is 32/39 = 0.82 where progress gave 0.67.
    assert betas[1] == pytest.approx(32 / 39)
    assert betas[-2] == pytest.approx(0.0, abs=1e-12)
    assert betas[-1] == 0.0
    assert kappas == {0.0}
    given = Trainer(make_config(loss={"method": "crown_ibp", "beta": [1.0, 0.0],
                                      "kappa": [1.0, 0.5]}))
    kappa = given.loss_for_step(steps + 1).config.kappa  # type: ignore[attr-defined]
    assert kappa == pytest.approx(1 - 0.5 * given.schedule.eps_at(steps + 1) / eps_max)


@pytest.mark.parametrize(("method", "kept"), [("cc_ibp", 4), ("sabr", 4), ("ibp", 3)])
def test_model_selection_follows_the_method(
        tmp_path: Path, method: str, kept: int, make_config: Callable[..., Any]) -> None:
    # Two epochs at full eps, the first with the better validation scores: the expressive
    # losses and SABR keep the last epoch (as their code does), IBP the best verified one.
    trainer = Trainer(make_config(loss={"method": method}, epochs=4), run_dir=tmp_path)
    steps = len(trainer.train_loader)
    rule = METHODS[method].selection
    for epoch, verified, clean in ((3, 0.6, 0.9), (4, 0.2, 0.5)):
        trainer.epoch, trainer.step = epoch, epoch * steps
        trainer._select({"verified_accuracy": verified, "clean_accuracy": clean})
    assert trainer.best_epoch == kept
    stored = torch.load(tmp_path / "best.pt", weights_only=True)
    assert stored["best"]["epoch"] == kept
    assert stored["best"]["selection"] == rule.value
    assert stored["epoch"] == kept


def test_the_run_records_its_selection_rule(
        tmp_path: Path, make_config: Callable[..., Any]) -> None:
    messages: list[str] = []
    config = make_config(loss={"method": "cc_ibp"}, evaluation={"pgd_steps": 1,
                                                                "selection": "best_verified"})
    result = Trainer(config, run_dir=tmp_path, on_message=messages.append).fit()
    assert result.selection is ModelSelection.BEST_VERIFIED
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["model_selection"] == "best_verified"
    assert meta["model_selection_source"] == "evaluation.selection"
    assert "model selection: best_verified (evaluation.selection)" in messages
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["best"]["selection"] == "best_verified"
    default = Trainer(make_config(loss={"method": "crown_ibp"}), run_dir=tmp_path / "b")
    assert default.resolved_schedules() == {
        "model_selection": "best_verified", "model_selection_source": "the default of crown_ibp",
        "beta_schedule": [1.0, 0.0], "kappa_schedule": None}


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
