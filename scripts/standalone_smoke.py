"""Smoke test of one installed Tightrope library package, alone with its declared dependencies.

Run by ``scripts/check_standalone.sh`` with the interpreter of a fresh environment that holds
the package's wheel, the wheels of the Tightrope packages it declares, and what pip resolved
for them, nothing else:

    python -I scripts/standalone_smoke.py PACKAGE VERSION [SIBLING ...]

``PACKAGE`` is ``bounds``, ``attacks``, ``losses``, ``verify`` or ``train``; ``VERSION`` the one
``hatch version`` read from its ``__about__.py``; the siblings are the Tightrope packages the
environment was given. First the environment is checked (the package's declared Tightrope
requirements are exactly the siblings, no other Tightrope package is importable, the package is
imported from the environment and not from the source tree), then a few calls of its public
API are checked for properties, not values. Everything runs on CPU in float64 in seconds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import itertools
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

# torch warns on import when NumPy is missing; only tightrope-train declares NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
from torch import nn  # noqa: E402

PACKAGES = ("bounds", "attacks", "losses", "verify", "train")


class SmokeError(AssertionError):
    """A check failed; the message says which and what was seen."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def requirement_name(requirement: str) -> str:
    """The normalised project name at the start of a ``Requires-Dist`` line."""
    name = requirement.split(";")[0]
    for stop in "<>=!~[( ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def check_environment(package: str, version: str, siblings: set[str]) -> None:
    distribution = f"tightrope-{package}"
    installed = {
        name
        for dist in importlib.metadata.distributions()
        if (name := requirement_name(dist.metadata["Name"] or "")).startswith("tightrope-")
    }
    expected = {distribution} | {f"tightrope-{s}" for s in siblings}
    check(installed == expected, f"installed Tightrope distributions {sorted(installed)}, "
                                 f"expected {sorted(expected)}")
    declared = {
        name
        for requirement in importlib.metadata.requires(distribution) or []
        if "extra ==" not in requirement
        and (name := requirement_name(requirement)).startswith("tightrope-")
    }
    check(declared == expected - {distribution},
          f"{distribution} declares {sorted(declared)}, the check expects "
          f"{sorted(expected - {distribution})}: update the table in check_standalone.sh")
    check(importlib.metadata.version(distribution) == version,
          f"{distribution} installed as {importlib.metadata.version(distribution)}, "
          f"hatch version said {version}")
    for other in PACKAGES:
        if other != package and other not in siblings:
            check(importlib.util.find_spec(f"tightrope.{other}") is None,
                  f"tightrope.{other} is importable next to {distribution}")
    module = importlib.import_module(f"tightrope.{package}")
    check(module.__version__ == version, f"tightrope.{package}.__version__ is "
                                         f"{module.__version__}, expected {version}")
    origin = Path(module.__file__ or "").resolve()
    check(origin.is_relative_to(Path(sys.prefix).resolve()),
          f"tightrope.{package} imported from {origin}, outside the environment {sys.prefix}")


def mlp(*sizes: int) -> nn.Sequential:
    """A float64 ReLU MLP in eval mode with the given layer widths."""
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).double().eval()


