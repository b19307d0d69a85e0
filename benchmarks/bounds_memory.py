"""Peak memory of tightrope.bounds methods, each in a fresh process.

    python benchmarks/bounds_memory.py [--cases cnn7:32,cnn3:256] [--methods forward,ibp,...]

For every (model, batch, method) a child process builds the random eval-mode model and inputs
(as benchmarks/test_bounds_speed.py does), records its peak resident memory, runs the method
once under ``torch.no_grad`` (alpha-CROWN needs autograd for its slopes) and reports how far the
peak rose above that baseline, and the ratio to IBP's rise.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

METHODS = ("forward", "ibp", "crown_ibp", "crown_ibp_lower", "crown", "alpha_crown_ibp")
#: Full CROWN on CNN7 runs for tens of minutes on 2 cores; ask for it with --methods.
SKIPPED_BY_DEFAULT = {("cnn7", "crown")}


def child(model_name: str, batch: int, method: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from _models import random_eval_model

    from tightrope.bounds import Box, Intermediate, alpha_crown, crown, crown_ibp, ibp, margin_spec

    torch.set_num_threads(2)
    model, shape = random_eval_model(model_name)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *shape, generator=generator)
    spec = margin_spec(torch.randint(0, 10, (batch,), generator=generator), 10)
    box = Box.from_linf(x, 0.01)
    runs = {
        "forward": lambda: model(x),
        "ibp": lambda: ibp(model, box, spec),
        "crown_ibp": lambda: crown_ibp(model, box, spec),
        "crown_ibp_lower": lambda: crown_ibp(model, box, spec, upper=False),
        "crown": lambda: crown(model, box, spec),
        "alpha_crown_ibp": lambda: alpha_crown(model, box, spec, steps=20,
                                                       intermediate=Intermediate.IBP),
    }
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "alpha_crown_ibp":
        runs[method]()
    else:
        with torch.no_grad():
            runs[method]()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rise_mib": (after - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="cnn7:32,cnn3:256",
                        help="comma-separated model:batch pairs (models: cnn7, cnn3)")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: all, "
                        "but full CROWN only on CNN3)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    for case in args.cases.split(","):
        model_name, batch = case.split(":")
        rises: dict[str, float] = {}
        methods = args.methods.split(",") if args.methods else [
            m for m in METHODS if (model_name, m) not in SKIPPED_BY_DEFAULT
        ]
        for method in methods:
            done = subprocess.run(
                [sys.executable, __file__, "--child", model_name, batch, method],
                capture_output=True, text=True, check=True,
            )
            rises[method] = json.loads(done.stdout.strip().splitlines()[-1])["rise_mib"]
            ibp_rise = rises.get("ibp")
            ratio = f"{rises[method] / ibp_rise:7.1f}x IBP" if ibp_rise else ""
            print(f"{model_name} b{batch} {method:<16} peak +{rises[method]:9.1f} MiB {ratio}",
                  flush=True)


if __name__ == "__main__":
    main()
