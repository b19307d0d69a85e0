"""Every YAML config in configs/ loads and validates (data presence aside), every paper config
matches the published recipe in ``tests/published_settings.py``, and every CPU-scale MNIST config
(configs/mnist_cpu) matches its paper recipe with the shortened schedule of its setting."""

from __future__ import annotations

import importlib.util
import re
import sys
from itertools import takewhile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from torch import nn

from tightrope.losses.taps import resolve_split
from tightrope.train import EpsShape, TrainConfig, build_model, load_config

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


_TABLE = _load_table()
PUBLISHED = _TABLE.PUBLISHED
PAPER_CONFIGS = [p for p in CONFIGS if str(p.parent.relative_to(ROOT / "configs")) in SETTINGS]
# The CPU-scale MNIST configs: the paper recipes of configs/mnist on CNN3, one shorter schedule.
CPU_MNIST = _TABLE.CPU_MNIST
CPU_MNIST_MODEL = _TABLE.CPU_MNIST_MODEL
CPU_MNIST_SCHEDULE = _TABLE.CPU_MNIST_SCHEDULE
CPU_MNIST_SETTINGS = _TABLE.CPU_MNIST_SETTINGS
CPU_CONFIGS = [p for p in CONFIGS
               if str(p.parent.relative_to(ROOT / "configs")) in CPU_MNIST_SETTINGS]


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
    elif path in CPU_CONFIGS:
        assert config.model.name == "cnn3"
    else:
        assert config.model.name == "cnn7"


def _attribute(config: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        config = getattr(config, name)
    return config


def _check_recipe(path: Path, config: TrainConfig, recipe: Any) -> None:
    """``config`` (loaded from ``path``) carries every value of ``recipe``."""
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
    loss_config = config.loss.loss_config()
    for dotted, value in recipe.loss.items():
        actual = _attribute(loss_config, dotted)
        if isinstance(value, type):
            assert isinstance(actual, value), f"{path}: loss.options.{dotted} is {actual!r}"
        else:
            assert actual == pytest.approx(value, rel=1e-12), (
                f"{path}: loss.options.{dotted} = {actual!r}, {recipe.source} has {value!r}")


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: "/".join(_key(p)))
def test_paper_config_follows_its_published_recipe(path: Path) -> None:
    recipe = PUBLISHED[_key(path)]
    text = path.read_text()
    assert "# Source:" in text, f"{path} must name its source in a comment"
    config = load_config(path, check_data=False)
    _check_recipe(path, config, recipe)
    assert config.eps.test_eps == pytest.approx(SETTINGS[_key(path)[0]], rel=1e-12)


# ------------------------------------------------------------------ CPU-scale MNIST (mnist_cpu)
CPU_METHODS = ("pgd", "ibp", "crown_ibp", "sabr", "taps", "staps", "cc_ibp", "mtl_ibp", "exp_ibp")


def test_the_cpu_table_and_the_mnist_cpu_configs_match_one_to_one() -> None:
    expected = {(s, m) for s in CPU_MNIST_SETTINGS for m in CPU_METHODS}
    assert set(CPU_MNIST) == expected
    assert {_key(p) for p in CPU_CONFIGS} == expected


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: "/".join(_key(p)))
def test_cpu_config_follows_its_paper_recipe_shortened(path: Path) -> None:
    setting, method = _key(path)
    recipe = CPU_MNIST[(setting, method)]
    config = load_config(path, check_data=False)
    _check_recipe(path, config, recipe)
    assert config.model.name == CPU_MNIST_MODEL
    assert config.model.options == {}
    assert config.data.dataset.value == "mnist"
    assert config.eps.test_eps == pytest.approx(CPU_MNIST_SETTINGS[setting], rel=1e-12)
    # The header: setting, method, what was shortened and an existing source config.
    header = "".join(takewhile(lambda line: line.startswith("#"),
                               path.read_text().splitlines(keepends=True)))
    assert f"MNIST eps={CPU_MNIST_SETTINGS[setting]} at CPU scale, {method}:" in header
    assert "Shortened" in header
    source = re.search(r"# Source: (configs/\S+\.yaml)", header)
    assert source is not None, f"{path} must name its source config in its header"
    assert (ROOT / source.group(1)).is_file(), f"{path}: {source.group(1)} does not exist"


@pytest.mark.parametrize("setting", sorted(CPU_MNIST_SETTINGS))
def test_the_cpu_configs_of_a_setting_share_one_schedule(setting: str) -> None:
    schedules = set()
    for path in CPU_CONFIGS:
        if _key(path)[0] != setting:
            continue
        config = load_config(path, check_data=False)
        schedules.add((config.epochs, config.eps.warmup_epochs, config.eps.ramp_epochs,
                       config.eps.shape, config.eps.start, config.optim.milestones,
                       config.optim.gamma, config.optim.lr, config.data.batch_size,
                       config.data.validation_size, config.seed))
    assert len(schedules) == 1, f"{setting}: the configs use {len(schedules)} schedules"
    ((epochs, warmup, ramp, shape, start, milestones, *_),) = schedules
    assert (epochs, warmup, ramp, milestones) == tuple(CPU_MNIST_SCHEDULE.values())
    assert shape is EpsShape.SMOOTHED
    assert start == 0.0


@pytest.mark.parametrize("path", [p for p in CPU_CONFIGS if p.stem in ("taps", "staps")],
                         ids=lambda p: "/".join(_key(p)))
def test_the_cpu_taps_split_leaves_bounds_and_a_hidden_relu_on_each_side(path: Path) -> None:
    # On CNN3 a classifier of one ReLU starts at the second conv; the split must leave a ReLU
    # layer in the IBP part and an affine layer before the classifier's ReLU (a [ReLU, Linear]
    # classifier would make TAPS the IBP loss).
    config = load_config(path, check_data=False)
    taps = config.loss.loss_config()
    taps = getattr(taps, "taps", taps)
    model = build_model(config.model.name, in_channels=1, input_size=28, num_classes=10,
                        mean=(0.1307,), std=(0.3081,), **config.model.options)
    split = resolve_split(model, taps.split, taps.classifier_relus)
    extractor, classifier = list(model[:split]), list(model[split:])
    assert any(isinstance(layer, nn.ReLU) for layer in extractor)
    assert isinstance(classifier[0], nn.Conv2d | nn.Linear)
    assert any(isinstance(layer, nn.ReLU) for layer in classifier)
