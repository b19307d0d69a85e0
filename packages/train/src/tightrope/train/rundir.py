"""The run directory: resolved config, provenance (git SHA, package versions), ``metrics.csv``
and TensorBoard events.

Layout of a run directory::

    config.yaml     the resolved config (every default filled in, the loss's full config too)
    meta.json       git SHA, package versions, torch/CUDA, device, world size, start time,
                    the model-selection rule and CROWN-IBP's beta/kappa schedules in use
    metrics.csv     one row per epoch: schedule values, training means, validation accuracies
    tensorboard/    the same scalars for ``tensorboard --logdir <run>/tensorboard``
    last.pt         the latest checkpoint (end of epoch, or every ``checkpoint.every_steps``)
    best.pt         the epoch the run's model-selection rule keeps once eps is full (the last,
                    or the best on the validation split by verified or TAPS accuracy)
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tightrope.train.config import TrainConfig
from tightrope.train.structured import to_plain

__all__ = ["MetricsTable", "create_run_dir", "git_sha", "package_versions", "write_provenance",
           "write_text_atomic"]

PACKAGES = ("tightrope-bounds", "tightrope-attacks", "tightrope-losses", "tightrope-train",
            "tightrope-train-app", "torch", "numpy", "pyyaml", "tensorboard")


def package_versions() -> dict[str, str]:
    """Installed versions of Tightrope's packages and its main dependencies."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha(where: Path | None = None) -> str | None:
    """The commit checked out at ``where`` (default: this file's repository), with ``-dirty``
    when tracked files changed; ``None`` outside a git work tree."""
    folder = where if where is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=folder, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def create_run_dir(out: str | Path, config: TrainConfig) -> Path:
    """A new directory ``<out>/<dataset>-<method>-<model>-<UTC time>`` (a suffix keeps it
    unique).

    Raises:
        OSError: ``out`` cannot hold it (a file, not writable); ``filename`` names the path.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"{config.data.dataset.value}-{config.loss.method}-{config.model.name}-{stamp}"
    base = Path(out)
    if base.exists() and not base.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(base))
    base.mkdir(parents=True, exist_ok=True)
    candidate, suffix = base / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base / f"{name}-{suffix}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file renamed over ``path``, so that a failed write (a full
    disk) leaves the previous file, and no temporary file, behind.

    Raises:
        OSError: the write failed; the message names ``path``.
    """
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text, newline="")
        temporary.replace(path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"could not write {path}: "
                          f"{error.strerror or error}") from error
        raise


def write_provenance(run_dir: Path, config: TrainConfig, extra: Mapping[str, Any]) -> None:
    """Write ``config.yaml`` (with the loss's resolved config) and ``meta.json``."""
    import yaml

    plain = config.to_plain()
    plain["loss"]["resolved"] = {
        "type": type(config.loss.loss_config()).__name__,
        **to_plain(config.loss.loss_config()),
    }
    meta = {
        "git_sha": git_sha(),
        "versions": package_versions(),
        "torch_cuda": torch.version.cuda,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    write_text_atomic(run_dir / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    # config.yaml last: the trainer takes its presence for written provenance (on resume).
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(plain, sort_keys=False))


class MetricsTable:
    """``metrics.csv``: one row per epoch; the columns are the union of every row's keys (the
    file is rewritten whole, so a column appearing later, e.g. the ramp's regulariser terms,
    still gets a header)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def load(self, keep_epochs_up_to: int) -> None:
        """Read an existing file, keeping the rows of epochs ``<= keep_epochs_up_to`` (resume)."""
        self.rows = []
        if not self.path.is_file():
            return
        with open(self.path, newline="") as handle:
            for row in csv.DictReader(handle):
                if int(row["epoch"]) <= keep_epochs_up_to:
                    self.rows.append(dict(row))
        self.write()

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self.write()

    def columns(self) -> Sequence[str]:
        names: list[str] = []
        for row in self.rows:
            names.extend(key for key in row if key not in names)
        return names

    def write(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(self.columns()))
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, text.getvalue())
