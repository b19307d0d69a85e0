"""Reference oracles for tests and verification: the triangle-relaxation LP (:func:`lp_bound`,
Wong & Kolter 2018) and the exact MILP (:func:`milp_bound`, Tjeng et al. 2019), both solved
with SciPy's HiGHS (``pip install tightrope-bounds[oracles]``; SciPy is imported on first use,
so ``tightrope.bounds`` imports without it)."""

from tightrope.bounds.lp import lp_bound
from tightrope.bounds.milp import (
    MilpMinimum,
    MilpSearch,
    MilpStatus,
    milp_bound,
    milp_fits,
    milp_minimum,
    milp_search,
)

__all__ = [
    "MilpMinimum", "MilpSearch", "MilpStatus", "lp_bound", "milp_bound", "milp_fits",
    "milp_minimum", "milp_search",
]
