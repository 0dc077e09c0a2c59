"""HDF5 files of statistics and projections: atomic writes, checksummed and validated reads, provenance inside.

Layout: one group per layer module path (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``)
with one subgroup per linear (``to_q``, ``to_out``); the text files hold one group
``encoder_hidden_states`` (:data:`nullcov.models.family.TEXT_KEY`). A key is the slash-joined path, e.g.
``<layer>/to_q`` (:func:`nullcov.models.family.statistic_key`). Root attributes:
``nullcov_kind``, ``nullcov_format`` and JSON ``provenance`` (plus ``step`` for per-timestep files).
No pickle: only numeric datasets and string attributes are written or read.

Format 2 (this one): every dataset is chunked and carries HDF5's Fletcher32 checksum, verified
on every read, so a flipped byte stops the reader (naming the file and the command that
regenerates it); scalars are stored as 1-element arrays so that they are checksummed too.
Moments groups hold ``count`` [1] (int64), ``shift`` [d], ``sum`` [d] = ``Σ(x - shift)`` and
``sum_outer`` [d(d+1)/2] = the upper triangle (row-major, ``numpy.triu_indices``) of
``Σ(x - shift)(x - shift)ᵀ``, all float64: half the bytes of the full matrix, read back full.
Files without checksums (format 1, written by older nullcov) are refused.

Other HDF5 files of a run (the attention maps, kind ``attention``) are named float arrays with the
same attributes, checksums and checks (:func:`write_arrays`, :func:`read_arrays`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from nullcov.docs import see
from nullcov.files import atomic_path
from nullcov.layout import GROUP_PREFIX, SHARD_PREFIX
from nullcov.statistics.moments import Moments
from nullcov.statistics.projection import NullSpace

FORMAT = 2
MOMENT_DATASETS = ("count", "shift", "sum", "sum_outer")
PROJECTION_DATASETS = ("P", "eigenvalues", "null_dim", "threshold")
# The dtype each dataset must have (checked from the metadata, before any data is read).
_DTYPES = {"count": np.int64, "shift": np.float64, "sum": np.float64, "sum_outer": np.float64,
           "P": np.float32, "eigenvalues": np.float64, "null_dim": np.int64, "threshold": np.float64}
_CHUNK_BYTES = 1 << 20  # chunk size of the checksummed datasets (Fletcher32 is per chunk)
# HDF5 overhead of one moments file, measured: root attributes (provenance) excluded. Used by
# moments_file_bytes; tests/statistics/test_store_merge.py checks the estimate against written files.
_FILE_BYTES = 8192
_GROUP_BYTES = 11264


class StatisticsFileError(ValueError):
    """A statistics or projection file is unreadable, incomplete or inconsistent."""

    def __init__(self, path, problem: str, pointer: str = ""):
        self.path = str(path)
        self.problem = problem
        self.pointer = pointer  # the pointer to its troubleshooting entry (nullcov.docs), kept last by merge hints
        super().__init__(f"{self.path}: {problem}{pointer}")


#: The pointer of the errors that mean a file is damaged (or not a nullcov file of that kind).
CORRUPTED = see("statistics-file-is-corrupted")


def regenerate_command(path) -> str:
    """The command that rewrites ``path``: its job's output is the folder for shard and
    partial-sum files (``shard_*``, ``group_*``), the file itself otherwise."""
    path = Path(path)
    target = path.parent if path.parent.name.startswith((SHARD_PREFIX, GROUP_PREFIX)) else path
    return f"snakemake --cores all --force {target}"


@functools.lru_cache(maxsize=8)
def _triangle(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(dim)


def pack_symmetric(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle of a square matrix, row-major (``d(d+1)/2`` values)."""
    return matrix[_triangle(matrix.shape[0])]


