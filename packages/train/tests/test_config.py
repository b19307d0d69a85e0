"""The typed YAML config: every bad value is rejected before any work, with its key named."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from tightrope.attacks import FGSMConfig, PGDConfig
from tightrope.losses import METHODS, CCIBPConfig, ModelSelection, SABRConfig, expressive_pgd_attack
from tightrope.train import (
    ConfigError,
    DatasetName,
    DatasetNotFoundError,
    OptimConfig,
    Precision,
    load_config,
    parse_config,
)
from tightrope.train.config import apply_overrides

BASE: dict[str, Any] = {
    "epochs": 4,
    "data": {"dataset": "synthetic"},
    "eps": {"train": "2/255", "ramp_epochs": 2},
    "loss": {"method": "sabr", "options": {"shrink": 0.4, "attack": {"steps": 3}}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    return apply_overrides(BASE, [f"{path}={value}"])


def test_a_good_config_resolves_with_defaults_and_round_trips() -> None:
    config = parse_config(BASE)
    assert config.data.dataset is DatasetName.SYNTHETIC
    assert config.eps.train == pytest.approx(2 / 255)
    assert config.eps.test_eps == config.eps.train
    assert config.precision is Precision.FLOAT32
    assert config.optim.lr == 5e-4
    loss = config.loss.loss_config()
    assert isinstance(loss, SABRConfig)
    assert loss.shrink == 0.4
    assert loss.attack.steps == 3
    assert parse_config(config.to_plain()) == config


@pytest.mark.parametrize(("path", "value", "message"), [
    ("optim.lrr", "0.1", "optim.lrr: unknown key"),
    ("colour", "blue", "colour: unknown key"),
    ("optim.lr", "fast", "optim.lr: expected a number"),
    ("epochs", "2.5", "epochs: expected an integer"),
    ("data.augment", "3", "data.augment: expected true or false"),
    ("eps.train", "1.5", "eps.train must lie in"),
    ("eps.test", "-0.1", "eps.test must lie in"),
    ("data.dataset", "imagenet", "data.dataset: 'imagenet' is not one of"),
    ("loss.method", "magic", "unknown method 'magic'"),
    ("loss.options.shrinkk", "0.3", "loss.options.shrinkk: unknown key"),
    ("loss.options.shrink", "0", "loss.options: shrink"),
    ("loss.options.attack.steps", "many", "loss.options.attack.steps: expected an integer"),
    ("eps.ramp_epochs", "9", "exceeds epochs"),
    ("model.name", "vgg16", "unknown model 'vgg16'"),
    ("eps.train", ".nan", "eps.train: expected a finite number, got nan"),
    ("eps.test", ".inf", "eps.test: expected a finite number, got inf"),
    ("eps.smoothed_power", ".nan", "eps.smoothed_power: expected a finite number"),
    ("eps.train", "1/0", "eps.train: '1/0' divides by zero"),
    ("eps.train", "e/2", "eps.train: expected a number (or a fraction"),
    ("optim.lr", "1.0e+999", "optim.lr: expected a finite number, got inf"),
    ("optim.grad_clip", ".nan", "optim.grad_clip: expected a finite number"),
    ("optim.grad_clip", "-1", "grad_clip must be a finite number >= 0 (0 disables clipping)"),
    ("regularizers.l1", ".nan", "regularizers.l1: expected a finite number"),
    ("loss.options.shrink", ".nan", "loss.options.shrink: expected a finite number"),
    ("model.options.bogus", "1", "options.bogus: unknown option of cnn7; its options: width, "
                                 "linear_width, fifth_stride"),
    ("model.options.in_channels", "3", "options.in_channels: set from the data set"),
    ("model.options.width", "-1", "cnn7: width must be a positive integer, got -1"),
    ("model.options.linear_width", "0.5", "cnn7: linear_width must be a positive integer"),
])
def test_bad_values_name_their_key(path: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(_with(path, value))


def test_missing_required_sections_and_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eps: missing"):
        parse_config({"epochs": 1, "data": {"dataset": "synthetic"}})
    with pytest.raises(ConfigError, match=r"data\.dataset: missing"):
        parse_config({"epochs": 1, "data": {}, "eps": {"train": 0.1}})
    missing = _with("data.dataset", "cifar10")
    missing["data"]["root"] = str(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python"):
        parse_config(missing)
    assert parse_config(missing, check_data=False).data.root == str(tmp_path)


def test_yaml_file_overrides_and_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 4\ndata: {dataset: synthetic}\neps: {train: 0.1}\n"
                    "loss: {method: cc_ibp, options: {alpha: 0.3}}\n")
    config = load_config(path, ["loss.options.alpha=0.7", "optim.milestones=[2, 3]"])
    loss = config.loss.loss_config()
    assert isinstance(loss, CCIBPConfig)
    assert loss.alpha == 0.7
    assert config.optim.milestones == (2, 3)
    assert config.optim.lr_at(3) == pytest.approx(5e-4 * 0.04)
    with pytest.raises(ConfigError, match=r"run\.yaml: loss\.options: alpha must lie in"):
        load_config(path, ["loss.options.alpha=2"])
    with pytest.raises(ConfigError, match=r"expected key\.sub=value"):
        load_config(path, ["loss.options.alpha"])


def test_shi_regularisers_need_a_loss_with_ibp_bounds() -> None:
    for method in ("pgd", "standard", "wong_kolter"):
        data = apply_overrides(BASE, [f"loss.method={method}", "loss.options={}",
                                      "regularizers.shi_lambda=0.5"])
        with pytest.raises(ConfigError, match=r"regularizers\.shi_lambda"):
            parse_config(data)


def test_validation_size_must_leave_training_images() -> None:
    data = apply_overrides(BASE, ["data.dataset=fashion_mnist", "data.validation_size=60000"])
    # Checked before the data's presence: the message is the same without the files.
    with pytest.raises(ConfigError, match="validation_size 60000 leaves no training images: "
                                          "fashion_mnist has 60000"):
        parse_config(data)
    data["data"]["validation_size"] = 59999
    assert parse_config(data, check_data=False).data.validation_size == 59999


def test_values_that_disable_a_check_are_rejected_in_code_too() -> None:
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="grad_clip must be a finite number"):
            OptimConfig(grad_clip=bad)


def test_a_config_path_that_is_no_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory: pass a YAML config file"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"absent\.yaml: no such config file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(tmp_path / "list.yaml", ["epochs=2"])


def _method(method: str, dataset: str = "synthetic", **loss: Any) -> dict[str, Any]:
    return {"epochs": 4, "data": {"dataset": dataset}, "eps": {"train": 0.1, "ramp_epochs": 2},
            "loss": {"method": method, **loss}}


def test_crown_ibp_schedules_default_to_the_reference_per_data_set() -> None:
    # Zhang et al. 2020's code: beta 1 -> 0 (final-beta 0); kappa 1 -> 0.5 on MNIST
    # (mnist_dm-large: robust_natural, final-kappa 0.5), no natural term on CIFAR-10
    # (cifar_dm-large: robust), nor in Shi et al. 2021's CIFAR-10/TinyImageNet CROWN-IBP.
    mnist = parse_config(_method("crown_ibp", "mnist"), check_data=False)
    assert mnist.beta_schedule == (1.0, 0.0)
    assert mnist.kappa_schedule == (1.0, 0.5)
    for dataset in ("cifar10", "tiny_imagenet", "fashion_mnist", "synthetic"):
        config = parse_config(_method("crown_ibp", dataset), check_data=False)
        assert config.beta_schedule == (1.0, 0.0)
        assert config.kappa_schedule is None, dataset
        assert config.loss.loss_config().kappa == 0.0
    # Given schedules win; a fixed value in options is kept as it is.
    given = parse_config(_method("crown_ibp", "mnist", beta=[1.0, 0.5], kappa=[0.0, 0.0]),
                         check_data=False)
    assert (given.beta_schedule, given.kappa_schedule) == ((1.0, 0.5), (0.0, 0.0))
    fixed = parse_config(_method("crown_ibp", "mnist", options={"beta": 1.0, "kappa": 0.2}),
                         check_data=False)
    assert (fixed.beta_schedule, fixed.kappa_schedule) == (None, None)
    # IBP keeps Shi et al.'s kappa 0 unless asked.
    ibp = parse_config(_method("ibp", "mnist"), check_data=False)
    assert (ibp.beta_schedule, ibp.kappa_schedule) == (None, None)


def test_model_selection_defaults_to_each_papers_rule() -> None:
    expected = {"ibp": ModelSelection.BEST_VERIFIED, "crown_ibp": ModelSelection.BEST_VERIFIED,
                "taps": ModelSelection.BEST_TAPS, "staps": ModelSelection.BEST_TAPS,
                "sabr": ModelSelection.LAST, "cc_ibp": ModelSelection.LAST,
                "mtl_ibp": ModelSelection.LAST, "exp_ibp": ModelSelection.LAST,
                "pgd": ModelSelection.LAST, "standard": ModelSelection.LAST}
    for method, rule in expected.items():
        assert METHODS[method].selection is rule, method
        assert parse_config(_method(method)).selection is rule, method
    chosen = parse_config({**_method("sabr"), "evaluation": {"selection": "best_verified"}})
    assert chosen.selection is ModelSelection.BEST_VERIFIED
    assert parse_config(chosen.to_plain()) == chosen
    with pytest.raises(ConfigError, match="best_taps needs the TAPS accuracy"):
        parse_config({**_method("cc_ibp"), "evaluation": {"selection": "best_taps"}})
    with pytest.raises(ConfigError, match=r"evaluation\.selection: 'best' is not one of"):
        parse_config({**_method("cc_ibp"), "evaluation": {"selection": "best"}})


def test_expressive_losses_take_the_references_pgd_and_attack_radius() -> None:
    # CIFAR-10 2/255 in De Palma et al.'s code: --train_att_n_steps 8 --train_att_step_size
    # 0.25 --attack_eps_factor 2.1. The defaults stay random-start FGSM of 10 eps, factor 1.
    for method in ("cc_ibp", "mtl_ibp", "exp_ibp"):
        default = parse_config(_method(method)).loss.loss_config()
        assert default.attack == FGSMConfig(step_size=10.0, random_start=True)
        assert default.attack_eps_factor == 1.0
        options = {"alpha": 0.01, "attack_eps_factor": 2.1,
                   "attack": {"type": "PGDConfig", "steps": 8, "step_size": 0.25,
                              "early_stop": False}}
        config = parse_config(_method(method, options=options))
        loss = config.loss.loss_config()
        assert loss.attack == expressive_pgd_attack(steps=8, step_size=0.25)
        assert loss.attack_eps_factor == 2.1
        assert parse_config(config.to_plain()) == config
    with pytest.raises(ConfigError, match="attack_eps_factor must be a finite number > 0"):
        parse_config(_method("cc_ibp", options={"attack_eps_factor": 0}))


def test_a_nested_mapping_changes_only_the_keys_it_names() -> None:
    # Madry et al.'s MNIST attack: 40 steps of 0.01 at eps 0.3. The keys left out keep the PGD
    # loss's default attack (random start, no early stop), not PGDConfig's own defaults.
    options = {"attack": {"steps": 40, "step_size": "1/30"}}
    loss = parse_config(_method("pgd", options=options)).loss.loss_config()
    assert loss.attack == PGDConfig(steps=40, step_size=1 / 30, random_start=True,
                                    early_stop=False)
    # SABR's attack keeps its decaying step schedule when only the steps change.
    sabr = parse_config(_method("sabr", options={"attack": {"steps": 3}})).loss.loss_config()
    assert sabr.attack == dataclasses.replace(SABRConfig().attack, steps=3)
    # Naming another class of a union starts from that class's defaults.
    fgsm = parse_config(_method("cc_ibp", options={"attack": {"type": "FGSMConfig"}}))
    assert fgsm.loss.loss_config().attack == FGSMConfig(step_size=10.0, random_start=True)
    pgd = parse_config(_method("cc_ibp", options={"attack": {"type": "PGDConfig"}}))
    assert pgd.loss.loss_config().attack == PGDConfig()


def test_warmup_regularisers_radius() -> None:
    assert parse_config(_method("ibp")).regularizers.warmup_eps == 1e-6
    for bad in (-1e-6, 2):
        with pytest.raises(ConfigError, match="warmup_eps must lie in"):
            parse_config({**_method("ibp"), "regularizers": {"warmup_eps": bad}})
