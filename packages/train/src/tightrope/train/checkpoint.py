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

A file that cannot serve (truncated, not a PyTorch file, pickled Python objects, keys missing,
weights of the wrong shapes or not finite) raises :class:`CheckpointError`, a ``ValueError``
whose message names the file and the problem.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tightrope.train.models import build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1

# What every checkpoint holds (a dotted name is a key of a nested dict), and what resuming
# a run needs besides.
REQUIRED_KEYS = ("format", "model.name", "model.kwargs", "model.state_dict", "dataset.name",
                 "dataset.input_shape", "dataset.num_classes", "dataset.mean", "dataset.std",
                 "eps.train", "eps.test", "config", "epoch", "step")
RESUME_KEYS = ("batch", "optimizer.state", "optimizer.param_groups", "rng.loss", "progress",
               "best.metrics", "best.epoch", "last_metrics")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, truncated, not written by tightrope-train,
    incomplete, or holding weights that do not fit its model or are not finite. The message
    names the file and the problem."""


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
    while saving keeps its previous checkpoint.

    Raises:
        OSError: the file could not be written (a full disk, no permission); the message names
            it, the temporary file is removed and a previous ``path`` is left as it was.
    """
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    try:
        torch.save(dict(payload), temporary)
        os.replace(temporary, target)
    except OSError as error:
        _discard(temporary)
        raise OSError(error.errno, f"could not write {target}: "
                      f"{error.strerror or error}") from error
    except RuntimeError as error:
        # torch's zip writer reports a failed write (a full disk) as a RuntimeError such as
        # "unexpected pos 1234 vs 1180" or "file write failed".
        _discard(temporary)
        raise OSError(errno.EIO, f"could not write {target} (is the disk full?): "
                      f"{_first_line(error)}") from error
    except BaseException:
        _discard(temporary)
        raise


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu", *,
                    resume: bool = False, allow_non_finite: bool = False) -> Checkpoint:
    """Load a checkpoint written by the trainer and rebuild its model.

    Uses ``torch.load(path, weights_only=True)`` only. The model is returned in eval mode on
    ``map_location``.

    Args:
        resume: also require what resuming the run needs (optimizer, RNG and progress state).
        allow_non_finite: accept NaN or infinite weights (to inspect a diverged run).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) the file is unreadable or truncated, not a
            Tightrope training checkpoint, of a newer format, lacks keys (named), holds weights
            that do not fit its model (shapes named) or that are NaN/infinite (tensor named).
    """
    stored = _read(Path(path), map_location)
    keys = REQUIRED_KEYS + (RESUME_KEYS if resume else ())
    missing = list(dict.fromkeys(gap for key in keys if (gap := _missing(stored, key))))
    if missing:
        raise CheckpointError(
            f"{path}: not a complete tightrope-train checkpoint: missing {', '.join(missing)}; "
            "use another checkpoint of the run (best.pt) or start a new run"
        )
    if not isinstance(stored["format"], int) or stored["format"] > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {stored['format']!r}; this version "
                              f"reads up to {CHECKPOINT_FORMAT}: upgrade tightrope-train")
    spec = stored["model"]
    state = spec["state_dict"]
    if not isinstance(state, Mapping) or not all(
            isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: model.state_dict is not a mapping of tensors")
    if not allow_non_finite:
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"{path}: weight {name!r} holds NaN or infinite values (the run diverged "
                    "before it was saved); use an earlier checkpoint such as best.pt"
                )
    try:
        kwargs = dict(spec["kwargs"])
        model = build_model(str(spec["name"]), **kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its model {spec['name']!r} cannot be rebuilt from "
                              f"{spec['kwargs']!r}: {error}") from error
    first = next(iter(state.values()), None)
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        model = model.to(first.dtype)
    load_weights(model, state, source=str(path))
    if map_location is not None:
        model = model.to(map_location)
    model.eval()
    dataset = stored["dataset"]
    try:
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
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: a value of the wrong type ({error})") from error


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``model.load_state_dict(state)``, with a short error naming ``source`` when the weights do
    not fit the model.

    Raises:
        CheckpointError: keys missing or unexpected, or shapes that differ (the first few named).
    """
    expected = model.state_dict()
    problems = [f"{name} missing" for name in expected if name not in state]
    problems += [f"{name} unexpected" for name in state if name not in expected]
    problems += [f"{name} has shape {tuple(state[name].shape)}, the model needs "
                 f"{tuple(tensor.shape)}" for name, tensor in expected.items()
                 if name in state and state[name].shape != tensor.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source}: the stored weights do not fit the model: "
                              f"{'; '.join(problems[:3])}{more}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as error:
        raise CheckpointError(f"{source}: the stored weights do not fit the model: "
                              f"{_first_line(error)}") from error


def _read(path: Path, map_location: str | torch.device | None) -> Any:
    try:
        with warnings.catch_warnings():
            # Random bytes can look like a pickle of another protocol; the error follows anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            stored = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except IsADirectoryError as error:
        raise CheckpointError(f"{path} is a directory, not a checkpoint file") from error
    except PermissionError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror})") from error
    except Exception as error:
        # A damaged or foreign file fails inside torch.load in many ways (RuntimeError or
        # OSError EINVAL from the zip reader, EOFError, pickle.UnpicklingError, KeyError on a
        # text file, ...); none of them leaves anything to recover.
        raise CheckpointError(f"{path}: {_load_failure(path, error)}") from error
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: not a tightrope-train checkpoint (it holds a "
                              f"{type(stored).__name__}, not a dict)")
    return stored


def _load_failure(path: Path, error: Exception) -> str:
    # torch's own message advises loading with weights_only=False, i.e. running whatever code
    # the file carries: never repeat that; say what is wrong with the file instead.
    text = str(error)
    hostile = re.search(r"GLOBAL ([\w.]+)", text)
    if hostile is not None:
        return (f"refused: it holds pickled Python objects ({hostile.group(1)}), which can run "
                "code and which no tightrope-train checkpoint contains; do not load it, use a "
                "checkpoint written by tightrope-train")
    if path.is_file() and path.stat().st_size == 0:
        reason = "the file is empty"
    elif isinstance(error, EOFError):
        reason = "the file ends early"
    elif "weights only" in text.lower() or "weights_only" in text:
        reason = "it is not a pickle of tensors and plain containers"
    else:
        reason = f"{type(error).__name__}: {_first_line(error)}" if text else type(error).__name__
    return (f"unreadable checkpoint, truncated or not written by tightrope-train ({reason}); "
            "use another checkpoint of the run (best.pt) or start a new run")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    sentence = first.split(". ")[0]
    return sentence[:200]


def _missing(stored: Mapping[str, Any], dotted: str) -> str:
    """The shortest prefix of ``dotted`` absent from ``stored`` ("" when all is there), so that
    a missing section is named once rather than with each of its keys."""
    value: Any = stored
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(value, Mapping) or part not in value:
            return ".".join(parts[: depth + 1])
        value = value[part]
    return ""
