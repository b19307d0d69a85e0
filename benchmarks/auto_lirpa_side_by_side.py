"""tightrope.bounds and auto_LiRPA side by side, in one process, on the same models and inputs.

    python benchmarks/auto_lirpa_side_by_side.py [--rounds 10] [--cases cnn7-b32,cnn3-b256]
                                                 [--keep-freed-memory] [--compile]

auto_LiRPA is not a dependency of this project: install it from source into the environment
that runs this script (with ``--no-deps`` next to a pinned CPU torch), together with
``tightrope-bounds``. Nothing here is collected by pytest (the name does not start ``test_``).

For every case (random eval-mode CNN3/CNN7 from ``_models.py``, eps 0.01 clipped to [0, 1], 9
margin rows) the script times, under ``torch.no_grad``, one plain forward pass and each method
of both libraries: tightrope's ``ibp`` / ``crown_ibp`` / ``crown`` against auto_LiRPA's
``compute_bounds`` with ``IBP`` / ``CROWN-IBP`` / ``CROWN`` (lower and upper bounds on both
sides). The two libraries alternate inside every round so that machine noise hits both alike;
each is called twice in a row and timed the second time, in its steady state (see
``interleaved``). The forward pass runs in the same rotation: each method's "x fwd" divides by
the forward pass of its own rounds. The "forward" row is the forward pass timed on its own.
auto_LiRPA's ``BoundedModule`` is built once per case, outside the timings; its construction
time is printed separately. Each method then reports how the two results compare, whether both
lower bounds lie below margins sampled inside the box, and whether auto_LiRPA's ReLU
pre-activation bounds contain the pre-activations at the box centre.

auto_LiRPA bounds convolutions in its default ``conv_mode="patches"``. The check of its
intermediate bounds is printed per method; in the runs of 2026-11-22 (auto_LiRPA commit
a050a3d, torch 2.13 CPU) its full-CROWN ReLU input bounds on CNN3 (whose first layer subtracts a
per-channel mean) did not contain the centre's pre-activations, and its CROWN bounds then
differed from tightrope's in both directions. For reference, CROWN is also run on the first
``MATRIX_CHECK`` samples with ``conv_mode="matrix"`` (there the checks passed and the bounds
equalled tightrope's up to float rounding); the full batch in matrix mode needs tens of GB, so
it is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _models import random_eval_model

import tightrope.bounds as tb

try:
    import auto_LiRPA
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm
except ImportError as error:  # pragma: no cover - depends on the environment
    sys.exit(
        f"auto_LiRPA could not be imported ({error}): install auto_LiRPA from source into this "
        "environment; it is not a dependency of this project."
    )

EPS = 0.01
CLASSES = 10
#: Random points per sample (besides the centre) at which both lower bounds are checked.
SAMPLES = 8
#: Samples for the untimed auto_LiRPA ``conv_mode="matrix"`` CROWN reference.
MATRIX_CHECK = 16


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    #: (tightrope name, auto_LiRPA method, rounds or None for --rounds)
    methods: tuple[tuple[str, str, int | None], ...]

    @property
    def name(self) -> str:
        return f"{self.model}-b{self.batch}"


FAST = (("ibp", "IBP", None), ("crown_ibp", "CROWN-IBP", None))
#: Full CROWN costs a backward pass per layer; on CNN7 it takes minutes, so CNN3 only.
CASES = {
    "cnn7-b32": Case("cnn7", 32, FAST),
    "cnn3-b256": Case("cnn3", 256, (*FAST, ("crown", "CROWN", 2))),
    "cnn7-b128": Case("cnn7", 128, FAST),
}
DEFAULT_CASES = ("cnn7-b32", "cnn3-b256")
TIGHTROPE = {"ibp": tb.ibp, "crown_ibp": tb.crown_ibp, "crown": tb.crown}


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """One warm-up call each, then ``rounds`` rounds in which every run is called twice in a
    row and timed the second time (the order turning by one each round); the median
    milliseconds of each.

    The untimed first call absorbs what the previous run left behind: right after one of
    auto_LiRPA's calls, the next call of anything ran up to a third slower than in steady
    state on 2026-12-04 (auto_LiRPA's CROWN-IBP faults in 0.5-1.2 M pages per call, and the
    next call then faulted in more too), so timing the first call would charge one library for
    the other's footprint.
    """
    names = list(runs)
    for name in names:
        runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name]()
            times[name].append(seconds(runs[name]))
    return {name: median_ms(t) for name, t in times.items()}


def sampled_margin_min(model: torch.nn.Module, box: tb.Box, C: torch.Tensor) -> torch.Tensor:
    """Minimum over the box centre and ``SAMPLES`` uniform points of ``C f(x)``: ``(B, K)``."""
    generator = torch.Generator().manual_seed(2)
    points = [box.lower + (box.upper - box.lower) * 0.5]
    points += [
        box.lower + (box.upper - box.lower) * torch.rand(box.lower.shape, generator=generator)
        for _ in range(SAMPLES)
    ]
    best = None
    for x in points:
        margins = torch.einsum("bkn,bn->bk", C, model(x))
        best = margins if best is None else torch.minimum(best, margins)
    assert best is not None
    return best


def relu_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every ``nn.ReLU`` of ``model`` at ``x``, in execution order."""
    found: list[torch.Tensor] = []
    handles = [
        module.register_forward_hook(lambda _m, args, _out: found.append(args[0].detach()))
        for module in model.modules()
        if isinstance(module, torch.nn.ReLU)
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return found


def check_auto_lirpa_intermediates(
    case: str, method: str, bounded: BoundedModule, centre_pre: list[torch.Tensor]
) -> None:
    """Whether the ReLU input bounds auto_LiRPA just computed contain ``centre_pre``."""
    relus = [node for node in bounded.nodes() if type(node).__name__ == "BoundRelu"]
    worst = []
    for node, z in zip(relus, centre_pre, strict=True):
        lower, upper = node.inputs[0].lower, node.inputs[0].upper
        if lower is None or upper is None or lower.shape != z.shape:
            print(f"[{case}] {method:<9} auto_LiRPA ReLU input bounds of {node.name}: "
                  "not available in the centre's shape, not checked")
            return
        worst.append(torch.maximum(lower - z, z - upper).max().item())
    verdict = "ok" if max(worst, default=0.0) <= 1e-4 else "VIOLATED"
    print(f"[{case}] {method:<9} auto_LiRPA ReLU input bounds vs centre pre-activations, worst "
          f"excess per ReLU: {', '.join(f'{w:+.2e}' for w in worst)} ({verdict})")


def matrix_mode_reference(
    case: str, model: torch.nn.Module, box: tb.Box, C: torch.Tensor
) -> None:
    """Untimed: auto_LiRPA CROWN with ``conv_mode="matrix"`` on the first samples, against
    tightrope's CROWN on the same samples."""
    k = min(MATRIX_CHECK, box.lower.shape[0])
    sub = tb.Box(box.lower[:k], box.upper[:k])
    bounded = BoundedModule(model, torch.zeros_like(sub.lower), bound_opts={"conv_mode": "matrix"},
                            device="cpu")
    bounded.eval()
    centre = (sub.lower + sub.upper) / 2
    perturbed = BoundedTensor(
        centre, PerturbationLpNorm(norm=float("inf"), x_L=sub.lower, x_U=sub.upper)
    )
    lower, upper = bounded.compute_bounds(x=(perturbed,), C=C[:k], method="CROWN")
    ours = tb.crown(model, sub, C[:k])
    check_auto_lirpa_intermediates(case, "crown/mtx", bounded, relu_inputs(model, centre))
    print(f"[{case}] crown/mtx (first {k} samples, conv_mode='matrix', untimed) tightrope - "
          f"auto_LiRPA: lower max {(ours.lower - lower).max().item():+.3e} "
          f"min {(ours.lower - lower).min().item():+.3e} | upper (auto_LiRPA - tightrope) "
          f"max {(upper - ours.upper).max().item():+.3e} "
          f"min {(upper - ours.upper).min().item():+.3e}")


def run_case(case: Case, rounds: int) -> list[tuple[str, str, float, float, float]]:
    model, shape = random_eval_model(case.model)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(case.batch, *shape, generator=generator)
    y = torch.randint(0, CLASSES, (case.batch,), generator=generator)
    C = tb.margin_spec(y, CLASSES)
    box = tb.Box.from_linf(x, EPS)

    start = time.perf_counter()
    bounded = BoundedModule(model, torch.zeros_like(x), device="cpu")
    bounded.eval()
    built = time.perf_counter() - start
    print(f"\n[{case.name}] auto_LiRPA BoundedModule construction: {1000 * built:.0f} ms "
          "(once, not in the timings)")
    perturbed = BoundedTensor(
        x, PerturbationLpNorm(norm=float("inf"), x_L=box.lower, x_U=box.upper)
    )

    rows = []
    with torch.no_grad():
        forward = interleaved({"forward": lambda: model(x)}, max(rounds, 5))["forward"]
        rows.append((case.name, "forward", forward, forward, forward))
        sampled = sampled_margin_min(model, box, C)
        centre_pre = relu_inputs(model, (box.lower + box.upper) / 2)
        for ours, theirs, method_rounds in case.methods:
            tightrope_fn = TIGHTROPE[ours]

            def run_tightrope(fn: Callable[..., tb.Box] = tightrope_fn) -> tb.Box:
                return fn(model, box, C)

            def run_auto_lirpa(method: str = theirs) -> tuple[torch.Tensor, torch.Tensor]:
                return bounded.compute_bounds(
                    x=(perturbed,), C=C, method=method, bound_lower=True, bound_upper=True
                )

            n = rounds if method_rounds is None else method_rounds
            ms = interleaved({"forward": lambda: model(x), "tightrope": run_tightrope,
                              "auto_LiRPA": run_auto_lirpa}, n)
            rows.append((case.name, ours, ms["tightrope"], ms["auto_LiRPA"], ms["forward"]))
            compare(case.name, ours, run_tightrope(), run_auto_lirpa(), sampled, n)
            check_auto_lirpa_intermediates(case.name, ours, bounded, centre_pre)
            if theirs == "CROWN":
                matrix_mode_reference(case.name, model, box, C)
    return rows


def compare(
    case: str,
    method: str,
    ours: tb.Box,
    theirs: tuple[torch.Tensor, torch.Tensor],
    sampled: torch.Tensor,
    rounds: int,
) -> None:
    """Print how far the two bounds differ (positive: tightrope tighter) and the soundness
    check against sampled margins."""
    lower, upper = theirs
    assert lower.shape == ours.lower.shape == upper.shape, (lower.shape, ours.lower.shape)
    d_lower = ours.lower - lower  # > 0: tightrope's lower bound is tighter
    d_upper = upper - ours.upper  # > 0: tightrope's upper bound is tighter
    scale = torch.maximum(ours.lower.abs().max(), ours.upper.abs().max()).item()
    relative = max(d_lower.abs().max().item(), d_upper.abs().max().item()) / max(scale, 1e-30)
    print(
        f"[{case}] {method:<9} ({rounds} rounds) tightrope - auto_LiRPA: "
        f"lower max {d_lower.max().item():+.3e} min {d_lower.min().item():+.3e} "
        f"mean {d_lower.mean().item():+.3e} | "
        f"upper (auto_LiRPA - tightrope) max {d_upper.max().item():+.3e} "
        f"min {d_upper.min().item():+.3e} mean {d_upper.mean().item():+.3e} | "
        f"max |difference| / max |bound| {relative:.1e}"
    )
    tolerance = 1e-4
    for name, low in (("tightrope", ours.lower), ("auto_LiRPA", lower)):
        excess = (low - sampled).max().item()
        verdict = "ok" if excess <= tolerance else "UNSOUND"
        print(f"[{case}] {method:<9} {name} lower - sampled margin min: max {excess:+.3e} "
              f"({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10,
                        help="timed rounds for forward, IBP and CROWN-IBP (CROWN always runs 2)")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call tightrope.bounds.keep_freed_memory() first (process-wide "
                             "glibc setting, affects both libraries alike)")
    parser.add_argument("--compile", action="store_true",
                        help="call tightrope.bounds.compile_kernels(after_elements=0) first: "
                             "tightrope's ReLU step of the backward pass compiled by "
                             "torch.compile (compiled during the warm-up round)")
    args = parser.parse_args()
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    torch.set_num_threads(2)
    kept = tb.keep_freed_memory() if args.keep_freed_memory else False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"tightrope-bounds {tb.__version__}; auto_LiRPA {auto_LiRPA.__version__} "
          f"({Path(auto_LiRPA.__file__).parent})")
    print("keep_freed_memory: "
          + (f"called (applied: {kept})" if args.keep_freed_memory else "not called (default)"))
    compiled = tb.compile_kernels(after_elements=0) if args.compile else False
    print("compile_kernels: "
          + (f"called (in use: {compiled})" if args.compile else "not called (default)"))
    print(f"eps {EPS} (box clipped to [0, 1]), {CLASSES - 1} margin rows, median of "
          f"{args.rounds} rounds after 1 warm-up (CROWN: 2 rounds)")

    rows = []
    for name in names:
        rows += run_case(CASES[name], args.rounds)

    header = (f"{'case':<10} {'method':<10} {'fwd ms':>7} {'tightrope ms':>13} {'x fwd':>8} "
              f"{'auto_LiRPA ms':>14} {'x fwd':>8} {'tr/aL':>7}")
    print("\n" + header)
    print("-" * len(header))
    for case, method, ours, theirs, forward in rows:
        if method == "forward":
            print(f"{case:<10} {method:<10} {forward:>7.2f} {ours:>13.2f} {1:>8.2f} "
                  f"{theirs:>14.2f} {1:>8.2f} {'':>7}")
            continue
        print(f"{case:<10} {method:<10} {forward:>7.2f} {ours:>13.2f} {ours / forward:>8.2f} "
              f"{theirs:>14.2f} {theirs / forward:>8.2f} {ours / theirs:>7.2f}")


if __name__ == "__main__":
    main()
