"""Exact, mergeable second-moment statistics, held about a shift vector.

A :class:`Moments` holds sufficient statistics of a set of row vectors ``x``, taken about a
shift vector ``s`` (float64 [d], e.g. the mean of the first batch a shard saw): ``count``,
``shifted_sum = Σ(x - s)`` and ``shifted_outer = Σ(x - s)(x - s)ᵀ``. The uncentred views
``sum = Σx`` and ``sum_outer = Σxxᵀ`` are derived in float64. With ``s`` near the mean, the
centred covariance no longer cancels ``Σxxᵀ`` against ``n μμᵀ`` (text-encoder states have
``|μ| ≫ σ``, where that cancellation loses most digits). Merging shards is adding them: the
right operand is re-expressed about the left operand's shift (exact algebra in float64), so a
sum in prompt order is deterministic and does not depend on how prompts were split.
"""

from __future__ import annotations

import numpy as np

STATISTICS = ("second_moment", "covariance")


def _float64(values) -> np.ndarray:
    values = np.asarray(values)
    return values if values.dtype == np.float64 else values.astype(np.float64)


class Moments:
    """``count``, ``shift``, ``shifted_sum`` and ``shifted_outer`` of a set of rows.

    ``Moments(count, sum, sum_outer)`` builds moments about a zero shift (the plain sums);
    :meth:`about` builds them about a given shift.
    """

    __slots__ = ("count", "shift", "shifted_outer", "shifted_sum")

    def __init__(self, count: int, sum: np.ndarray, sum_outer: np.ndarray, shift: np.ndarray | None = None):
        # With ``shift`` given, ``sum`` and ``sum_outer`` are the sums about that shift.
        self.count = count
        self.shifted_sum = np.asarray(sum)
        self.shifted_outer = np.asarray(sum_outer)
        self.shift = np.zeros(self.shifted_sum.shape, dtype=np.float64) if shift is None else np.asarray(shift)

    @classmethod
    def about(cls, count: int, shift: np.ndarray, shifted_sum: np.ndarray, shifted_outer: np.ndarray) -> Moments:
        """Moments given as ``Σ(x - shift)`` and ``Σ(x - shift)(x - shift)ᵀ``."""
        return cls(count, shifted_sum, shifted_outer, shift=shift)

    @property
    def dim(self) -> int:
        return int(self.shifted_sum.shape[0])

    @property
    def sum(self) -> np.ndarray:
        """``Σx`` (float64 [d])."""
        return self.shifted_sum + self.count * self.shift

    @property
    def sum_outer(self) -> np.ndarray:
        """``Σxxᵀ`` (float64 [d, d])."""
        s, b = self.shift, self.shifted_sum
        return self.shifted_outer + np.outer(s, b) + np.outer(b, s) + self.count * np.outer(s, s)

    @classmethod
    def of_rows(cls, rows: np.ndarray, shift: np.ndarray | None = None) -> Moments:
        """Brute-force moments of a [n, d] array (float64), about ``shift`` (default zero)."""
        rows = np.asarray(rows, dtype=np.float64)
        shift = np.zeros(rows.shape[1]) if shift is None else _float64(shift)
        centred = rows - shift
        return cls.about(rows.shape[0], shift, centred.sum(axis=0), centred.T @ centred)

    def shifted_to(self, shift: np.ndarray) -> Moments:
        """The same moments about another shift ``t``: with ``δ = s - t``,
        ``Σ(x-t) = b + nδ`` and ``Σ(x-t)(x-t)ᵀ = C + δbᵀ + bδᵀ + nδδᵀ`` (float64)."""
        shift = _float64(shift)
        if np.array_equal(shift, self.shift):
            return self
        delta, b, n = self.shift - shift, self.shifted_sum, self.count
        outer = self.shifted_outer + np.outer(delta, b) + np.outer(b, delta) + n * np.outer(delta, delta)
        return Moments.about(n, shift, b + n * delta, outer)

    def problems(self) -> list[str]:
        """What is wrong with these moments (empty when they are valid)."""
        found = []
        if not isinstance(self.count, (int, np.integer)) or self.count <= 0:
            found.append(f"count must be a positive integer, got {self.count!r}")
        arrays = (self.shift, self.shifted_sum, self.shifted_outer)
        if any(array.dtype != np.float64 for array in arrays):
            found.append(f"sums must be float64, got {[str(array.dtype) for array in arrays]} (shift, sum, sum_outer)")
            return found
        d = self.shifted_sum.shape[0] if self.shifted_sum.ndim == 1 else -1
        if d < 0 or self.shifted_outer.shape != (d, d) or self.shift.shape != (d,):
            found.append(f"inconsistent shapes: shift {self.shift.shape}, sum {self.shifted_sum.shape}, "
                         f"sum_outer {self.shifted_outer.shape}")
        elif not all(np.isfinite(array).all() for array in arrays):
            found.append("sums hold non-finite values")
        return found

    def __add__(self, other: Moments) -> Moments:
        """The sum, about this (left) operand's shift: sums in prompt order are deterministic."""
        total = Moments.about(self.count, self.shift.copy(), self.shifted_sum.copy(), self.shifted_outer.copy())
        return total.add_(other)

    def add_(self, other: Moments) -> Moments:
        """Add ``other`` into these moments in place (about this shift); returns self. For merges:
        no second [d, d] total is allocated."""
        if self.shifted_outer.shape != other.shifted_outer.shape:
            raise ValueError(f"cannot add moments of dimension {self.dim} and {other.dim}")
        # other about this shift, with δ = s_other - s and c = b_other + n_other δ / 2:
        # C_other + δ b_otherᵀ + b_other δᵀ + n_other δδᵀ = C_other + δ cᵀ + c δᵀ (one [d, d] temporary at a time)
        delta, n = other.shift - self.shift, int(other.count)
        self.shifted_outer += other.shifted_outer
        if delta.any():
            half = other.shifted_sum + (n / 2) * delta
            self.shifted_outer += np.outer(delta, half)
            self.shifted_outer += np.outer(half, delta)
        self.shifted_sum += other.shifted_sum + n * delta
        self.count = int(self.count) + n
        return self

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, dim={self.dim})"

    def second_moment(self) -> np.ndarray:
        """``K0ᵀK0 / n`` (uncentred), as AlphaEdit uses."""
        return self.sum_outer / self.count

    def covariance(self) -> np.ndarray:
        """Centred, unbiased covariance ``Σ(x-μ)(x-μ)ᵀ / (n - 1)``, from the shifted sums:
        ``(C - b bᵀ / n) / (n - 1)`` with ``b = Σ(x-s)``, ``C = Σ(x-s)(x-s)ᵀ``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.count}")
        b = self.shifted_sum
        return (self.shifted_outer - np.outer(b, b) / self.count) / (self.count - 1)

    def statistic(self, kind: str) -> np.ndarray:
        if kind == "second_moment":
            return self.second_moment()
        if kind == "covariance":
            return self.covariance()
        raise ValueError(f"statistic must be one of {STATISTICS}, got {kind!r}")
