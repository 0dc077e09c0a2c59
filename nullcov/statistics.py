"""Exact, mergeable second-moment statistics.

A :class:`Moments` holds only sufficient statistics — ``count``, ``sum`` (float64 [d]) and
``sum_outer`` (float64 [d, d]) — of a set of row vectors. Merging shards is adding them, so the
result does not depend on how prompts were split into shards or batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATISTICS = ("second_moment", "covariance")


@dataclass(frozen=True)
class Moments:
    count: int
    sum: np.ndarray
    sum_outer: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @classmethod
    def of_rows(cls, rows: np.ndarray) -> "Moments":
        """Brute-force moments of a [n, d] array (float64)."""
        rows = np.asarray(rows, dtype=np.float64)
        return cls(count=rows.shape[0], sum=rows.sum(axis=0), sum_outer=rows.T @ rows)

    def problems(self) -> list[str]:
        """What is wrong with these moments (empty when they are valid)."""
        found = []
        if not isinstance(self.count, (int, np.integer)) or self.count <= 0:
            found.append(f"count must be a positive integer, got {self.count!r}")
        if self.sum.dtype != np.float64 or self.sum_outer.dtype != np.float64:
            found.append(f"sums must be float64, got {self.sum.dtype} and {self.sum_outer.dtype}")
            return found
        if self.sum.ndim != 1 or self.sum_outer.shape != (self.sum.shape[0],) * 2:
            found.append(f"inconsistent shapes: sum {self.sum.shape}, sum_outer {self.sum_outer.shape}")
        elif not (np.isfinite(self.sum).all() and np.isfinite(self.sum_outer).all()):
            found.append("sums hold non-finite values")
        return found

    def __add__(self, other: "Moments") -> "Moments":
        if self.sum_outer.shape != other.sum_outer.shape:
            raise ValueError(f"cannot add moments of dimension {self.dim} and {other.dim}")
        return Moments(
            count=int(self.count) + int(other.count),
            sum=self.sum + other.sum,
            sum_outer=self.sum_outer + other.sum_outer,
        )

    def second_moment(self) -> np.ndarray:
        """``K0ᵀK0 / n`` (uncentred), as AlphaEdit uses."""
        return self.sum_outer / self.count

    def covariance(self) -> np.ndarray:
        """Centred, unbiased covariance ``(Σxxᵀ - n μμᵀ) / (n - 1)``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.count}")
        mean = self.sum / self.count
        return (self.sum_outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def statistic(self, kind: str) -> np.ndarray:
        if kind == "second_moment":
            return self.second_moment()
        if kind == "covariance":
            return self.covariance()
        raise ValueError(f"statistic must be one of {STATISTICS}, got {kind!r}")
