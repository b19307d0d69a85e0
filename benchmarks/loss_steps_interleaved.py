"""One certified-training step per method of tightrope.losses, the methods interleaved.

    python benchmarks/loss_steps_interleaved.py [--rounds 3] [--batch 128]
                                                [--methods standard,ibp,crown_ibp] [--eager]
                                                [--keep-denormals]

The same steps as ``test_losses_step.py`` (CNN7 of Shi et al. 2021, CIFAR shape, BatchNorm in
train mode, IBP initialisation, eps 2/255, each method with its paper defaults; loss, backward,
gradient clipping, Adam), but every round runs one step of every method in turn, so that the
drift of a shared machine over minutes hits all methods alike instead of whichever ran last;
pytest-benchmark runs one method's rounds back to back. Each method trains its own copy of the
model. One step per method before the rounds compiles the kernels (``compile_kernels``, as
``tightrope-train`` does; ``--eager`` turns that off). Denormals are flushed to zero as
``tightrope-train`` does (``flush_denormals``; ``--keep-denormals`` keeps them).

Prints the median step per method and its ratio to the standard and the IBP step, and the
whole-run cost of CROWN-IBP relative to IBP over the published CIFAR-10 schedule (160 epochs:
1 of standard warm-up, 80 of eps ramp where CROWN-IBP has ``beta > 0``, 79 at full eps where its
step is an IBP step): ``(s + 80 c + 79 i) / (s + 159 i)``. Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _steps import loss_step

from tightrope.bounds import compile_kernels, flush_denormals, keep_freed_memory
from tightrope.losses import METHODS

#: Targets of the losses issue, as ratios to the IBP step (standard: IBP <= 3x standard).
TARGETS = {"cc_ibp": 2.0, "mtl_ibp": 2.0, "exp_ibp": 2.0, "sabr": 2.5, "crown_ibp": 3.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=None,
                        help="comma-separated method names (default: all but wong_kolter)")
    parser.add_argument("--eager", action="store_true", help="do not compile the kernels")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormals to zero (tightrope-train flushes them)")
    args = parser.parse_args()
    # First, before any parallel operation (worker threads inherit the setting).
    flushed = False if args.keep_denormals else flush_denormals()
    names = (args.methods.split(",") if args.methods
             else [name for name in sorted(METHODS) if name != "wong_kolter"])
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    for required in ("standard", "ibp"):
        if required not in names:
            names.insert(0, required)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    compile_kernels(not args.eager, after_elements=0)

    steps = {name: loss_step(name, args.batch) for name in names}
    for step in steps.values():  # warm-up: compilation, allocator
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.rounds}: "
              + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in names), flush=True)

    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    standard, ibp = medians["standard"], medians["ibp"]
    print(f"\nCNN7, batch {args.batch}, {args.threads} threads, median of {args.rounds} "
          f"interleaved rounds ({'eager' if args.eager else 'compiled'} kernels, denormals "
          f"{'flushed' if flushed else 'kept'})")
    print(f"{'method':<14}{'ms':>10}{'x standard':>12}{'x IBP':>8}  target")
    for name in sorted(names, key=lambda n: medians[n]):
        ratio = medians[name] / ibp
        if name == "ibp":
            target = f"<= 3.0x standard: {'met' if ibp <= 3 * standard else 'not met'}"
        elif name in TARGETS:
            target = f"<= {TARGETS[name]}x IBP: {'met' if ratio <= TARGETS[name] else 'not met'}"
        else:
            target = ""
        print(f"{name:<14}{medians[name]:>10.0f}{medians[name] / standard:>12.2f}"
              f"{ratio:>8.2f}  {target}")
    if "crown_ibp" in medians:
        crown_ibp = medians["crown_ibp"]
        whole = (standard + 80 * crown_ibp + 79 * ibp) / (standard + 159 * ibp)
        print(f"CROWN-IBP over the published schedule: {whole:.2f}x an IBP run")


if __name__ == "__main__":
    main()
