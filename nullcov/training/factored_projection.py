"""A null-space projection ``P`` held in the form that applies it with the fewest flops.

``P = U0 U0ᵀ = I − U1 U1ᵀ`` (``k0`` null directions of ``d``, ``k1 = d − k0``) is applied as
``(X U0) U0ᵀ`` (4·rows·d·k0), ``X − (X U1) U1ᵀ`` (4·rows·d·k1) or ``X P`` (2·rows·d²)
(:func:`application_flops`, :func:`cheapest_form`): always a factored form unless ``k0 = d/2``,
at most half the flops of the dense product. A :class:`FactoredProjection` comes from an ``eigh``
(:func:`null_space_factor`, the torch twin of :func:`nullcov.statistics.projection.null_space`) or from a
stored ``P`` (a seeded randomized range finder, :func:`range_basis`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nullcov.docs import see
from nullcov.statistics.projection import spectrum_threshold

PROJECTION_FORMS = ("dense", "null", "complement")


class ConstraintError(ValueError):
    """The model and the results folder do not fit together, or the model cannot be constrained.

    Raised by :mod:`nullcov.training.constraint` and the lookups of :mod:`nullcov.training.bank`, and here for a stored
    projection that is not of its file's rank.
    """


def application_flops(dim: int, null_dim: int, rows: int = 1) -> dict[str, int]:
    """Flops of ``X P`` (``X``: ``rows`` × ``dim``) in each form of ``P = U0 U0ᵀ = I − U1 U1ᵀ``.

    ``dense``: ``X P`` (2·rows·d²); ``null``: ``(X U0) U0ᵀ`` (4·rows·d·k0); ``complement``:
    ``X − (X U1) U1ᵀ`` (4·rows·d·k1, ``k1 = d − k0``). ``rows`` scales them all alike, so the
    cheapest form depends on ``d`` and ``k0`` only (one choice per projection, for full
    fine-tuning and LoRA alike).
    """
    return {"dense": 2 * rows * dim * dim, "null": 4 * rows * dim * null_dim,
            "complement": 4 * rows * dim * (dim - null_dim)}


def cheapest_form(dim: int, null_dim: int) -> str:
    """The form of :func:`application_flops` with the fewest flops (ties: ``dense``, then ``null``)."""
    flops = application_flops(dim, null_dim)
    return min(PROJECTION_FORMS, key=flops.__getitem__)


@dataclass(frozen=True)
class FactoredProjection:
    """A null-space projection ``P`` (float32) held in the form that applies it cheapest.

    ``form``: ``dense`` (``matrix`` is ``P``, d × d), ``null`` (``matrix`` is ``U0``, d × k0,
    ``P = U0 U0ᵀ``) or ``complement`` (``matrix`` is ``U1``, d × k1, ``P = I − U1 U1ᵀ``), chosen
    by :func:`cheapest_form`. The factored forms hold at most d²/2 numbers, so they also halve
    the cache at least.
    """

    form: str
    matrix: torch.Tensor
    dim: int
    null_dim: int

    @classmethod
    def from_eigenvectors(cls, eigenvectors: torch.Tensor, below: torch.Tensor) -> FactoredProjection:
        """From an ``eigh`` (float64): the eigenvectors flagged ``below`` the threshold span ``U0``."""
        dim, null_dim = eigenvectors.shape[0], int(below.sum())
        form = cheapest_form(dim, null_dim)
        if form == "dense":  # formed from the smaller side, as nullcov.statistics.projection does
            if null_dim <= dim - null_dim:
                basis = eigenvectors[:, below]
                matrix = basis @ basis.T
            else:
                basis = eigenvectors[:, ~below]
                matrix = torch.eye(dim, dtype=basis.dtype, device=basis.device) - basis @ basis.T
        else:
            matrix = eigenvectors[:, below if form == "null" else ~below]
        return cls(form, matrix.to(torch.float32).contiguous(), dim, null_dim)

    @classmethod
    def from_projection(cls, projection: torch.Tensor, null_dim: int, device=None) -> FactoredProjection:
        """From a stored ``P`` of rank ``null_dim`` (nullcov's projection files hold ``P``, not ``U0``).

        The basis of the factored form is an orthonormal basis of the range of ``P`` (``null``)
        or of ``I − P`` (``complement``): a seeded randomized range finder with one refinement
        pass (:func:`range_basis`), float64 on ``device`` (2 products d × d × k and two QR of
        d × k, no ``eigh``).
        """
        dim = projection.shape[0]
        form = cheapest_form(dim, null_dim)
        if form == "dense":
            return cls(form, projection.to(torch.float32).contiguous(), dim, null_dim)
        side = projection.to(device=device, dtype=torch.float64)
        side = (side + side.T) / 2
        rank = null_dim
        if form == "complement":
            side = torch.eye(dim, dtype=side.dtype, device=side.device) - side
            rank = dim - null_dim
        return cls(form, range_basis(side, rank).to(torch.float32).contiguous(), dim, null_dim)

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    def to(self, device) -> FactoredProjection:
        return replace(self, matrix=self.matrix.to(device))

    def dense(self) -> torch.Tensor:
        """``P`` as a d × d float32 matrix (formed in float64 from a factored form)."""
        if self.form == "dense":
            return self.matrix
        basis = self.matrix.to(torch.float64)
        product = basis @ basis.T
        if self.form == "complement":
            product = torch.eye(self.dim, dtype=product.dtype, device=product.device) - product
        return product.to(torch.float32)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x P`` (a new float32 tensor; ``x`` float32, ``rows`` × d)."""
        if self.form == "dense":
            return x @ self.matrix
        if self.form == "null":
            return (x @ self.matrix) @ self.matrix.T
        return torch.addmm(x, x @ self.matrix, self.matrix.T, alpha=-1)

    def accumulate_(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out += x P`` in place (both float32)."""
        if self.form == "dense":
            return out.addmm_(x, self.matrix)
        if self.form == "null":
            return out.addmm_(x @ self.matrix, self.matrix.T)
        return out.add_(x).addmm_(x @ self.matrix, self.matrix.T, alpha=-1)

    def null_energy(self, x: torch.Tensor) -> float:
        """``Σ ‖x P‖²`` over the rows of ``x`` (rows × d), in float64: the inputs' energy in the null space."""
        x = x.to(torch.float64)
        matrix = self.matrix.to(device=x.device, dtype=torch.float64)
        if self.form == "complement":  # ‖x (I − U1 U1ᵀ)‖² = ‖x‖² − ‖x U1‖²
            return float(x.square().sum() - (x @ matrix).square().sum())
        return float((x @ matrix).square().sum())  # ‖x U0‖², or ‖x P‖² with P itself

    def project_(self, x: torch.Tensor) -> torch.Tensor:
        """``x ← x P`` in place (``x`` of any floating dtype; computed in float32)."""
        if x.dtype != torch.float32:
            return x.copy_(self.apply(x.to(torch.float32)))
        if self.form == "dense":
            return x.copy_(x @ self.matrix)
        if self.form == "null":
            return torch.mm(x @ self.matrix, self.matrix.T, out=x)
        return x.addmm_(x @ self.matrix, self.matrix.T, alpha=-1)


def range_basis(side: torch.Tensor, rank: int, tolerance: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis (float64, d × rank) of the range of a symmetric projection ``side`` of that rank.

    ``Q = qr(side G)`` for a seeded Gaussian ``G``, then ``Q = qr(side Q)``: the second pass
    removes what the float32 rounding of the stored matrix leaked in through an ill-conditioned
    ``U0ᵀ G`` (seen: ‖P Q − Q‖/√k = 0.0049 after one pass on a stored rank-13 ``P`` of
    ``builtin:shapes``). The rank is checked twice: ``trace(side)`` (a projection's rank) and
    ``‖side Q − Q‖`` after both passes (zero for an exact projection of that rank).
    """
    dim = side.shape[0]
    trace = float(torch.trace(side))
    if abs(trace - rank) > 0.5:
        raise ConstraintError(f"the stored projection is not a projection of rank {rank} (its trace is {trace:.2f}); "
                              f"is the file's null_dim its own?{see('stored-projection-has-the-wrong-rank')}")
    if rank == 0:
        return side.new_zeros((dim, 0))
    generator = torch.Generator(device=side.device).manual_seed(0)
    sketch = torch.randn(dim, rank, generator=generator, dtype=side.dtype, device=side.device)
    basis, _ = torch.linalg.qr(side @ sketch)
    basis, _ = torch.linalg.qr(side @ basis)  # a sketch with a small component in the range: one more pass
    residual = float(torch.linalg.matrix_norm(side @ basis - basis)) / rank ** 0.5
    if residual > tolerance:
        raise ConstraintError(f"the stored projection is not a projection of rank {rank} "
                              f"(‖P Q − Q‖/√k = {residual:.2g}); is the file's null_dim its own?"
                              f"{see('stored-projection-has-the-wrong-rank')}")
    return basis


def null_space_factor(statistic: torch.Tensor, nullspace_threshold: float | None,
                      threshold_percent: float | None = None) -> FactoredProjection:
    """The null space of a symmetric statistic as a :class:`FactoredProjection` (on the statistic's device).

    The torch twin of :func:`nullcov.statistics.projection.null_space` (same symmetrisation and threshold
    rule, :func:`nullcov.statistics.projection.spectrum_threshold`), so it runs on the training device; the
    ``eigh`` (float64) gives the basis of the factored form directly.
    """
    matrix = statistic.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    threshold = spectrum_threshold(eigenvalues.cpu().numpy(), nullspace_threshold, threshold_percent)
    return FactoredProjection.from_eigenvectors(eigenvectors, eigenvalues < threshold)
