"""A residual network (``resnet`` of tightrope.train) trains with certified losses and is
certified from its checkpoint: the graph form end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tightrope.apps.certify.cli import main as certify_main
from tightrope.apps.train.cli import main as train_main
from tightrope.bounds import Box, crown, ibp, margin_spec
from tightrope.bounds.network import lower
from tightrope.train import build_model

CONFIG = """\
epochs: 1
precision: float64
data: {{dataset: synthetic, batch_size: 32, validation_size: 32, synthetic_size: 256}}
model: {{name: resnet, options: {{width: 2, linear_width: 16, batch_norm: true}}}}
loss: {{method: {method}{options}}}
eps: {{train: 0.02, test: 0.02, warmup_epochs: 0, ramp_epochs: 1}}
optim: {{lr: 0.005}}
evaluation: {{pgd_steps: 2}}
"""

OPTIONS = {"ibp": "", "sabr": "", "mtl_ibp": ", options: {alpha: 0.5}"}


def test_the_residual_models_are_graphs_with_exact_forward_bounds() -> None:
    for name in ("resnet2b", "resnet4b"):
        model = build_model(name, in_channels=3, input_size=32, num_classes=10,
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).double().eval()
        x = torch.rand((2, 3, 32, 32), dtype=torch.float64)
        net = lower(model, x[:0])
        assert not net.is_chain
        point = Box(x, x)
        C = margin_spec(torch.tensor([0, 1]), 10)
        with torch.no_grad():
            margins = torch.einsum("bkn,bn->bk", C.double(), model(x))
            for method in (ibp, crown):
                torch.testing.assert_close(method(model, point, C).lower, margins)


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_residual_model_trains_and_certifies_from_its_checkpoint(
    tmp_path: Path, method: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(method=method, options=OPTIONS[method]))
    assert train_main(["--config", str(config), "--out", str(tmp_path / "runs"), "--device",
                       "cpu", "--quiet", "--threads", "1"]) == 0
    torch.set_flush_denormal(False)
    (checkpoint,) = list((tmp_path / "runs").glob("*/best.pt"))
    out = tmp_path / "cert"
    assert certify_main(["--checkpoint", str(checkpoint), "--samples", "16", "--timeout", "2",
                         "--quiet", "--threads", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 16
    assert sum(summary["counts"].values()) == 16
    assert sum(summary["stages"].values()) == 16
    # One epoch at eps 0.02 proves some samples by the bound stages.
    verified = {stage: n for stage, n in summary["stages"].items()
                if stage in ("ibp", "crown", "alpha_crown", "bab", "milp")}
    assert sum(verified.values()) >= 1, summary
    assert verified.get("bab", 0) == 0  # branch-and-bound takes chains so far