def smoke_bounds() -> str:
    """IBP, CROWN and alpha-CROWN margin bounds hold at 512 sampled points of each box; the LP
    oracle, whose SciPy is an extra, says how to install it."""
    from tightrope.bounds import Box, alpha_crown, crown, ibp, lp_bound, margin_spec

    torch.manual_seed(0)
    model = mlp(4, 8, 8, 3)
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    spec = margin_spec(torch.tensor([0, 2]), 3, dtype=torch.float64)
    box = Box.from_linf(x, 0.05)
    points = box.lower.unsqueeze(1) + (box.upper - box.lower).unsqueeze(1) * torch.rand(
        2, 512, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        logits = model(points.reshape(-1, 1, 2, 2)).reshape(2, 512, 3)
    margins = torch.einsum("bsk,bck->bsc", logits, spec)
    for name, bound in (("ibp", ibp(model, box, spec)), ("crown", crown(model, box, spec)),
                        ("alpha_crown", alpha_crown(model, box, spec, steps=5))):
        check(bool((bound.lower <= margins.amin(dim=1) + 1e-9).all()),
              f"{name}'s lower bound exceeds a sampled margin")
        check(bool((bound.upper >= margins.amax(dim=1) - 1e-9).all()),
              f"{name}'s upper bound is below a sampled margin")
    check(importlib.util.find_spec("scipy") is None, "SciPy is present without [oracles]")
    try:
        lp_bound(model, Box(box.lower[:1], box.upper[:1]), spec[:1])
    except ImportError as error:
        check("tightrope-bounds[oracles]" in str(error), f"unhelpful ImportError: {error}")
    else:
        raise SmokeError("lp_bound ran without SciPy")
    return "IBP, CROWN, alpha-CROWN sound at 1,024 points; lp_bound asks for [oracles]"


def smoke_attacks() -> str:
    """PGD and APGD find the misclassified point of a linear model inside the box."""
    from tightrope.attacks import apgd, pgd

    # Logits (x0, x1): the label 0 at (0.55, 0.45) falls where x1 >= x0, e.g. at (0.45, 0.55).
    model = nn.Sequential(nn.Linear(2, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2, dtype=torch.float64))
        model[0].bias.zero_()
    x = torch.tensor([[0.55, 0.45], [0.9, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 0])
    eps = 0.1
    for name, attack in (("pgd", pgd), ("apgd", apgd)):
        result = attack(model, x, y, eps, generator=torch.Generator().manual_seed(0))
        inside = ((result.x_adv - x).abs() <= eps + 1e-12).all(dim=1)
        in_domain = ((result.x_adv >= 0) & (result.x_adv <= 1)).all(dim=1)
        check(bool(inside.all() and in_domain.all()), f"{name} left the box")
        check(result.success.tolist() == [True, False],
              f"{name} success {result.success.tolist()}, expected [True, False]")
        with torch.no_grad():
            check(int(model(result.x_adv[:1]).argmax()) != 0,
                  f"{name}'s point is still classified correctly")
    return "PGD and APGD break the breakable sample inside the box, not the robust one"


def smoke_losses() -> str:
    """The IBP loss bounds the clean cross-entropy from above; IBP and MTL-IBP losses are finite
    and give finite gradients to every parameter."""
    from tightrope.losses import IBPLoss, MTLIBPConfig, MTLIBPLoss, StandardLoss

    torch.manual_seed(0)
    model = mlp(4, 16, 3)
    x = torch.rand(8, 1, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    eps = 0.05
    natural = StandardLoss()(model, x, y, eps).loss.detach()
    losses = (("ibp", IBPLoss()),
              ("mtl_ibp", MTLIBPLoss(MTLIBPConfig(alpha=0.5),
                                      generator=torch.Generator().manual_seed(0))))
    for name, loss in losses:
        model.zero_grad()
        out = loss(model, x, y, eps)
        value = float(out.loss.detach())
        check(math.isfinite(value), f"{name} loss is {value}")
        check(value >= float(natural) - 1e-9,
              f"{name} loss {value} below the clean cross-entropy {float(natural)}")
        out.loss.backward()
        for parameter_name, parameter in model.named_parameters():
            grad = parameter.grad
            check(grad is not None and bool(torch.isfinite(grad).all()),
                  f"{name}: no finite gradient for {parameter_name}")
    return "IBP and MTL-IBP losses >= clean CE, finite, with finite gradients"


def smoke_verify() -> str:
    """A network with ``z0 - z1 = 1.5 (x0 - x1)`` is verified robust at radius 0.1 around
    (0.8, 0.2) and falsified, with a checked counterexample, at radius 0.4."""
    from tightrope.verify import VerifyStatus, robustness_spec, verify

    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.5]]))
        model[2].bias.zero_()
    x = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    robust = verify(model, robustness_spec(x, 0, 0.1, 2), timeout=30.0)
    check(robust.status is VerifyStatus.VERIFIED, f"radius 0.1: {robust.status}, expected "
                                                  "VERIFIED (margin >= 0.6)")
    spec = robustness_spec(x, 0, 0.4, 2)
    broken = verify(model, spec, timeout=30.0)
    check(broken.status is VerifyStatus.FALSIFIED, f"radius 0.4: {broken.status}, expected "
                                                   "FALSIFIED (margin down to -0.3)")
    example = broken.counterexample
    if example is None:
        raise SmokeError("FALSIFIED without a counterexample")
    with torch.no_grad():
        output = model(example.to(torch.float64))
    check(spec.violated_by(example, output), f"{example.tolist()} is no counterexample")
    return (f"verified at 0.1 ({robust.stage.name}), falsified at 0.4 ({broken.stage.name}) "
            "with a checked counterexample")


def smoke_train() -> str:
    """Two epochs of IBP training of a small CNN3 on the synthetic set from a YAML config; the
    run directory holds the config, metrics, TensorBoard events and checkpoints, and the last
    checkpoint rebuilds the trained model."""
    from tightrope.train import Trainer, load_checkpoint, load_config

    config_text = """\
epochs: 2
seed: 0
precision: float64
data: {dataset: synthetic, batch_size: 16, validation_size: 16, synthetic_size: 64,
       eval_batch_size: 32}
model: {name: cnn3, options: {width: 4}}
loss: {method: ibp}
eps: {train: 0.05, warmup_epochs: 1, ramp_epochs: 1}
evaluation: {pgd_steps: 2}
"""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.yaml"
        path.write_text(config_text)
        trainer = Trainer(load_config(path), run_dir=Path(folder) / "run")
        result = trainer.fit()
        run = Path(folder) / "run"
        check(trainer.step == 2 * len(trainer.train_loader) > 0, f"{trainer.step} steps")
        check(bool(result.last) and all(math.isfinite(v) for v in result.last.values()),
              f"validation metrics {result.last}")
        for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt"):
            check((run / name).is_file(), f"the run directory lacks {name}")
        check(any((run / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events")
        checkpoint = load_checkpoint(run / "last.pt")
        x = torch.rand(4, 1, 12, 12, dtype=torch.float64)
        trainer.model.eval()
        with torch.no_grad():
            same = torch.equal(checkpoint.model(x), trainer.model(x))
        check(same, "the last checkpoint's model differs from the trained one")
    return (f"{trainer.step} IBP steps of CNN3 on synthetic data, checkpoint reloads "
            f"(clean accuracy {result.last.get('clean_accuracy', float('nan')):.2f})")


SMOKE: dict[str, Callable[[], str]] = {
    "bounds": smoke_bounds,
    "attacks": smoke_attacks,
    "losses": smoke_losses,
    "verify": smoke_verify,
    "train": smoke_train,
}


def main(arguments: list[str]) -> int:
    if len(arguments) < 2 or arguments[0] not in SMOKE:
        print(__doc__, file=sys.stderr)
        return 2
    package, version, siblings = arguments[0], arguments[1], set(arguments[2:])
    torch.set_num_threads(1)  # tiny tensors: threads only add start-up and contention
    try:
        check_environment(package, version, siblings)
        summary = SMOKE[package]()
    except SmokeError as error:
        print(f"tightrope-{package}: FAILED: {error}", file=sys.stderr)
        return 1
    print(f"tightrope-{package} {version} alone: ok: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
