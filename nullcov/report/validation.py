"""Does an update projected with ``P`` leave the preserved knowledge alone, also on unseen prompts?

For one layer/linear with training statistic ``M`` (second moment or covariance of the training
inputs), a random update ``ΔW`` and inputs ``X`` (rows = input vectors of the linear):

    leakage(X) = ‖ΔW P Xᵀ‖_F / ‖ΔW Xᵀ‖_F

the share of the update's effect on ``X`` that survives the projection. Only moments are needed:
with ``S = Σ x xᵀ = XᵀX`` (``sum_outer``), ``‖ΔW P Xᵀ‖_F² = tr(ΔW P S P ΔWᵀ)`` and
``‖ΔW Xᵀ‖_F² = tr(ΔW S ΔWᵀ)``. ``X`` is always the *raw* input (what the layer sees), whatever
the run's ``statistic``.

* validation leakage: ``X`` = inputs of the validation prompts (disjoint from the training
  prompts), collected with the feature job itself, so the moments are exact;
* training leakage: ``X`` = the training inputs. For ``second_moment`` the math bounds it:
  ``‖ΔW P Xᵀ‖² = n tr(ΔW P C P ΔWᵀ) ≤ n λ_max(P C P) ‖ΔW P‖² < n τ ‖ΔW P‖²``
  (``C = S/n``, ``τ`` the threshold). For ``covariance`` (``C`` centred, ``S = (n-1)C + n μμᵀ``):
  ``‖ΔW P Xᵀ‖² ≤ (n-1) τ ‖ΔW P‖² + n ‖ΔW P μ‖²`` — the mean is not constrained.

Each ``ΔW`` is ``d × d`` with iid standard normal entries, drawn from
``numpy.random.default_rng([seed, crc32(key), draw])`` (:func:`random_update`): the same update
for a layer/linear at every timestep. The threshold sweep shares one ``eigh`` per matrix: in the
eigenbasis ``V`` of ``M`` (ascending eigenvalues) ``P_k = V_k V_kᵀ`` keeps the first ``k``
columns, and with ``G = ΔW V``, ``H = GᵀG`` and ``T = Vᵀ S V``,
``‖ΔW P_k Xᵀ‖² = Σ_{i,j<k} H_ij T_ij``: a 2-D prefix sum gives every ``k`` at once.

No torch: this module runs in CPU jobs.
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path

import numpy as np

from nullcov.docs import see
from nullcov.files import read_tsv, write_tsv
from nullcov.layout import step_file, step_name
from nullcov.models.family import CROSS_ATTENTION, TEXT_KEY, split_key
from nullcov.prompts import read_prompts
from nullcov.statistics.moments import Moments
from nullcov.statistics.projection import NullSpace, symmetric_eigh
from nullcov.statistics.store import read_moments, read_projections

log = logging.getLogger(__name__)

#: Columns of a leakage table (one row per step, layer/linear, threshold and random update).
COLUMNS = (
    "step", "timestep", "layer", "linear", "d", "threshold", "configured", "null_dim", "draw",
    "n_training", "n_validation", "leakage_validation", "leakage_training", "training_bound",
)
TEXT_LAYER, TEXT_LINEAR = "text", CROSS_ATTENTION.text_label


class ValidationConfigError(ValueError):
    """The validation prompts or their seeds clash with the training prompts."""


def resolve_prompt_file(path, workflow_dir) -> Path:
    """``path`` as given when it exists (relative: to the working directory); else a relative path
    is looked up in ``workflow_dir`` (so the shipped demo file works from any working directory)."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not (Path(workflow_dir) / path).exists():
        return path
    return Path(workflow_dir) / path


def read_validation_prompts(path, training_prompts: list[str], seed_offset: int) -> list[str]:
    """The validation prompts; refuses any that is also a training prompt, and seeds that overlap.

    Validation prompt ``j`` draws its latents and noise from the generator seeded
    ``seed + seed_offset + j``, the training prompt ``i`` from ``seed + i``: distinct as long as
    ``seed_offset >= len(training_prompts)``.
    """
    prompts = read_prompts(path)
    training = set(training_prompts)
    shared = [(number, prompt) for number, prompt in enumerate(prompts) if prompt in training]
    if shared:
        listing = "; ".join(f"validation prompt {number}: {prompt!r}" for number, prompt in shared[:5])
        raise ValidationConfigError(
            f"validation_prompts {str(path)!r} must be disjoint from the training prompts, but {len(shared)} "
            f"of them are training prompts too ({listing}){see('validation-prompts-are-training-prompts')}"
        )
    if seed_offset < len(training_prompts):
        raise ValidationConfigError(
            f"validation_seed_offset {seed_offset} is smaller than the number of training prompts "
            f"({len(training_prompts)}): validation prompts would reuse training seeds; raise it"
            f"{see('validation-seed-offset-too-small')}"
        )
    return prompts


