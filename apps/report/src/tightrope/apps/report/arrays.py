"""Arrays saved by experiment scripts for ``--histogram``: a ``.npz`` file (one array per key,
as ``numpy.savez`` writes it) or a ``.json`` object mapping each name to a list of numbers
(nested lists are flattened)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tightrope.apps.report.inputs import ReportError, read_json

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["load_arrays"]


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [item for element in value for item in _flatten(element)]
    return [value]


def _as_numbers(value: Any, path: Path, key: str) -> NDArray[np.float64]:
    items = _flatten(value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        raise ReportError(f"{path}: {key!r} is not a list of numbers")
    return np.asarray(items, dtype=np.float64)


def load_arrays(path: Path) -> dict[str, NDArray[np.float64]]:
    """The named arrays of ``path`` as flat float64 arrays, in the file's order."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file (--histogram takes a .npz or .json file)")
    suffix = path.suffix.lower()
    arrays: dict[str, NDArray[np.float64]] = {}
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                for key in data.files:
                    if data[key].dtype.kind not in "biuf":
                        raise ReportError(f"{path}: array {key!r} holds {data[key].dtype}, "
                                          "not numbers")
                    arrays[key] = np.asarray(data[key], dtype=np.float64).ravel()
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
            if isinstance(error, ReportError):
                raise
            raise ReportError(f"{path}: not a readable .npz file ({error})") from error
    elif suffix == ".json":
        data = read_json(path, "a JSON object mapping names to lists of numbers")
        arrays = {str(key): _as_numbers(value, path, str(key)) for key, value in data.items()}
    else:
        raise ReportError(f"{path}: --histogram takes a .npz or .json file")
    if not any(array.size for array in arrays.values()):
        raise ReportError(f"{path}: holds no values")
    return arrays
