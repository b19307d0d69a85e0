"""fold_batchnorm: eval-mode BatchNorm folded into the layer before it computes the same
function, leaves the model untouched, and attacks on the folded model find what they find on
the original."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tightrope.attacks import ModelMode, PGDConfig, fold_batchnorm, frozen_model, pgd


def _model(affine: bool = True, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=bias), nn.BatchNorm2d(4, affine=affine),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8, bias=bias), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 3), nn.BatchNorm1d(3),
    ).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.2, 3.0)
            if module.affine:
                nn.init.uniform_(module.weight, -2.0, 2.0)
                nn.init.uniform_(module.bias, -1.0, 1.0)
    return model.eval()


@pytest.mark.parametrize(("affine", "bias"), [(True, True), (False, False)])
def test_folded_model_computes_the_same_function(affine: bool, bias: bool) -> None:
    model = _model(affine, bias)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(5, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "model left as it was"


def test_nothing_to_fold_returns_the_model_itself() -> None:
    model = _model()
    assert fold_batchnorm(model.train()) is model  # train-mode BatchNorm uses batch statistics
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert fold_batchnorm(plain) is plain
    untracked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    assert fold_batchnorm(untracked.eval()) is untracked
    reflect = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                            nn.BatchNorm2d(2)).eval()
    assert fold_batchnorm(reflect) is reflect
    other = nn.ModuleList([nn.Linear(2, 2)])
    assert fold_batchnorm(other) is other


def test_attacks_run_on_the_folded_model_in_eval_mode_only() -> None:
    model = _model()
    with frozen_model(model) as attacked:
        assert attacked is not model
        assert not any(isinstance(m, nn.BatchNorm2d) for m in attacked.modules())
    with frozen_model(model, mode=ModelMode.KEEP) as attacked:
        assert attacked is model


class Unfolded(nn.Module):
    """The model behind a wrapper that fold_batchnorm does not look into."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


def test_pgd_on_the_folded_model_finds_what_it_finds_on_the_original() -> None:
    model = _model()
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(16, 2, 8, 8, dtype=torch.float64, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    config = PGDConfig(steps=5, random_start=False)
    found = pgd(model, x, y, 0.1, config=config)
    reference = pgd(Unfolded(model), x, y, 0.1, config=config)
    assert fold_batchnorm(Unfolded(model)).__class__ is Unfolded
    torch.testing.assert_close(found.x_adv, reference.x_adv, rtol=0, atol=1e-12)
    assert torch.equal(found.success, reference.success)
    with torch.no_grad():  # success is judged by the model's own logits
        logits = model(found.x_adv)
    broken = logits.argmax(1) != y
    assert bool((broken <= found.success).all())
