"""Null-space projections ``P = U0 U0ᵀ`` from a symmetric statistic.

``U0`` holds the eigenvectors whose eigenvalues fall strictly under the threshold. An update
``ΔW ← ΔW P`` then leaves ``ΔW k ≈ 0`` for every preserved input ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NullSpace:
    projection: np.ndarray  # float32 [d, d]
    eigenvalues: np.ndarray  # float64 [d], ascending
    null_dim: int
    threshold: float


def spectrum_threshold(eigenvalues: np.ndarray, nullspace_threshold: float | None,
                       threshold_percent: float | None) -> float:
    """The absolute threshold: the ``threshold_percent`` percentile of the spectrum when set,
    else ``nullspace_threshold``."""
    if threshold_percent is not None:
        if not 0 < threshold_percent < 100:
            raise ValueError(f"threshold_percent must lie in (0, 100), got {threshold_percent}")
        return float(np.percentile(eigenvalues, threshold_percent))
    if nullspace_threshold is None or nullspace_threshold < 0:
        raise ValueError(f"nullspace_threshold must be a number >= 0, got {nullspace_threshold}")
    return float(nullspace_threshold)


def symmetric_eigh(statistic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``eigh`` of a symmetric matrix (symmetrised first): ascending eigenvalues, eigenvectors."""
    matrix = np.asarray(statistic, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"statistic must be a square matrix, got shape {matrix.shape}")
    return np.linalg.eigh((matrix + matrix.T) / 2)


def null_space(statistic: np.ndarray, nullspace_threshold: float | None,
               threshold_percent: float | None = None) -> NullSpace:
    """Float64 ``eigh`` of a symmetric matrix and the projection onto its null space."""
    eigenvalues, eigenvectors = symmetric_eigh(statistic)
    threshold = spectrum_threshold(eigenvalues, nullspace_threshold, threshold_percent)
    basis = eigenvectors[:, eigenvalues < threshold]
    return NullSpace(
        projection=(basis @ basis.T).astype(np.float32),
        eigenvalues=eigenvalues,
        null_dim=int(basis.shape[1]),
        threshold=threshold,
    )
