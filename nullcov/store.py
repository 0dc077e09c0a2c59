"""HDF5 files of statistics and projections: atomic writes, validated reads, provenance inside.

Layout: one group per layer module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``)
with one subgroup per linear (``to_q``, ``to_out``); the text files hold one group
``encoder_hidden_states``. A key is the slash-joined path, e.g. ``<layer>/to_q``. Root attributes:
``nullcov_kind`` and JSON ``provenance`` (plus ``step`` for per-timestep files). No pickle: only
numeric datasets and string attributes are written or read.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from nullcov.projection import NullSpace
from nullcov.statistics import Moments

TEXT_KEY = "encoder_hidden_states"
MOMENT_DATASETS = ("count", "sum", "sum_outer")
PROJECTION_DATASETS = ("P", "eigenvalues", "null_dim", "threshold")


class StatisticsFileError(ValueError):
    """A statistics or projection file is unreadable, incomplete or inconsistent."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success fsync it and rename it into place.

    A crash or error leaves no file at ``path`` (the temporary one is removed on error), so a
    file that exists is always complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _write(path, kind: str, attrs: dict, groups: dict[str, dict[str, np.ndarray]]) -> None:
    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as handle:
            handle.attrs["nullcov_kind"] = kind
            for name, value in attrs.items():
                handle.attrs[name] = json.dumps(value, sort_keys=True)
            for key in sorted(groups):
                group = handle.create_group(key)
                for name, value in groups[key].items():
                    group.create_dataset(name, data=value)


def _read(path, kind: str, datasets: tuple[str, ...], keys=None) -> tuple[dict[str, dict], dict]:
    path = Path(path)
    if not path.exists():
        raise StatisticsFileError(path, "file does not exist")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise StatisticsFileError(path, f"not a readable HDF5 file ({err})") from None
    with handle:
        found_kind = handle.attrs.get("nullcov_kind")
        if found_kind != kind:
            raise StatisticsFileError(path, f"expected a nullcov {kind!r} file, found kind {found_kind!r}")
        try:
            attrs = {name: json.loads(value) for name, value in handle.attrs.items() if name != "nullcov_kind"}
        except (TypeError, json.JSONDecodeError) as err:
            raise StatisticsFileError(path, f"attributes are not valid JSON ({err})") from None
        if "provenance" not in attrs:
            raise StatisticsFileError(path, "no provenance attribute")
        groups: dict[str, dict] = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and any(isinstance(obj.get(d), h5py.Dataset) for d in datasets):
                groups[name] = obj

        try:
            handle.visititems(visit)
            if not groups:
                raise StatisticsFileError(path, f"no groups holding {datasets}")
            if keys is not None:
                unknown = sorted(set(keys) - set(groups))
                if unknown:
                    raise StatisticsFileError(path, f"no group {unknown}; it holds {sorted(groups)}")
                groups = {key: groups[key] for key in keys}
            loaded = {}
            for key, group in groups.items():
                missing = [d for d in datasets if not isinstance(group.get(d), h5py.Dataset)]
                if missing:
                    raise StatisticsFileError(path, f"group {key!r} lacks dataset(s) {missing}")
                loaded[key] = {d: group[d][()] for d in datasets}
        except (OSError, RuntimeError, KeyError) as err:
            raise StatisticsFileError(path, f"corrupted HDF5 content ({err})") from None
    return loaded, attrs


def write_moments(path, kind: str, moments: dict[str, Moments], attrs: dict) -> None:
    """Write ``{key: Moments}`` (``kind`` is ``features`` or ``covariance``) atomically."""
    groups = {}
    for key, moment in moments.items():
        problems = moment.problems()
        if problems:
            raise StatisticsFileError(path, f"refusing to write {key!r}: {'; '.join(problems)}")
        groups[key] = {
            "count": np.int64(moment.count),
            "sum": moment.sum.astype(np.float64),
            "sum_outer": moment.sum_outer.astype(np.float64),
        }
    _write(path, kind, attrs, groups)


def read_moments(path, kind: str, keys=None) -> tuple[dict[str, Moments], dict]:
    """Read and validate a moments file (all groups, or ``keys``): dtypes, shapes, count > 0, finite sums."""
    loaded, attrs = _read(path, kind, MOMENT_DATASETS, keys)
    moments = {}
    for key, data in loaded.items():
        count = data["count"]
        if np.ndim(count) != 0 or not np.issubdtype(np.asarray(count).dtype, np.integer):
            raise StatisticsFileError(path, f"group {key!r}: count must be an integer scalar, got {count!r}")
        moment = Moments(count=int(count), sum=np.asarray(data["sum"]), sum_outer=np.asarray(data["sum_outer"]))
        problems = moment.problems()
        if problems:
            raise StatisticsFileError(path, f"group {key!r}: {'; '.join(problems)}")
        moments[key] = moment
    return moments, attrs


def write_projections(path, spaces: dict[str, NullSpace], attrs: dict) -> None:
    groups = {
        key: {
            "P": space.projection.astype(np.float32),
            "eigenvalues": space.eigenvalues.astype(np.float64),
            "null_dim": np.int64(space.null_dim),
            "threshold": np.float64(space.threshold),
        }
        for key, space in spaces.items()
    }
    _write(path, "projection", attrs, groups)


def read_projections(path, keys=None) -> tuple[dict[str, NullSpace], dict]:
    loaded, attrs = _read(path, "projection", PROJECTION_DATASETS, keys)
    spaces = {
        key: NullSpace(
            projection=np.asarray(data["P"]),
            eigenvalues=np.asarray(data["eigenvalues"]),
            null_dim=int(data["null_dim"]),
            threshold=float(data["threshold"]),
        )
        for key, data in loaded.items()
    }
    return spaces, attrs