def unpack_symmetric(packed: np.ndarray) -> np.ndarray:
    """The full symmetric matrix from its packed upper triangle."""
    dim = int((np.sqrt(8 * packed.shape[0] + 1) - 1) / 2)
    if packed.ndim != 1 or dim * (dim + 1) // 2 != packed.shape[0]:
        raise ValueError(f"{packed.shape} is not the shape of a packed triangle")
    rows, cols = _triangle(dim)
    full = np.empty((dim, dim), dtype=packed.dtype)
    full[rows, cols] = packed
    full[cols, rows] = packed
    return full


def _checksummed(group: h5py.Group, name: str, value) -> None:
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.reshape(1)
    # Equal chunks of at most _CHUNK_BYTES (HDF5 stores a partial last chunk at full size).
    limit = max(1, _CHUNK_BYTES // max(1, value[0:1].nbytes))
    chunks = -(-value.shape[0] // limit)
    rows = max(1, -(-value.shape[0] // chunks))
    group.create_dataset(name, data=value, chunks=(rows, *value.shape[1:]), fletcher32=True)


def moments_file_bytes(dims: dict[str, int]) -> int:
    """Bytes on disk of one moments file (shard, partial sum or merged) whose keys have ``dims``:
    count, shift, sum and the packed float64 ``sum_outer`` per key, plus HDF5 overhead (the
    provenance attribute, which grows with the shard's prompt text, is not included)."""
    data = sum(8 + 16 * d + 4 * d * (d + 1) for d in dims.values())
    return _FILE_BYTES + _GROUP_BYTES * len(dims) + data


def _attrs_sha256(texts: dict[str, str]) -> str:
    """Checksum of the file's attributes (Fletcher32 covers datasets only)."""
    return hashlib.sha256(json.dumps(sorted(texts.items())).encode()).hexdigest()


def _write(path, kind: str, attrs: dict, groups: dict[str, dict[str, np.ndarray]]) -> None:
    size = _FILE_BYTES + sum(_GROUP_BYTES + sum(np.asarray(value).nbytes for value in arrays.values())
                             for arrays in groups.values())
    with atomic_path(path, size) as temporary, h5py.File(temporary, "w") as handle:
        texts = {"nullcov_kind": kind, "nullcov_format": json.dumps(FORMAT)}
        texts |= {name: json.dumps(value, sort_keys=True) for name, value in attrs.items()}
        for name, text in texts.items():
            handle.attrs[name] = text
        handle.attrs["nullcov_attrs_sha256"] = _attrs_sha256(texts)
        for key in sorted(groups):
            group = handle.require_group(key) if key else handle
            for name, value in groups[key].items():
                _checksummed(group, name, value)


def _load(path, key: str, group: h5py.Group, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    present = [d for d in names if isinstance(group.get(d), h5py.Dataset)]
    for name in present:  # dtypes first: a foreign file's object datasets are refused before anything else
        dataset = group[name]
        if dataset.dtype != _DTYPES[name]:
            raise StatisticsFileError(
                path, f"group {key!r}: dataset {name!r} has dtype {dataset.dtype}, expected {np.dtype(_DTYPES[name])} "
                f"(sums must be float64); regenerate it with: {regenerate_command(path)}",
                see("dataset-is-not-float64"))
    for name in present:
        if not group[name].fletcher32:
            raise StatisticsFileError(
                path, f"group {key!r}: dataset {name!r} carries no checksum (a file of an older nullcov, or not "
                f"written by nullcov); regenerate it with: {regenerate_command(path)} (after upgrading "
                "nullcov, regenerate every result at once: snakemake --cores all --forceall)",
                see("statistics-file-of-an-older-nullcov"))
    missing = [d for d in names if d not in present]
    if missing:
        raise StatisticsFileError(path, f"group {key!r} lacks dataset(s) {missing}", CORRUPTED)
    loaded = {}
    for name in names:
        try:
            loaded[name] = group[name][()]
        except OSError as err:
            raise StatisticsFileError(
                path, f"group {key!r}: dataset {name!r} fails its checksum or cannot be read, the file is corrupted "
                f"({err}); regenerate it with: {regenerate_command(path)}", CORRUPTED) from None
    return loaded


def _open_file(path: Path) -> h5py.File:
    if not path.exists():
        raise StatisticsFileError(path, "file does not exist", CORRUPTED)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StatisticsFileError(path, f"not a readable HDF5 file ({err}); "
                                  f"regenerate it with: {regenerate_command(path)}", CORRUPTED) from None


def _checked_attrs(path: Path, handle: h5py.File, kind: str) -> tuple[dict, object]:
    """The file's attributes, parsed, after the kind and checksum checks; and its format (``None``: none stored)."""
    found_kind = handle.attrs.get("nullcov_kind")
    if found_kind != kind:
        raise StatisticsFileError(path, f"expected a nullcov {kind!r} file, found kind {found_kind!r}", CORRUPTED)
    texts = dict(handle.attrs.items())
    stored_sha256 = texts.pop("nullcov_attrs_sha256", None)
    if stored_sha256 is not None and stored_sha256 != _attrs_sha256(texts):
        raise StatisticsFileError(path, "the attributes (provenance) fail their checksum, the file is corrupted; "
                                  f"regenerate it with: {regenerate_command(path)}", CORRUPTED)
    try:
        attrs = {name: json.loads(value) for name, value in texts.items() if name != "nullcov_kind"}
    except (TypeError, json.JSONDecodeError) as err:
        raise StatisticsFileError(path, f"attributes are not valid JSON ({err})", CORRUPTED) from None
    found_format = attrs.pop("nullcov_format", None)
    if found_format is not None and stored_sha256 is None:
        raise StatisticsFileError(path, "the attributes carry no checksum; "
                                  f"regenerate it with: {regenerate_command(path)}",
                                  see("statistics-file-of-an-older-nullcov"))
    if "provenance" not in attrs:
        raise StatisticsFileError(path, "no provenance attribute", CORRUPTED)
    return attrs, found_format


def _collect_group(groups: dict, datasets: tuple[str, ...], name: str, obj) -> None:
    """``h5py`` ``visititems`` callback: keep the groups that hold any of ``datasets``."""
    if isinstance(obj, h5py.Group) and any(isinstance(obj.get(d), h5py.Dataset) for d in datasets):
        groups[name] = obj


def _statistic_groups(path: Path, handle: h5py.File, datasets: tuple[str, ...]) -> dict[str, h5py.Group]:
    groups: dict[str, h5py.Group] = {}
    try:
        handle.visititems(functools.partial(_collect_group, groups, datasets))
    except (OSError, RuntimeError, KeyError) as err:
        raise StatisticsFileError(path, f"corrupted HDF5 content ({err}); "
                                  f"regenerate it with: {regenerate_command(path)}", CORRUPTED) from None
    if not groups:
        raise StatisticsFileError(path, f"no groups holding {datasets}", CORRUPTED)
    return groups


def _check_format(path: Path, found_format) -> None:
    if found_format is not None and found_format != FORMAT:
        raise StatisticsFileError(
            path, f"file format {found_format!r}, this nullcov reads format {FORMAT} (checksummed); "
            f"regenerate it with: {regenerate_command(path)}", see("statistics-file-of-an-older-nullcov"))


def _open(path, kind: str, datasets: tuple[str, ...]):
    """Open a file, check kind, format and attributes; returns (handle, attrs, groups)."""
    path = Path(path)
    handle = _open_file(path)
    try:
        attrs, found_format = _checked_attrs(path, handle, kind)
        groups = _statistic_groups(path, handle, datasets)
        _check_format(path, found_format)
        return handle, attrs, groups
    except BaseException:
        handle.close()
        raise


def _read(path, kind: str, datasets: tuple[str, ...], keys=None):
    """Yield ``(key, {dataset: array})`` of every group (or of ``keys``, in that order) one at a
    time, after the file's attrs: the first item is ``(None, attrs)``."""
    handle, attrs, groups = _open(path, kind, datasets)
    with handle:
        if keys is not None:
            unknown = sorted(set(keys) - set(groups))
            if unknown:
                raise StatisticsFileError(path, f"no group {unknown}; it holds {sorted(groups)}",
                                          see("no-projection-for-a-layer-or-linear"))
            groups = {key: groups[key] for key in keys}
        yield None, attrs
        for key, group in groups.items():
            try:
                yield key, _load(path, key, group, datasets)
            except (RuntimeError, KeyError) as err:
                raise StatisticsFileError(path, f"corrupted HDF5 content ({err}); "
                                          f"regenerate it with: {regenerate_command(path)}", CORRUPTED) from None


def write_moments(path, kind: str, moments: dict[str, Moments], attrs: dict) -> None:
    """Write ``{key: Moments}`` (``kind``: ``features``, ``partial`` or ``covariance``) atomically."""
    groups = {}
    for key, moment in moments.items():
        problems = moment.problems()
        if problems:
            raise StatisticsFileError(path, f"refusing to write {key!r}: {'; '.join(problems)}")
        groups[key] = {
            "count": np.int64(moment.count),
            "shift": moment.shift,
            "sum": moment.shifted_sum,
            "sum_outer": pack_symmetric(moment.shifted_outer),
        }
    _write(path, kind, attrs, groups)


def _moments(path, key: str, data: dict) -> Moments:
    count = data["count"]
    if count.shape != (1,):
        raise StatisticsFileError(path, f"group {key!r}: count must be one integer, got shape {count.shape}",
                                  CORRUPTED)
    sum_ = data["sum"]
    packed = data["sum_outer"]
    dim = sum_.shape[0] if sum_.ndim == 1 else -1
    if packed.shape != (dim * (dim + 1) // 2,):
        raise StatisticsFileError(path, f"group {key!r}: inconsistent shapes: sum {sum_.shape}, packed sum_outer "
                                  f"{packed.shape} (expected ({dim * (dim + 1) // 2},))", CORRUPTED)
    moment = Moments.about(int(count[0]), data["shift"], sum_, unpack_symmetric(packed))
    problems = moment.problems()
    if problems:
        raise StatisticsFileError(path, f"group {key!r}: {'; '.join(problems)}", CORRUPTED)
    return moment


def iter_moments(path, kind: str, keys=None):
    """Read a moments file one key at a time: yields ``(None, attrs)`` first, then
    ``(key, Moments)``, each checksummed and validated (dtypes, shapes, count > 0, finite)."""
    for key, data in _read(path, kind, MOMENT_DATASETS, keys):
        yield (None, data) if key is None else (key, _moments(path, key, data))


def read_attrs(path, kind: str) -> dict:
    """A moments or projection file's attributes (provenance, step), without reading any statistics."""
    handle, attrs, _ = _open(path, kind, PROJECTION_DATASETS if kind == "projection" else MOMENT_DATASETS)
    handle.close()
    return attrs


def read_moments(path, kind: str, keys=None) -> tuple[dict[str, Moments], dict]:
    """Read and validate a moments file (all groups, or ``keys``)."""
    items = iter_moments(path, kind, keys)
    _, attrs = next(items)
    return dict(items), attrs


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


def read_spectra(path) -> dict[str, dict]:
    """``{key: {"eigenvalues", "null_dim", "threshold", "d"}}`` of a projection file (checksummed; ``P`` not read)."""
    items = _read(path, "projection", PROJECTION_DATASETS[1:])
    next(items)
    return {key: {"eigenvalues": data["eigenvalues"], "null_dim": int(data["null_dim"][0]),
                  "threshold": float(data["threshold"][0]), "d": int(data["eigenvalues"].shape[0])}
            for key, data in items}


def read_projections(path, keys=None) -> tuple[dict[str, NullSpace], dict]:
    items = _read(path, "projection", PROJECTION_DATASETS, keys)
    _, attrs = next(items)
    spaces = {}
    for key, data in items:
        if data["null_dim"].shape != (1,) or data["threshold"].shape != (1,):
            raise StatisticsFileError(path, f"group {key!r}: null_dim and threshold must hold one value each",
                                      CORRUPTED)
        spaces[key] = NullSpace(
            projection=np.asarray(data["P"]),
            eigenvalues=np.asarray(data["eigenvalues"]),
            null_dim=int(data["null_dim"][0]),
            threshold=float(data["threshold"][0]),
        )
    return spaces, attrs


# -- named float arrays (the attention maps) ----------------------------------------------------
def write_arrays(path, kind: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Named float arrays (``"<group>/.../<dataset>"`` -> array) and JSON ``attrs`` (``provenance``
    among them) as a nullcov file of ``kind``, written as the statistics files are: atomically, every
    dataset Fletcher32-checksummed (a scalar as a 1-element array), the attributes under
    ``nullcov_attrs_sha256``. :func:`read_arrays` reads it back."""
    if "provenance" not in attrs:
        raise StatisticsFileError(path, "refusing to write a file without a provenance attribute")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind != "f" or value.size == 0:
            raise StatisticsFileError(path, f"refusing to write {name!r}: {value.dtype} {list(value.shape)}, "
                                      "only non-empty float arrays are stored")
        key, _, dataset = name.rpartition("/")
        groups.setdefault(key, {})[dataset] = value
    _write(path, kind, attrs, groups)


def _datasets(path: Path, handle: h5py.File) -> dict[str, h5py.Dataset]:
    """Every dataset of the file by its path, in HDF5's (alphabetical) order."""
    found: dict[str, h5py.Dataset] = {}

    def keep(name: str, obj) -> None:  # returns None: visititems stops at the first other value
        if isinstance(obj, h5py.Dataset):
            found[name] = obj

    try:
        handle.visititems(keep)
    except (OSError, RuntimeError, KeyError) as err:
        raise StatisticsFileError(path, f"corrupted HDF5 content ({err}); "
                                  f"regenerate it with: {regenerate_command(path)}", CORRUPTED) from None
    if not found:
        raise StatisticsFileError(path, "holds no datasets", CORRUPTED)
    return found


def read_arrays(path, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of a :func:`write_arrays` file of ``kind`` (``{name: array}``) and its attributes,
    checked as the statistics files are: kind, attribute checksum and format; then float dtypes and the
    Fletcher32 filter of every dataset before any data is read; then each read verifies its checksum."""
    path = Path(path)
    with _open_file(path) as handle:
        attrs, found_format = _checked_attrs(path, handle, kind)
        _check_format(path, found_format)
        datasets = _datasets(path, handle)
        for name, dataset in datasets.items():
            if dataset.dtype.kind != "f":
                raise StatisticsFileError(path, f"dataset {name!r} has dtype {dataset.dtype}, expected floats; "
                                          f"regenerate it with: {regenerate_command(path)}", CORRUPTED)
            if not dataset.fletcher32:
                raise StatisticsFileError(
                    path, f"dataset {name!r} carries no checksum (a file of an older nullcov, or not written by "
                    f"nullcov); regenerate it with: {regenerate_command(path)}",
                    see("statistics-file-of-an-older-nullcov"))
        arrays = {}
        for name, dataset in datasets.items():
            try:
                arrays[name] = dataset[()]
            except OSError as err:
                raise StatisticsFileError(
                    path, f"dataset {name!r} fails its checksum or cannot be read, the file is corrupted ({err}); "
                    f"regenerate it with: {regenerate_command(path)}", CORRUPTED) from None
    return arrays, attrs
