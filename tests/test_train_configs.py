"""Every YAML config in configs/ loads and validates (data presence aside), and every paper
config matches the published recipe in ``tests/published_settings.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tightrope.train import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# The paper settings and their test eps.
SETTINGS = {"mnist/eps0.1": 0.1, "mnist/eps0.3": 0.3, "cifar10/eps2_255": 2 / 255,
            "cifar10/eps8_255": 8 / 255, "tiny_imagenet/eps1_255": 1 / 255}


def _load_table() -> ModuleType:
    # The test suite imports in importlib mode, so the neighbouring module is loaded by path.
    path = Path(__file__).with_name("published_settings.py")
    spec = importlib.util.spec_from_file_location("published_settings", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


PUBLISHED = _load_table().PUBLISHED
PAPER_CONFIGS = [p for p in CONFIGS if str(p.parent.relative_to(ROOT / "configs")) in SETTINGS]


def _key(path: Path) -> tuple[str, str]:
    return str(path.parent.relative_to(ROOT / "configs")), path.stem


def test_the_configs_cover_every_setting() -> None:
    names = {str(p.relative_to(p.parents[2])) for p in CONFIGS}
    for setting in SETTINGS:
        for method in ("ibp", "crown_ibp", "sabr", "taps", "staps", "cc_ibp", "mtl_ibp", "pgd"):
            assert f"{setting}/{method}.yaml" in names
    cpu = {p.name for p in CONFIGS if p.parent.name == "fashion_mnist"}
    assert {"cpu_ibp.yaml", "cpu_cc_ibp.yaml"} <= cpu


def test_the_published_table_and_the_paper_configs_match_one_to_one() -> None:
    assert {_key(p) for p in PAPER_CONFIGS} == set(PUBLISHED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_is_valid(path: Path) -> None:
    config = load_config(path, check_data=False)
    assert 0 < config.eps.test_eps <= 0.3
    assert config.loss.loss_config() is not None
    if path.parent.name == "fashion_mnist":
        assert config.model.name == "cnn3"
        assert config.eps.test_eps == 0.1
    else:
        assert config.model.name == "cnn7"


def _attribute(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: "/".join(_key(p)))
def test_paper_config_follows_its_published_recipe(path: Path) -> None:
    recipe = PUBLISHED[_key(path)]
    text = path.read_text()
    assert "# Source:" in text, f"{path} must name its source in a comment"
    config = load_config(path, check_data=False)
    found = {
        "epochs": config.epochs,
        "warmup": config.eps.warmup_epochs,
        "ramp": config.eps.ramp_epochs,
        "milestones": config.optim.milestones,
        "train_eps": config.eps.train,
        "batch_size": config.data.batch_size,
        "grad_clip": config.optim.grad_clip,
        "shi_lambda": config.regularizers.shi_lambda,
        "l1": config.regularizers.l1,
        "ibp_init": config.regularizers.ibp_init,
        "beta": config.beta_schedule,
        "kappa": config.kappa_schedule,
    }
    expected = {name: getattr(recipe, name) for name in found}
    for name in ("train_eps", "l1"):  # written as fractions such as 2/255 and 2e-6/7
        expected[name] = pytest.approx(expected[name], rel=1e-12, abs=0.0)
    assert found == expected, f"{path} departs from {recipe.source}"
    assert config.optim.lr == 5e-4
    assert config.optim.gamma == 0.2
    assert config.eps.test_eps == pytest.approx(SETTINGS[_key(path)[0]], rel=1e-12)
    loss_config = config.loss.loss_config()
    for dotted, value in recipe.loss.items():
        actual = _attribute(loss_config, dotted)
        if isinstance(value, type):
            assert isinstance(actual, value), f"{path}: loss.options.{dotted} is {actual!r}"
        else:
            assert actual == pytest.approx(value, rel=1e-12), (
                f"{path}: loss.options.{dotted} = {actual!r}, {recipe.source} has {value!r}")
