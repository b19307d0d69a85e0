"""Typed, frozen configuration of the verifier: the cascade, branch-and-bound and MILP mode."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

__all__ = [
    "BabConfig",
    "Branching",
    "InputSplit",
    "LayerOrder",
    "Mode",
    "SearchOrder",
    "VerifierConfig",
]


class Mode(enum.Enum):
    """What :func:`~tightrope.verify.verify` runs."""

    #: Attacks, then IBP -> CROWN -> alpha-CROWN -> branch-and-bound (complete given time).
    CASCADE = "cascade"
    #: The exact MILP of Tjeng et al. 2019 (HiGHS via SciPy): small networks only.
    MILP = "milp"


class Branching(enum.Enum):
    """How a ReLU subdomain picks the neuron to split."""

    #: BaBSR (Bunel et al. 2020): the unstable neuron whose upper-line intercept costs the
    #: bound most, read from the backward pass's coefficients.
    BABSR = "babsr"
    #: Filtered smart branching (De Palma et al. 2021): the top BaBSR candidates are each split
    #: and bounded (one batched pass); the neuron whose worse child is best wins.
    FSB = "fsb"


class LayerOrder(enum.Enum):
    """Which ReLU layers a subdomain's branching heuristic may choose from.

    The scores (BaBSR, and FSB's evaluation with the parent's pre-activation bounds) see only
    a neuron's direct effect on the output bound, which favours the last layers. Splitting an
    early neuron also tightens the pre-activation bounds of every later layer (the search
    refines them after each split), which the scores miss. On mnistfc 256x4 ``prop_0_0.03``
    (VNN-COMP 2021) the unsafe sets that ``SCORE`` left open after minutes closed in about a
    second each with ``SHALLOW_FIRST``; on the two-layer 256x2 network ``SCORE`` solved 30 of
    30 instances and ``SHALLOW_FIRST`` 28. Without that CROWN refinement (on graph networks,
    whose later boxes only get interval arithmetic after a split) the argument fails:
    on VNN-COMP 2021's ``resnet_2b`` ``prop_33`` the lowest bound stayed at -0.333 through 800
    subdomains with ``SHALLOW_FIRST``, and ``SCORE`` verified it with 93.
    """

    #: ``SHALLOW_FIRST`` on deep networks (``BabConfig.deep_layers``) whose later layers the
    #: search refines by CROWN after each split (chains), ``SCORE`` otherwise.
    AUTO = "auto"
    #: Any layer, by score alone.
    SCORE = "score"
    #: Only the shallowest layer that still has an unstable, unsplit neuron.
    SHALLOW_FIRST = "shallow_first"


class SearchOrder(enum.Enum):
    """Which subdomains the search bounds next."""

    #: Lowest bound first: the subdomains that decide the answer.
    BEST_FIRST = "best_first"
    #: Deepest first: bounded memory, quick dives to counterexamples.
    DEPTH_FIRST = "depth_first"


class InputSplit(enum.Enum):
    """When branch-and-bound splits the input box instead of ReLUs."""

    #: Input splitting when the input has at most ``BabConfig.input_split_max_dim`` dimensions.
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


#: ``BabConfig.fsb_candidates=None`` on shallow and on deep networks.
SHALLOW_FSB_CANDIDATES = 32
DEEP_FSB_CANDIDATES = 16
#: ``BabConfig.milp_after=None`` on shallow networks (deep ones never switch).
SHALLOW_MILP_AFTER = 0.2
#: ``BabConfig.split_refine=None`` on deep networks (shallow ones refine nothing).
DEEP_SPLIT_REFINE = 0.3


@dataclass(frozen=True, slots=True)
class BabConfig:
    """Branch-and-bound settings (Bunel et al. 2020; Wang et al. 2021).

    Attributes:
        batch_size: subdomains taken from the queue per bound call (each yields two children).
        branching: ReLU branching heuristic.
        fsb_candidates: candidates per subdomain that FSB evaluates (the best-scored
            neurons among those the layer order allows; each costs two children in one
            batched pass). ``None``: 32 on shallow networks, 16 on deep ones. Wide filters
            pay: on mnistfc 256x2 ``prop_1_0.03``, 32 candidates decided in about 15 s what
            4 left open after 300 s; on 256x4, where each candidate's pass crosses twice the
            layers, 16 verified ``prop_10_0.05`` in 186-224 s and 32 did not in 300 s.
        layer_order: which layers the branching heuristic chooses from (see
            :class:`LayerOrder`).
        deep_layers: networks with at least this many ReLU layers count as deep for the
            ``None``/``AUTO`` settings (:meth:`fsb_width`, :meth:`milp_share`,
            :meth:`refine_share`, :meth:`layers_to_split`).
        order: search order; best-first falls back to depth-first above ``max_domains``.
        max_domains: memory cap on queued subdomains.
        steps: alpha/beta ascent steps per bound call on new subdomains.
        lr_alpha, lr_beta: Adam learning rates of the lower slopes and split multipliers.
        refine_intermediate: recompute CROWN pre-activation bounds of the layers after a split
            (tighter, a backward pass per unstable neuron); on a graph network, rigorous
            interval bounds from the split-clamped boxes instead (cheap; they carry the
            splits to later ReLUs and max pooling inputs).
        input_split: when to split the input box instead of ReLUs.
        input_split_max_dim: input dimension at or below which ``InputSplit.AUTO`` splits inputs
            (bisecting a box halves one of its sides, so the number of sub-boxes a search
            needs grows with the input dimension; ReLU splitting is the better search above a
            few tens of inputs).
        attack_every: run a PGD attack biased by the queue's worst subdomains every this many
            iterations (0: never); input splitting attacks after every bound call unless 0
            (:mod:`tightrope.verify.input_bab`).
        milp_after: on networks small enough for the exact MILP (see ``milp_max_unstable``),
            the share of the time left when an unsafe set's search starts that
            branch-and-bound gets for it; the sets it leaves undecided then get one MILP
            each over the root's alpha-CROWN pre-activation bounds
            (``tightrope.bounds.milp_search``, the set's rows as constraints), solved
            concurrently in the time that remains. ``1.0``: never switch. ``None``: 0.2 on
            shallow networks, 1.0 on deep ones (on mnistfc 256x4, HiGHS finished none of the
            MILPs tried, with 164 and 182 binaries, in the time left; branch-and-bound
            verified ``prop_10_0.05`` when it kept all the time), and 0.2 on any network with
            max pooling (ReLU splits never make its relaxation exact, while the MILP encodes
            it exactly).
        milp_max_unstable: the switch is made only when the root has at most this many
            unstable ReLUs (one binary each) and SciPy is installed.
        split_refine: the share of the time left before branch-and-bound starts on a region
            that goes to tightening the pre-activation bounds of its hidden layers (all but
            the first and the last ReLU layer) by per-neuron branch-and-bound
            (:func:`tightrope.verify.refine.refine_by_splitting`); alpha-CROWN then bounds the
            open unsafe sets again before the search. ``0``: never. ``None``: 0.3 on deep
            networks, 0 on shallow ones (a network with two ReLU layers has no layer between
            them). On mnistfc 256x4 it took ``prop_10_0.05`` from 188 s to 64-68 s and
            decided ``prop_8_0.05`` (a timeout before) in 97 s in one of two runs; on 256x6 it
            decided ``prop_12_0.03`` and ``prop_0_0.03`` in 71 and 93 s, where the search
            alone timed out.
    """

    batch_size: int = 256
    branching: Branching = Branching.FSB
    fsb_candidates: int | None = None
    layer_order: LayerOrder = LayerOrder.AUTO
    deep_layers: int = 3
    order: SearchOrder = SearchOrder.BEST_FIRST
    max_domains: int = 200_000
    steps: int = 10
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    refine_intermediate: bool = True
    input_split: InputSplit = InputSplit.AUTO
    input_split_max_dim: int = 16
    attack_every: int = 10
    milp_after: float | None = None
    milp_max_unstable: int = 400
    split_refine: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.fsb_candidates is not None and self.fsb_candidates < 1:
            raise ValueError(f"fsb_candidates must be >= 1, got {self.fsb_candidates}")
        if self.max_domains < 2 * self.batch_size:
            raise ValueError(
                f"max_domains ({self.max_domains}) must be at least 2 * batch_size "
                f"({2 * self.batch_size})"
            )
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.milp_after is not None and not 0.0 < self.milp_after <= 1.0:
            raise ValueError(f"milp_after must lie in (0, 1], got {self.milp_after}")
        if self.split_refine is not None and not 0.0 <= self.split_refine < 1.0:
            raise ValueError(f"split_refine must lie in [0, 1), got {self.split_refine}")
        if self.deep_layers < 1:
            raise ValueError(f"deep_layers must be >= 1, got {self.deep_layers}")
        if self.milp_max_unstable < 0:
            raise ValueError(f"milp_max_unstable must be >= 0, got {self.milp_max_unstable}")
        if self.input_split_max_dim < 0:
            raise ValueError(f"input_split_max_dim must be >= 0, got {self.input_split_max_dim}")

    def is_deep(self, relu_layers: int) -> bool:
        """Whether a network with ``relu_layers`` ReLU layers gets the deep-network choices
        of the ``None``/``AUTO`` settings."""
        return relu_layers >= self.deep_layers

    def fsb_width(self, relu_layers: int) -> int:
        """``fsb_candidates`` for a network with ``relu_layers`` ReLU layers."""
        if self.fsb_candidates is not None:
            return self.fsb_candidates
        return DEEP_FSB_CANDIDATES if self.is_deep(relu_layers) else SHALLOW_FSB_CANDIDATES

    def milp_share(self, relu_layers: int, max_pooling: bool = False) -> float:
        """``milp_after`` for a network with ``relu_layers`` ReLU layers (and max pooling
        ops when ``max_pooling``)."""
        if self.milp_after is not None:
            return self.milp_after
        if max_pooling:
            return SHALLOW_MILP_AFTER
        return 1.0 if self.is_deep(relu_layers) else SHALLOW_MILP_AFTER

    def refine_share(self, relu_layers: int) -> float:
        """``split_refine`` for a network with ``relu_layers`` ReLU layers."""
        if self.split_refine is not None:
            return self.split_refine
        return DEEP_SPLIT_REFINE if self.is_deep(relu_layers) else 0.0

    def layers_to_split(self, relu_layers: int, crown_refined: bool = True) -> LayerOrder:
        """``layer_order`` for a network with ``relu_layers`` ReLU layers (never ``AUTO``);
        ``crown_refined``: whether the search refines later layers by CROWN after a split
        (see :class:`LayerOrder`)."""
        if self.layer_order is not LayerOrder.AUTO:
            return self.layer_order
        deep = self.is_deep(relu_layers) and crown_refined and self.refine_intermediate
        return LayerOrder.SHALLOW_FIRST if deep else LayerOrder.SCORE


@dataclass(frozen=True, slots=True)
class VerifierConfig:
    """Settings of :func:`~tightrope.verify.verify` and :func:`~tightrope.verify.certify`.

    Attributes:
        mode: the cascade (default) or the exact MILP.
        attack_steps, attack_restarts: the cheap PGD stage.
        strong_attack_steps, strong_attack_restarts: the attack run before branch-and-bound.
        alpha_steps, alpha_lr: the alpha-CROWN stage (and the root of branch-and-bound).
        optimise_intermediate: in the alpha-CROWN stage, also optimise the slopes for the
            pre-activation bounds of every layer (tighter roots for branch-and-bound).
        margin: a bound certifies only when, with its rigorous rounding error subtracted
            (:mod:`tightrope.bounds.rounding`), it still exceeds this margin.
        dtype: the dtype of everything that can close a sample or subdomain: pre-activation
            boxes and the rigorous dual bounds (a copy of the model; ``None``: the model's own
            dtype). The searches (attacks, slope and multiplier ascent, branching) run in the
            model's dtype. In float32 the rigorous rounding error is about ``1e-4`` to
            ``1e-2`` of the magnitudes involved and closes few subdomains; in float64 it is
            negligible on ordinary networks.
        bab: branch-and-bound settings (``None``: stop after alpha-CROWN and the attacks).
        milp_time_limit: seconds per MILP in ``Mode.MILP`` (``None``: the call's timeout).
        seed: seed of the attacks' ``torch.Generator``.
    """

    mode: Mode = Mode.CASCADE
    attack_steps: int = 20
    attack_restarts: int = 8
    strong_attack_steps: int = 100
    strong_attack_restarts: int = 64
    alpha_steps: int = 20
    alpha_lr: float = 0.1
    optimise_intermediate: bool = True
    margin: float = 1e-5
    dtype: torch.dtype | None = torch.float64
    bab: BabConfig | None = field(default_factory=BabConfig)
    milp_time_limit: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("attack_steps", "attack_restarts", "strong_attack_steps",
                     "strong_attack_restarts", "alpha_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype or None, got {self.dtype}")
        if self.alpha_lr <= 0:
            raise ValueError(f"alpha_lr must be positive, got {self.alpha_lr}")
