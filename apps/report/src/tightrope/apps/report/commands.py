"""The commands that produced a run and its certifications.

``tightrope-train`` does not record its command line. When ``meta.json`` holds one (a
``command`` string or an ``argv`` list) it is used as it is; otherwise the command is rebuilt:
the config file under ``--configs`` (default ``configs/``) that, with ``key=value`` overrides,
resolves to exactly the run's ``config.yaml`` (checked with
:func:`tightrope.train.load_config`; the fewest overrides win), ``--out`` (the run's parent
directory), ``--device`` and ``torchrun`` from ``meta.json``. Options that leave no trace
(``--threads``, ``--quiet``, ``--no-compile``) are not reconstructed. A certification's command
comes from its ``run.json`` (``--chunk``, ``--device`` and ``--threads`` are not recorded there).
"""

from __future__ import annotations

import contextlib
import copy
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightrope.apps.report.inputs import Certification, Run

__all__ = ["Command", "certify_command", "display_path", "train_command"]


@dataclass(frozen=True, slots=True)
class Command:
    """A shell command and where it came from (``recorded`` or how it was rebuilt)."""

    text: str
    source: str


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _yaml_value(value: Any) -> str:
    import yaml

    text: str = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    if text.endswith("\n...\n"):  # a plain scalar document
        text = text[: -len("\n...\n")]
    return text.strip()


def _overrides(base: Mapping[str, Any], target: Mapping[str, Any], prefix: str = ""
               ) -> list[tuple[str, Any]] | None:
    """``key=value`` settings that turn ``base`` into ``target``; ``None`` when a key of
    ``base`` would have to be removed (an override cannot)."""
    found: list[tuple[str, Any]] = []
    if any(key not in target for key in base):
        return None
    for key, value in target.items():
        dotted = f"{prefix}{key}"
        if key in base and isinstance(base[key], Mapping) and isinstance(value, Mapping):
            nested = _overrides(base[key], value, dotted + ".")
            if nested is None:
                return None
            found.extend(nested)
        elif key not in base or base[key] != value:
            found.append((dotted, value))
    return found


def _match_config(run: Run, configs: Path) -> tuple[Path, list[str]] | None:
    """The config file under ``configs`` and overrides that reproduce ``run``'s config."""
    import yaml

    target = copy.deepcopy(dict(run.config))
    if isinstance(target.get("loss"), dict):
        target["loss"].pop("resolved", None)  # written for the record, not a config key
    best: tuple[int, str, Path, list[str]] | None = None
    for path in sorted(configs.rglob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        if not (isinstance(raw, dict) and isinstance(raw.get("data"), dict)
                and isinstance(raw.get("loss"), dict)
                and raw["data"].get("dataset") == run.dataset
                and raw["loss"].get("method") == run.method):
            continue
        overrides = _resolved_overrides(path, target)
        if overrides is not None and (best is None or (len(overrides), str(path)) < best[:2]):
            best = (len(overrides), str(path), path, overrides)
    return None if best is None else (best[2], best[3])


def _resolved_overrides(path: Path, target: Mapping[str, Any]) -> list[str] | None:
    from tightrope.train import load_config

    try:
        base = load_config(path, check_data=False).to_plain()
    except Exception:  # a file that is not a valid config for this version: no candidate
        return None
    differences = _overrides(base, target)
    if differences is None:
        return None
    overrides = [f"{key}={_yaml_value(value)}" for key, value in differences]
    with contextlib.suppress(Exception):
        if load_config(path, overrides, check_data=False).to_plain() == target:
            return overrides
    return None


def train_command(run: Run, configs: Path | None) -> Command:
    """The ``tightrope-train`` command of ``run``: recorded in ``meta.json``, or rebuilt from
    its config (matched against the files under ``configs``) and ``meta.json``."""
    recorded = run.meta.get("command")
    if isinstance(recorded, str):
        return Command(recorded, "recorded in meta.json")
    argv = run.meta.get("argv")
    if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
        return Command(shlex.join(argv), "recorded in meta.json")
    matched = _match_config(run, configs) if configs is not None and configs.is_dir() else None
    options = ["--out", str(run.path.parent)]
    world = run.meta.get("world_size", 1)
    device = run.meta.get("device")
    if isinstance(device, str):
        options += ["--device", device.split(":")[0] if world != 1 else device]
    if run.test is None:
        options.append("--no-test")
    where = f"under {configs}/" if configs is not None else "(no --configs)"
    if matched is None:
        text = (f"# not recorded, and no config {where} matches; train with "
                f"{run.path / 'config.yaml'} without its loss.resolved section")
        return Command(text, "not recorded; no matching config")
    path, overrides = matched
    command = shlex.join(["--config", str(path), *options, *overrides])
    if isinstance(world, int) and world > 1:
        command = f"torchrun --nproc-per-node {world} $(which tightrope-train) {command}"
    else:
        command = f"tightrope-train {command}"
    return Command(command, f"rebuilt from config.yaml ({path}"
                   + (f" + {len(overrides)} override(s)" if overrides else "")
                   + ") and meta.json; --threads not recorded")


def display_path(certification: Certification, run: Run) -> Path:
    """The certification directory relative to the run as given, when it lies inside it."""
    with contextlib.suppress(ValueError):
        return run.path / certification.path.resolve().relative_to(run.path.resolve())
    return certification.path


def certify_command(certification: Certification, run: Run) -> Command:
    """The ``tightrope-certify`` command of ``certification`` (from its ``run.json``)."""
    checkpoint = certification.checkpoint
    if checkpoint.parent.name == run.path.resolve().name:
        checkpoint = run.path / checkpoint.name
    parts = ["tightrope-certify", "--checkpoint", str(checkpoint), "--eps",
             _number(certification.eps)]
    if certification.start:
        parts += ["--start", str(certification.start)]
    parts += ["--samples", str(certification.end - certification.start),
              "--timeout", _number(certification.timeout)]
    if not certification.bab:
        parts.append("--no-bab")
    out = display_path(certification, run)
    parts += ["--out", str(out)]
    text = shlex.join(parts)
    if certification.shards > 1:
        n = certification.shards
        text = (f"{text} --shard i/{n}  # for i in 0..{n - 1}, or under torchrun\n"
                f"tightrope-certify merge {shlex.quote(str(out))}")
    return Command(text, "rebuilt from run.json; --chunk, --device, --threads not recorded")
