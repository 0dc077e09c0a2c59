"""Exports of a run for other trainers (config key ``exports``).

``nullbooth``: ``<out>/covariance_matrices/<layer>/<step name>_<feature>_cov.npy``, the layout
NullBooth's trainer reads: ``<layer>`` is the module path with ``.`` replaced by ``_``,
``<step name>`` nullcov's (``timestep_XXXX`` or ``alpha_XX_YYYY``), ``<feature>`` one of ``q``,
``out`` (per step, from that step's merged moments) and ``k``, ``v`` (the text statistic, the
same for every layer and step). Each file is a square float32 matrix of the run's ``statistic``,
on which that trainer runs its own SVD and threshold.

``safetensors``: one file holding every projection of the run: tensors ``<step>/<key>/P``
(float32 [d, d]), ``<step>/<key>/eigenvalues`` (float64, ascending), ``<step>/<key>/null_dim``
and ``<step>/<key>/threshold`` (scalars), with ``<step>`` a step name or ``text`` and ``<key>`` the
key of the projection file: a UNet's ``<layer>/to_q``, ``<layer>/to_out`` or ``encoder_hidden_states``;
an SD3/FLUX transformer's stream keys (``transformer_blocks.0/attn.to_q``, ``.../attn.add_q_proj``,
``single_transformer_blocks.0/attn.to_q``, ...) and text-path keys (``text/context_embedder``,
``text/time_text_embed.text_embedder.linear_1``); metadata ``format``,
``schedule`` (schedule.json) and ``provenance`` (JSON). :class:`nullcov.training.bank.ProjectionBank`
loads it directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from nullcov.docs import see
from nullcov.files import atomic_path
from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, statistic_key
from nullcov.models.schedule import read_schedule
from nullcov.statistics.projection import NullSpace
from nullcov.statistics.store import read_moments, read_projections

log = logging.getLogger(__name__)

EXPORTS = ("nullbooth", "safetensors")
#: The exports an SD3/FLUX run makes (NullBooth's layout names a UNet's q/k/v/out features).
TRANSFORMER_EXPORTS = ("safetensors",)
SAFETENSORS_FORMAT = "nullcov-projections/1"
#: NullBooth names a statistic by the config's ``collect_features`` name of its linear: per-step
#: linear -> name (``{"to_q": "q", "to_out": "out"}``), and the names of the text linears (``k``, ``v``).
NULLBOOTH_STEP_FEATURES = {linear: feature for feature, linear in CROSS_ATTENTION.features
                           if linear in CROSS_ATTENTION.per_step}
NULLBOOTH_TEXT_FEATURES = tuple(feature for feature, linear in CROSS_ATTENTION.features
                                if linear in CROSS_ATTENTION.text)


def parse_exports(value) -> list[str]:
    """The ``exports`` config value as a list: a list, or the string ``--config exports=...`` gives
    (``["nullbooth"]``, ``[nullbooth, safetensors]``, ``nullbooth,safetensors`` or ``nullbooth``)."""
    if isinstance(value, str):
        import yaml

        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"config key 'exports': cannot parse {text!r} ({err}); "
                                 "write e.g. exports='[\"nullbooth\", \"safetensors\"]'"
                                 f"{see('unknown-export')}") from None
        else:
            value = [item.strip() for item in text.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"config key 'exports' must be a list of names from {list(EXPORTS)}, got {value!r}"
                         f"{see('unknown-export')}")
    unknown = [item for item in value if item not in EXPORTS]
    if unknown:
        raise ValueError(f"config key 'exports': unknown export(s) {unknown}; choose from {list(EXPORTS)}"
                         f"{see('unknown-export')}")
    return list(dict.fromkeys(value))


def nullbooth_layer_folder(layer: str) -> str:
    return layer.replace(".", "_")


def _save_npy(path: Path, matrix: np.ndarray) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, np.ascontiguousarray(matrix, dtype=np.float32), allow_pickle=False)


def export_nullbooth(covariance_files: dict[str, str | Path], out_dir: str | Path, statistic: str,
                     layers: list[str], text_file: str | Path | None = None,
                     step_names: list[str] | None = None) -> int:
    """Write the NullBooth layout under ``out_dir`` from merged moments; returns the file count.

    ``covariance_files``: step name -> merged moments file (``to_q``/``to_out`` statistics);
    ``text_file``: the merged text moments (``k``/``v`` of every layer and step); ``layers``:
    the run's cross-attention layers (schedule.json ``layers``); ``step_names``: the scheduled
    steps (default: those of ``covariance_files``). NullBooth's trainer looks ``k``/``v`` up per
    step, so a text-only run (no step files) still gets them for every scheduled step.
    """
    root = Path(out_dir) / "covariance_matrices"
    written = 0
    text = None
    if text_file is not None:
        moments, _ = read_moments(text_file, "covariance", keys=[TEXT_KEY])
        text = moments[TEXT_KEY].statistic(statistic)
    names = list(covariance_files) if step_names is None else list(step_names)
    if unknown := set(covariance_files) - set(names):
        raise ValueError(f"covariance files of steps not in step_names: {sorted(unknown)}")
    for name in names:
        moments = read_moments(covariance_files[name], "covariance")[0] if name in covariance_files else {}
        for layer in layers:
            folder = root / nullbooth_layer_folder(layer)
            for linear, feature in NULLBOOTH_STEP_FEATURES.items():
                key = statistic_key(layer, linear)
                if key in moments:
                    _save_npy(folder / f"{name}_{feature}_cov.npy", moments[key].statistic(statistic))
                    written += 1
            if text is not None:
                for feature in NULLBOOTH_TEXT_FEATURES:
                    _save_npy(folder / f"{name}_{feature}_cov.npy", text)
                    written += 1
    log.info("%s: %d matrices (%s, float32) for %d steps and %d layers", root, written, statistic,
             len(names), len(layers))
    return written


def export_safetensors(schedule_path: str | Path, projection_files: dict[str, str | Path],
                       out_path: str | Path) -> None:
    """One safetensors file of every projection (``projection_files``: step name or ``text`` -> file)."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    provenance = None
    for name, path in projection_files.items():
        spaces, attrs = read_projections(path)
        provenance = provenance or attrs["provenance"]
        for key, space in spaces.items():
            tensors[f"{name}/{key}/P"] = np.ascontiguousarray(space.projection, dtype=np.float32)
            tensors[f"{name}/{key}/eigenvalues"] = np.asarray(space.eigenvalues, dtype=np.float64)
            tensors[f"{name}/{key}/null_dim"] = np.array(space.null_dim, dtype=np.int64)
            tensors[f"{name}/{key}/threshold"] = np.array(space.threshold, dtype=np.float64)
    read_schedule(schedule_path)  # refuses a missing or damaged schedule, naming it
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "schedule": Path(schedule_path).read_text(),
        "provenance": json.dumps(provenance, sort_keys=True),
    }
    with atomic_path(out_path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    log.info("%s: %d projections of %d files", out_path, len(tensors) // 4, len(projection_files))


def read_safetensors_metadata(path: str | Path) -> dict:
    """``format``, ``schedule`` and ``provenance`` (parsed) of a safetensors export; checked."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist{see('not-a-nullcov-projections-export')}")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise ValueError(f"{path}: not a nullcov projections export (metadata format {metadata.get('format')!r}, "
                         f"expected {SAFETENSORS_FORMAT!r}){see('not-a-nullcov-projections-export')}")
    return {"format": metadata["format"], "schedule": json.loads(metadata["schedule"]),
            "provenance": json.loads(metadata["provenance"])}


def read_safetensors_projection(path: str | Path, name: str, key: str) -> np.ndarray:
    """The projection ``P`` of one step (or ``text``) and key from a safetensors export."""
    return read_safetensors_spaces(path, name, [key])[key].projection


def safetensors_keys(path: str | Path) -> dict[str, list[str]]:
    """``{step name or text: [key, ...]}`` of every projection a safetensors export holds (keys sorted;
    a key may hold ``/``: ``transformer_blocks.0/attn.to_q``)."""
    from safetensors import safe_open

    found: dict[str, list[str]] = {}
    with safe_open(str(path), framework="numpy") as handle:
        for tensor in handle.keys():
            name, _, rest = tensor.partition("/")
            if rest.endswith("/P"):
                found.setdefault(name, []).append(rest[: -len("/P")])
    return {name: sorted(keys) for name, keys in found.items()}


def read_safetensors_spaces(path: str | Path, name: str, keys: list[str] | None = None) -> dict[str, NullSpace]:
    """The null spaces (``P``, eigenvalues, ``null_dim``, threshold) of one step (or ``text``) of a
    safetensors export, for ``keys`` (default: every key of that step); a missing one is refused, naming it."""
    from safetensors import safe_open

    spaces = {}
    with safe_open(str(path), framework="numpy") as handle:
        available = set(handle.keys())
        if keys is None:
            keys = sorted(tensor[len(name) + 1: -len("/P")] for tensor in available
                          if tensor.startswith(f"{name}/") and tensor.endswith("/P"))
        for key in keys:
            tensor = f"{name}/{key}/P"
            if tensor not in available:
                raise KeyError(f"{path} holds no tensor {tensor!r}{see('no-projection-for-a-layer-or-linear')}")
            spaces[key] = NullSpace(projection=handle.get_tensor(tensor),
                                    eigenvalues=handle.get_tensor(f"{name}/{key}/eigenvalues"),
                                    null_dim=int(handle.get_tensor(f"{name}/{key}/null_dim")),
                                    threshold=float(handle.get_tensor(f"{name}/{key}/threshold")))
    return spaces
