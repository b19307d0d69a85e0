#!/usr/bin/env bash
# Install tightrope-bounds (not editable) into a fresh virtual environment that has only torch,
# and check that it imports and bounds a network with no other Tightrope package present.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$env_dir")"' EXIT
"${PYTHON:-python3}" -m venv "$env_dir"
pip=("$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" packages/bounds
"$env_dir/bin/python" - <<'PY'
import importlib.util

import torch
from torch import nn

from tightrope.bounds import Box, crown, ibp, margin_spec

for other in ("attacks", "losses", "verify", "train"):
    assert importlib.util.find_spec(f"tightrope.{other}") is None, f"tightrope.{other} is present"
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
x = torch.rand(2, 1, 2, 2)
labels = torch.tensor([0, 2])
spec = margin_spec(labels, 3)
box = Box.from_linf(x, 0.05)
interval, linear = ibp(model, box, spec), crown(model, box, spec)
# Both bounds must hold at every sampled point of the box (CROWN need not beat IBP everywhere).
points = x.unsqueeze(1) + 0.05 * (2 * torch.rand(2, 512, 1, 2, 2) - 1)
with torch.no_grad():
    logits = model(points.reshape(-1, 1, 2, 2)).reshape(2, 512, 3)
margins = torch.einsum("bsk,bck->bsc", logits, spec).amin(dim=1)
assert bool((interval.lower <= margins + 1e-6).all()), "IBP bound exceeds a sampled margin"
assert bool((linear.lower <= margins + 1e-6).all()), "CROWN bound exceeds a sampled margin"
print("tightrope-bounds alone: ok", tuple(linear.lower.shape))
PY