def random_update(seed: int, key: str, draw: int, rows: int, dim: int) -> np.ndarray:
    """The seeded random update ``ΔW`` [rows, dim] (iid standard normal) of ``key``, draw ``draw``."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8")), draw])
    return rng.standard_normal((rows, dim))


def _squared_norm(update: np.ndarray, sum_outer: np.ndarray) -> float:
    """``‖ΔW Xᵀ‖_F² = tr(ΔW S ΔWᵀ)``."""
    return float(np.einsum("ij,ij->", update @ sum_outer, update))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        return math.nan
    return math.sqrt(max(numerator, 0.0) / denominator)


def _bound(statistic: str, threshold: float, count: int, update_norm: float, mean_image_norm: float) -> float:
    """The bound on ``‖ΔW P Xᵀ‖²`` over the training inputs (see the module docstring), from
    ``‖ΔW P‖_F²`` (``update_norm``) and ``‖ΔW P μ‖²`` (``mean_image_norm``)."""
    if statistic == "second_moment":
        return count * threshold * update_norm
    return (count - 1) * threshold * update_norm + count * mean_image_norm


def leakage_of_key(key: str, training: Moments, validation: Moments, statistic: str, thresholds: list[float],
                   configured: NullSpace, updates: int, seed: int) -> list[dict]:
    """Leakage rows of one layer/linear: every sweep threshold, then the configured projection.

    ``configured`` is the run's stored projection (``configured = 1`` rows): its ``P`` is used as
    stored (float32), not recomputed.
    """
    if training.dim != validation.dim:
        raise ValueError(f"{key}: training inputs have dimension {training.dim}, validation inputs {validation.dim}")
    dim = training.dim
    eigenvalues, vectors = symmetric_eigh(training.statistic(statistic))
    rotated_validation = vectors.T @ validation.sum_outer @ vectors
    rotated_training = vectors.T @ training.sum_outer @ vectors
    mean = training.sum / training.count
    rotated_mean = vectors.T @ mean
    configured_P = configured.projection.astype(np.float64)
    null_dims = [int(np.count_nonzero(eigenvalues < threshold)) for threshold in thresholds]
    rows = []
    for draw in range(updates):
        update = random_update(seed, key, draw, dim, dim)
        denominators = (_squared_norm(update, validation.sum_outer), _squared_norm(update, training.sum_outer))
        G = update @ vectors
        H = G.T @ G
        prefix_validation = np.diagonal(np.cumsum(np.cumsum(H * rotated_validation, 0), 1))
        prefix_training = np.diagonal(np.cumsum(np.cumsum(H * rotated_training, 0), 1))
        prefix_update = np.cumsum(np.diagonal(H))  # ‖ΔW P_k‖_F²
        mean_images = np.cumsum(G * rotated_mean, axis=1)  # column k-1: ΔW P_k μ
        for threshold, k in zip(thresholds, null_dims, strict=True):
            if k == 0:
                numerators, update_norm, mean_image = (0.0, 0.0), 0.0, np.zeros(dim)
            else:
                numerators = (prefix_validation[k - 1], prefix_training[k - 1])
                update_norm, mean_image = prefix_update[k - 1], mean_images[:, k - 1]
            bound = _bound(statistic, threshold, training.count, update_norm, float(mean_image @ mean_image))
            rows.append(_row(key, dim, threshold, 0, k, draw, training, validation,
                             _ratio(numerators[0], denominators[0]), _ratio(numerators[1], denominators[1]),
                             _ratio(bound, denominators[1])))
        projected = update @ configured_P
        numerators = (_squared_norm(projected, validation.sum_outer), _squared_norm(projected, training.sum_outer))
        mean_image = projected @ mean
        bound = _bound(statistic, configured.threshold, training.count, float(np.sum(projected**2)),
                       float(mean_image @ mean_image))
        rows.append(_row(key, dim, configured.threshold, 1, configured.null_dim, draw, training, validation,
                         _ratio(numerators[0], denominators[0]), _ratio(numerators[1], denominators[1]),
                         _ratio(bound, denominators[1])))
    return rows


def _layer_and_linear(key: str) -> tuple[str, str]:
    """A table row's ``layer`` and ``linear``: the text states' own names, a statistic key split
    (:func:`nullcov.models.family.split_key`), or a key without a layer as the linear alone."""
    if key == TEXT_KEY:
        return TEXT_LAYER, TEXT_LINEAR
    return split_key(key) if "/" in key else ("", key)


def _row(key, dim, threshold, configured, null_dim, draw, training, validation, leak_validation, leak_training,
         bound) -> dict:
    layer, linear = _layer_and_linear(key)
    return {
        "layer": layer, "linear": linear, "d": dim, "threshold": float(threshold), "configured": configured,
        "null_dim": int(null_dim), "draw": draw, "n_training": int(training.count),
        "n_validation": int(validation.count), "leakage_validation": leak_validation,
        "leakage_training": leak_training, "training_bound": bound,
    }


def leakage_job(names: list[str], covariance_paths: list, projection_paths: list, validation_dir, output_path,
                schedule: dict, statistic: str, thresholds: list[float], updates: int, seed: int) -> list[dict]:
    """Leakage table of the steps ``names`` (``text`` for the text inputs), written as TSV.

    ``covariance_paths`` and ``projection_paths`` are the merged moments and projections of
    ``names``, in the same order (the rule's inputs); the validation features are read from
    ``validation_dir`` (:func:`nullcov.layout.step_file`).
    """
    if not len(names) == len(covariance_paths) == len(projection_paths):
        raise ValueError(f"leakage of {len(names)} steps needs as many covariance and projection files, got "
                         f"{len(covariance_paths)} and {len(projection_paths)}")
    timesteps = {step["name"]: step["timestep"] for step in schedule["steps"]}
    thresholds = sorted(float(t) for t in thresholds)
    rows = []
    for name, covariance_path, projection_path in zip(names, covariance_paths, projection_paths, strict=True):
        for path in (covariance_path, projection_path):
            if step_name(path) != name:
                raise ValueError(f"leakage of step {name}: input {path} belongs to another step")
        training, _ = read_moments(covariance_path, "covariance")
        validation, _ = read_moments(step_file(validation_dir, name), "features")
        spaces, _ = read_projections(projection_path)
        if sorted(training) != sorted(validation) or sorted(training) != sorted(spaces):
            raise ValueError(f"{name}: training, validation and projection files hold different layers: "
                             f"{sorted(training)} / {sorted(validation)} / {sorted(spaces)}")
        for key in sorted(training):
            key_rows = leakage_of_key(key, training[key], validation[key], statistic, thresholds, spaces[key],
                                      updates, seed)
            for row in key_rows:
                row.update(step=name, timestep=timesteps.get(name, math.nan))
            rows.extend(key_rows)
            configured = [row for row in key_rows if row["configured"]]
            log.info("%s %s: null_dim %d/%d, leakage validation %.3g, training %.3g (bound %.3g)", name, key,
                     configured[0]["null_dim"], configured[0]["d"],
                     np.mean([row["leakage_validation"] for row in configured]),
                     np.mean([row["leakage_training"] for row in configured]),
                     np.mean([row["training_bound"] for row in configured]))
    write_table(output_path, rows)
    return rows


def write_table(path, rows: list[dict]) -> None:
    write_tsv(path, rows, COLUMNS)


_INTEGER_COLUMNS = {"d", "configured", "null_dim", "draw", "n_training", "n_validation"}


def read_table(path) -> list[dict]:
    """Rows of a leakage table, numbers parsed."""
    rows = read_tsv(path)
    for row in rows:
        for column in COLUMNS:
            if column in _INTEGER_COLUMNS:
                row[column] = int(row[column])
            elif column not in ("step", "layer", "linear"):
                row[column] = float(row[column])
    return rows


def gather_tables(paths, output_path) -> list[dict]:
    rows = [row for path in paths for row in read_table(path)]
    write_table(output_path, rows)
    return rows


def step_parts(names: list[str], per_job: int) -> list[list[str]]:
    """The step names each leakage job handles (consecutive chunks of ``per_job``)."""
    return [names[i : i + per_job] for i in range(0, len(names), per_job)]
