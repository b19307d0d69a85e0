"""End to end: CNN3 trained for a few hundred steps on the synthetic data with every method;
the run directory, the metrics and exact resumption from a mid-epoch checkpoint."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from tightrope.losses import METHODS
from tightrope.train import Trainer, load_checkpoint, parse_config
from tightrope.train.config import NO_IBP_PASS

FAST = ["ibp", "cc_ibp"]
CERTIFIED = {"ibp", "crown_ibp", "sabr", "taps", "staps", "cc_ibp", "mtl_ibp", "exp_ibp", "lee",
             "wong_kolter"}


def _config(method: str, samples: int) -> Any:
    options: dict[str, Any] = {}
    if method in ("cc_ibp", "mtl_ibp", "exp_ibp"):
        options = {"alpha": 0.5}
    return parse_config({
        "epochs": 3, "seed": 1, "precision": "float64",
        "data": {"dataset": "synthetic", "batch_size": 16, "validation_size": 64,
                 "synthetic_size": samples, "eval_batch_size": 64},
        "model": {"name": "cnn3", "options": {"width": 4}},
        "loss": {"method": method, "options": options,
                 **({"beta": [1.0, 0.0], "kappa": [1.0, 0.0]} if method == "crown_ibp" else {})},
        "eps": {"train": 0.04, "warmup_epochs": 1, "ramp_epochs": 1},
        "optim": {"lr": 2e-3, "milestones": [2]},
        "regularizers": {"ibp_init": method not in ("pgd", "standard"),
                         "shi_lambda": 0.0 if method in NO_IBP_PASS else 0.5},
        "evaluation": {"pgd_steps": 3},
        "checkpoint": {"every_steps": 7},
    })


def _run(tmp_path: Path, method: str, samples: int) -> None:
    config = _config(method, samples)
    whole = Trainer(config, run_dir=tmp_path / "whole")
    result = whole.fit()
    steps = len(whole.train_loader)
    assert whole.step == 3 * steps
    for name in ("config.yaml", "meta.json", "metrics.csv", "last.pt", "best.pt"):
        assert (tmp_path / "whole" / name).is_file()
    with open(tmp_path / "whole" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    last = rows[-1]
    assert float(last["train/eps"]) == pytest.approx(0.04)
    assert float(last["val/clean_accuracy"]) >= 0.9
    assert float(last["val/verified_accuracy"]) <= float(last["val/pgd_accuracy"])
    if method in CERTIFIED:
        assert float(last["val/verified_accuracy"]) >= 0.5, last
    if method in ("taps", "staps"):
        assert "val/taps_accuracy" in last
    assert result.best_epoch == 3

    # Kill after a few steps of the ramp epoch, resume from the mid-epoch checkpoint.
    stop_at = steps + steps // 2

    def interrupt(progress: Any) -> None:
        if progress.step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(config, run_dir=tmp_path / "cut", on_progress=interrupt).fit()
    resumed = Trainer(config, run_dir=tmp_path / "cut")
    resumed.restore(tmp_path / "cut" / "last.pt")
    assert 0 < resumed.step < stop_at
    resumed.fit()
    a = load_checkpoint(tmp_path / "whole" / "last.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "cut" / "last.pt").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs"


@pytest.mark.parametrize("method", FAST)
def test_fast_methods_train_and_resume(tmp_path: Path, method: str) -> None:
    _run(tmp_path, method, samples=512)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_few_hundred_steps_and_resumes(tmp_path: Path, method: str) -> None:
    _run(tmp_path, method, samples=1600)
