"""Null-space projections ``P = U0 U0ᵀ`` from a symmetric statistic.

``U0`` holds the eigenvectors whose eigenvalues fall strictly under the threshold. An update
``ΔW ← ΔW P`` then leaves ``ΔW k ≈ 0`` for every preserved input ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nullcov.docs import see


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
            raise ValueError(f"threshold_percent must lie in (0, 100), got {threshold_percent}"
                             f"{see('threshold-out-of-range')}")
        return float(np.percentile(eigenvalues, threshold_percent))
    if nullspace_threshold is None or nullspace_threshold < 0:
        raise ValueError(f"nullspace_threshold must be a number >= 0, got {nullspace_threshold}"
                         f"{see('threshold-out-of-range')}")
    return float(nullspace_threshold)


def symmetric_eigh(statistic: np.ndarray, device: str = "cpu", vectors: bool = True):
    """Float64 ``eigh`` of a symmetric matrix (symmetrised first): ascending eigenvalues and
    eigenvectors (only the eigenvalues when ``vectors`` is false). ``device``: ``cpu`` (numpy)
    or a torch device such as ``cuda`` (torch.linalg, float64 on that device)."""
    matrix = np.asarray(statistic, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"statistic must be a square matrix, got shape {matrix.shape}")
    return _eigh((matrix + matrix.T) / 2, device, vectors)


def _eigh(matrix: np.ndarray, device: str, vectors: bool = True):
    """:func:`symmetric_eigh` of an already symmetric float64 matrix."""
    if device == "cpu":
        return np.linalg.eigh(matrix) if vectors else np.linalg.eigvalsh(matrix)
    import torch

    tensor = torch.from_numpy(matrix).to(device)
    if not vectors:
        return torch.linalg.eigvalsh(tensor).cpu().numpy()
    eigenvalues, eigenvectors = torch.linalg.eigh(tensor)
    return eigenvalues.cpu().numpy(), eigenvectors.cpu().numpy()


def projection_from_side(eigenvectors: np.ndarray, below: np.ndarray) -> np.ndarray:
    """``P = U0 U0ᵀ`` over the eigenvectors flagged ``below``, formed from the smaller side:
    ``U0 U0ᵀ`` when the null space is at most half of ``d``, else ``I − U1 U1ᵀ`` (float64)."""
    d = eigenvectors.shape[0]
    null_dim = int(below.sum())
    if null_dim <= d - null_dim:
        basis = eigenvectors[:, below]
        return basis @ basis.T
    basis = eigenvectors[:, ~below]
    return np.eye(d) - basis @ basis.T


def _positive_definite(matrix: np.ndarray) -> bool:
    """Whether a symmetric matrix is positive definite (a Cholesky factorisation succeeds: d³/3 flops)."""
    try:
        np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        return False
    return True


def null_space(statistic: np.ndarray, nullspace_threshold: float | None,
               threshold_percent: float | None = None, device: str = "cpu") -> NullSpace:
    """The projection onto the null space (eigenvalues strictly under the threshold) of a
    symmetric matrix, at the cost it needs.

    An absolute threshold under the whole spectrum is found by one Cholesky factorisation of
    ``A − t I`` (``P = 0``); then only the eigenvalues are computed (``eigvalsh``, they are
    stored). Otherwise one float64 ``eigh`` (numpy on the CPU, torch on ``device`` when it is a
    GPU) and ``P`` from the smaller side (:func:`projection_from_side`).
    """
    matrix = np.asarray(statistic, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"statistic must be a square matrix, got shape {matrix.shape}")
    d = matrix.shape[0]
    matrix = (matrix + matrix.T) / 2
    projection = None
    if threshold_percent is None:
        threshold = spectrum_threshold(np.zeros(0), nullspace_threshold, None)
        # λ_min ≤ min(diag): the diagonal rules the factorisation out for free.
        diagonal = np.diagonal(matrix)
        # (All eigenvalues under the threshold, P = I, is left to the eigh: eigvalsh was no faster, measured.)
        if diagonal.min() > threshold and _positive_definite(matrix - threshold * np.eye(d)):
            projection, null_dim = np.zeros((d, d)), 0
    if projection is not None:
        eigenvalues = _eigh(matrix, device, vectors=False)
    else:
        eigenvalues, eigenvectors = _eigh(matrix, device)
        threshold = spectrum_threshold(eigenvalues, nullspace_threshold, threshold_percent)
        projection = projection_from_side(eigenvectors, eigenvalues < threshold)
        null_dim = int((eigenvalues < threshold).sum())
    return NullSpace(
        projection=projection.astype(np.float32),
        eigenvalues=eigenvalues,
        null_dim=null_dim,
        threshold=threshold,
    )
