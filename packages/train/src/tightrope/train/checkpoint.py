"""Checkpoints that rebuild their model: plain containers of tensors and primitives, loaded with
``torch.load(..., weights_only=True)`` (no pickled code runs).

A checkpoint file is a dict with the keys ``format``, ``model`` (``name``, ``kwargs``,
``state_dict``), ``dataset`` (``name``, ``input_shape``, ``num_classes``, ``mean``, ``std``),
``eps`` (``train``, ``test``), ``config`` (the resolved :class:`~tightrope.train.TrainConfig` as
plain values), ``epoch`` (completed epochs), ``step`` (optimiser steps done), ``batch`` (batches
done in the current epoch), ``versions`` and, for resumption, ``optimizer``, ``rng``,
``progress`` (the epoch's running sums) and ``best``.

Example (what ``tightrope-certify`` does)::

    from tightrope.train import load_checkpoint, load_test_split

    ckpt = load_checkpoint("runs/xyz/best.pt", map_location="cpu")
    x, y = load_test_split(ckpt.dataset)           # (N, C, H, W) in [0, 1], (N,)
    logits = ckpt.model(x[:8])                      # eval mode
    eps = ckpt.test_eps
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightrope.train.models import build_model

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the rebuilt ``nn.Sequential`` with the stored weights, in eval mode, on the
            requested device; its first layer is ``Normalize`` (inputs in ``[0, 1]``).
        model_name, model_kwargs: how :func:`tightrope.train.build_model` rebuilds it.
        dataset: the data set's name (``"fashion_mnist"``; pass it to
            :func:`tightrope.train.load_test_split`).
        input_shape: one input ``(C, H, W)``.
        num_classes: number of classes ``K``.
        mean, std: the normalisation inside the model (per channel).
        train_eps, test_eps: the eps trained at and the eps to certify at (pixel units).
        config: the resolved training config as plain values.
        epoch: completed epochs; step: optimiser steps done.
        versions: package versions of the run.
        raw: the whole stored dict (optimizer and RNG states, for resumption).
    """

    model: nn.Sequential
    model_name: str
    model_kwargs: Mapping[str, Any]
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_eps: float
    test_eps: float
    config: Mapping[str, Any]
    epoch: int
    step: int
    versions: Mapping[str, str]
    raw: Mapping[str, Any]


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` atomically (a temporary file renamed over ``path``), so a run killed
    while saving keeps its previous checkpoint."""
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    torch.save(dict(payload), temporary)
    os.replace(temporary, target)


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu"
                    ) -> Checkpoint:
    """Load a checkpoint written by the trainer and rebuild its model.

    Uses ``torch.load(path, weights_only=True)`` only. The model is returned in eval mode on
    ``map_location``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a Tightrope training checkpoint (or of a newer format).
    """
    stored = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(stored, dict) or stored.get("format") is None or "model" not in stored:
        raise ValueError(f"{path} is not a tightrope-train checkpoint")
    if stored["format"] > CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {stored['format']}; this version reads "
                         f"up to {CHECKPOINT_FORMAT}: upgrade tightrope-train")
    spec = stored["model"]
    kwargs = dict(spec["kwargs"])
    model = build_model(spec["name"], **kwargs)
    state = spec["state_dict"]
    first = next(iter(state.values()), None)
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        model = model.to(first.dtype)
    model.load_state_dict(state)
    if map_location is not None:
        model = model.to(map_location)
    model.eval()
    dataset = stored["dataset"]
    return Checkpoint(
        model=model,
        model_name=str(spec["name"]),
        model_kwargs=kwargs,
        dataset=str(dataset["name"]),
        input_shape=tuple(int(v) for v in dataset["input_shape"]),
        num_classes=int(dataset["num_classes"]),
        mean=tuple(float(v) for v in dataset["mean"]),
        std=tuple(float(v) for v in dataset["std"]),
        train_eps=float(stored["eps"]["train"]),
        test_eps=float(stored["eps"]["test"]),
        config=stored["config"],
        epoch=int(stored["epoch"]),
        step=int(stored["step"]),
        versions=dict(stored.get("versions", {})),
        raw=stored,
    )
