"""tightrope.bounds: sound bound propagation for ReLU networks.

Pure functions ``method(model, box, C=None, ...) -> Box`` bound ``C f(x)`` (or ``f(x)``) for
every ``x`` in an input box:

* :func:`ibp` — interval bound propagation (Gowal et al. 2018);
* :func:`crown` — backward linear relaxation (Zhang et al. 2018), with CROWN or IBP
  intermediate bounds (:class:`Intermediate`) and a :class:`LowerSlope` policy;
* :func:`crown_ibp` — CROWN-IBP (Zhang et al. 2020);
* :func:`alpha_crown` — CROWN with optimised lower slopes (Xu et al. 2021);
* :func:`linear_bounds` — the linear functions behind ``crown``;
* :mod:`tightrope.bounds.beta` — beta-CROWN bounds on branch-and-bound subdomains with ReLU
  split constraints (Wang et al. 2021), batched over subdomains;
* :func:`relax` — ``crown``'s relaxation with the lower slopes left to the caller;
* :func:`sound_interval`, :func:`dual_lower` — bounds with their own rigorous rounding error
  subtracted, the only ones a verifier should close anything with (:mod:`.certificate`,
  :mod:`.rounding`);
* :func:`lp_bound`, :func:`milp_bound` — LP (triangle relaxation) and exact MILP oracles
  solved with SciPy's HiGHS (``pip install tightrope-bounds[oracles]``); :func:`milp_search`
  answers with a :class:`MilpStatus`, and :func:`milp_fits` says whether a network is small
  enough for the MILP;
* :func:`prepare` (-> :class:`Problem`), :func:`tail_bounds` — the argument checks and lowering
  every bound function starts with, and the interval bound of ``C f`` from the trailing affine
  block's input, for losses that run their own interval pass (SABR's shrunk ReLUs).

Example::

    import torch
    from tightrope.bounds import Box, margin_spec, crown

    box = Box.from_linf(x, eps=0.1)                  # x: (B, 1, 28, 28) in [0, 1]
    margins = crown(model, box, margin_spec(y, 10))  # (B, 9) bounds on z_y - z_j
    verified = (margins.lower > 0).all(dim=1)
"""

from tightrope.bounds.__about__ import __version__
from tightrope.bounds.alpha import alpha_crown
from tightrope.bounds.beta import (
    SplitBound,
    apply_splits,
    certified_split_bound,
    empty_subdomains,
    optimise_pre_activations,
    optimise_split_bound,
    refine_pre_activations,
    split_lower_bound,
)
from tightrope.bounds.certificate import dual_lower, sound_interval
from tightrope.bounds.core import Box, LinearBounds, margin_spec
from tightrope.bounds.fused import compile_kernels, kernels_compiled
from tightrope.bounds.interval import IntervalTrace, ibp, ibp_trace, tail_bounds
from tightrope.bounds.linear import (
    Intermediate,
    crown,
    crown_ibp,
    linear_bounds,
    pre_activation_bounds,
)
from tightrope.bounds.modules import Add, Concat, Elementwise, Normalize, Pad, Permute, Reshape
from tightrope.bounds.network import Affine, Network, affine_rule, lower, supported_layers
from tightrope.bounds.oracles import (
    MilpMinimum,
    MilpSearch,
    MilpStatus,
    lp_bound,
    milp_bound,
    milp_fits,
    milp_minimum,
    milp_search,
)
from tightrope.bounds.problem import Problem, prepare
from tightrope.bounds.relaxation import LowerSlope
from tightrope.bounds.relaxed import Relaxed, relax
from tightrope.bounds.rounding import Rounding, rounding, sound_lower, unit_roundoff
from tightrope.bounds.runtime import flush_denormals, keep_freed_memory

__all__ = [
    "Add",
    "Affine",
    "Box",
    "Concat",
    "Elementwise",
    "Intermediate",
    "IntervalTrace",
    "LinearBounds",
    "LowerSlope",
    "MilpMinimum",
    "MilpSearch",
    "MilpStatus",
    "Network",
    "Normalize",
    "Pad",
    "Permute",
    "Problem",
    "Relaxed",
    "Reshape",
    "Rounding",
    "SplitBound",
    "__version__",
    "affine_rule",
    "alpha_crown",
    "apply_splits",
    "certified_split_bound",
    "compile_kernels",
    "crown",
    "crown_ibp",
    "dual_lower",
    "empty_subdomains",
    "flush_denormals",
    "ibp",
    "ibp_trace",
    "keep_freed_memory",
    "kernels_compiled",
    "linear_bounds",
    "lower",
    "lp_bound",
    "margin_spec",
    "milp_bound",
    "milp_fits",
    "milp_minimum",
    "milp_search",
    "optimise_pre_activations",
    "optimise_split_bound",
    "pre_activation_bounds",
    "prepare",
    "refine_pre_activations",
    "relax",
    "rounding",
    "sound_interval",
    "sound_lower",
    "split_lower_bound",
    "supported_layers",
    "tail_bounds",
    "unit_roundoff",
]
