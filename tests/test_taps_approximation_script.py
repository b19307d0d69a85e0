"""scripts/taps_approximation.py on tiny settings: the exact MILP minimum lies between IBP's
bound and PGD's estimate, SABR and TAPS lie above IBP, and the output files are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("scipy")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "taps_approximation.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("taps_approximation", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _load_script()


def _random_mlp(generator: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10),
                          nn.ReLU(), nn.Linear(10, 4)).to(torch.float64)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator,
                                        dtype=torch.float64) * 0.5)
    return model.eval()


def test_exact_between_ibp_and_pgd_and_files_written(script: ModuleType, tmp_path: Path
                                                      ) -> None:
    generator = torch.Generator().manual_seed(0)
    model = _random_mlp(generator)
    x = torch.rand((6, 1, 2, 3), generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=generator)
    settings = script.Settings(eps=0.15, time_limit=20.0, seed=0, pgd_steps=20, pgd_restarts=2)
    summary = script.run(model, x, y, settings, tmp_path, progress=False)

    assert summary["counts"]["solved"] == 6
    values = np.load(tmp_path / "values.npz")
    exact = values["exact"]
    assert exact.shape == (6, 3)
    assert np.isfinite(exact).all()
    ibp, pgd = values["IBP"], values["PGD"]
    assert (ibp <= exact + 1e-6).all()
    assert (exact <= pgd + 1e-6).all()
    assert (values["SABR"] >= ibp - 1e-9).all()
    assert (values["TAPS"] >= ibp - 1e-9).all()
    # On a random net IBP is loose somewhere: the check is not vacuous.
    assert (ibp < exact - 1e-3).any()

    errors = np.load(tmp_path / "errors.npz")
    assert sorted(errors.files) == sorted(script.METHODS)
    for name in script.METHODS:
        assert errors[name].shape == (18,)
        np.testing.assert_allclose(errors[name], (values[name] - exact).ravel())
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["errors"]["IBP"]["max"] <= 1e-6
    assert written["errors"]["PGD"]["min"] >= -1e-6
    assert written["settings"]["sabr_lambda"] == 0.4  # nearest published MNIST eps: 0.1
    assert "IBP" in script.format_table(written)


def test_command_line_trains_and_reloads(script: ModuleType, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["--samples", "3", "--eps", "0.05", "--threads", "1", "--time-limit", "20",
              "--pgd-steps", "5", "--pgd-restarts", "1"]
    assert script.main([*common, "--out", str(out), "--dataset", "synthetic", "--hidden", "8",
                        "8", "--epochs", "1"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert first["counts"]["samples"] == 3
    assert (out / "model.pt").is_file()
    assert "TAPS" in capsys.readouterr().out

    again = tmp_path / "again"
    assert script.main([*common, "--out", str(again), "--checkpoint", str(out / "model.pt")]) == 0
    before, after = np.load(out / "values.npz"), np.load(again / "values.npz")
    for name in ("exact", *script.METHODS):  # same model, same seeds: the same numbers
        np.testing.assert_array_equal(before[name], after[name])
