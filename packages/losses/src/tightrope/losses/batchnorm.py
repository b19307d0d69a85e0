"""Which batch sets BatchNorm's statistics in the passes of one certified-training step.

A certified-training step runs several forward passes: the clean one, the adversarial one and the
bound propagation. With BatchNorm in train mode each pass would otherwise normalise by its own
batch. CTBench (Mao et al. 2023) lets the clean batch set the statistics that every other pass of
the step reuses; that is the default here. Attacks are not affected: they run with the model in
eval mode (running statistics), before the clean pass, as the papers do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum

import torch
from torch import Tensor, nn

__all__ = ["BatchNormPolicy", "clean_pass"]


class BatchNormPolicy(Enum):
    """How BatchNorm layers in train mode normalise the passes after the clean one.

    * ``CLEAN_BATCH`` — (default, CTBench convention) the clean forward pass runs in train mode
      (and updates the running statistics once); every later pass of the step — adversarial
      logits, IBP/CROWN bounds — normalises with that clean batch's mean and biased variance,
      which stay differentiable.
    * ``PER_PASS`` — every pass uses its own statistics: the adversarial pass those of the
      adversarial batch, the bound passes those of the box centres (see ``tightrope.bounds``).

    Models without BatchNorm, or in eval mode, behave identically under both.
    """

    CLEAN_BATCH = "clean_batch"
    PER_PASS = "per_pass"


def _batch_statistics_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or m.running_mean is None)
    ]


@contextmanager
def clean_pass(model: nn.Module, x: Tensor, policy: BatchNormPolicy) -> Iterator[Tensor]:
    """Run the clean forward pass of ``x: (B, *S)``; yield its ``(B, K)`` logits.

    Inside the block, under ``CLEAN_BATCH``, every BatchNorm layer that used batch statistics in
    the clean pass is in eval mode, with its running-statistics buffers replaced by the clean
    batch's (mean, biased variance) — which is what ``tightrope.bounds`` reads — and its forward
    (on that instance) normalising by them, differentiably. On exit the layers' modes, buffers
    and forward are restored, also when the block raises. The running statistics are updated
    once per step, by the clean pass. Under ``PER_PASS`` (or with no such layer) it is just
    ``model(x)``.

    Example::

        with clean_pass(model, x, BatchNormPolicy.CLEAN_BATCH) as logits:   # (B, K)
            adversarial_logits = model(x_adv)       # normalised like the clean batch
            margins = ibp(model, box, C).lower     # likewise
    """
    layers = _batch_statistics_layers(model)
    if policy is BatchNormPolicy.PER_PASS or not layers:
        yield model(x)
        return
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def capture(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        z = inputs[0]
        dims = [0, *range(2, z.dim())]
        captured[id(module)] = (z.mean(dim=dims), z.var(dim=dims, unbiased=False))

    handles = [layer.register_forward_pre_hook(capture) for layer in layers]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    layers = [layer for layer in layers if id(layer) in captured]  # skipped by the forward
    saved = [(layer, layer.training, layer.running_mean, layer.running_var) for layer in layers]
    try:
        for layer in layers:
            mean, var = captured[id(layer)]
            # tightrope.bounds reads an eval-mode layer's statistics from these buffers;
            # torch's batch_norm kernel cannot differentiate through them, so the layer's own
            # forward is replaced (on this instance only) by the same affine map.
            layer.running_mean = mean
            layer.running_var = var
            layer.training = False
            layer.forward = _normalise_with(layer, mean, var)  # type: ignore[method-assign,assignment]
        yield logits
    finally:
        for layer, training, running_mean, running_var in saved:
            layer.__dict__.pop("forward", None)
            layer.running_mean = running_mean
            layer.running_var = running_var
            layer.training = training


def _normalise_with(
    layer: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor
) -> Callable[[Tensor], Tensor]:
    def forward(z: Tensor) -> Tensor:
        shape = (1, -1, *([1] * (z.dim() - 2)))
        scale = torch.rsqrt(var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        out = (z - mean.view(shape)) * scale.view(shape)
        return out if layer.bias is None else out + layer.bias.view(shape)

    return forward
