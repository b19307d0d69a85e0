"""Every YAML config in configs/ loads and validates (data presence aside)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tightrope.train import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_the_configs_cover_every_setting() -> None:
    names = {str(p.relative_to(p.parents[2])) for p in CONFIGS}
    for setting in ("mnist/eps0.1", "mnist/eps0.3", "cifar10/eps2_255", "cifar10/eps8_255",
                    "tiny_imagenet/eps1_255"):
        for method in ("ibp", "crown_ibp", "sabr", "taps", "staps", "cc_ibp", "mtl_ibp", "pgd"):
            assert f"{setting}/{method}.yaml" in names
    cpu = {p.name for p in CONFIGS if p.parent.name == "fashion_mnist"}
    assert {"cpu_ibp.yaml", "cpu_cc_ibp.yaml"} <= cpu


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
