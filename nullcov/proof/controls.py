"""The fine-tune proof's control: projections of the same rank as the real ones, onto random subspaces.

A projected fine-tune that preserves could do so because of *which* directions it keeps (the null
space of the preserved prompts' inputs) or merely because it keeps *fewer* of them. The control run
(``random-projected``, ``random-projected-kv``; :func:`nullcov.proof.plan.repeated_runs`) trains
exactly as its projected variant does, but :class:`RandomSubspaces` replaces every projection ``P``
(rank ``null_dim``) by ``Q Qᵀ``, ``Q`` a random orthonormal basis of the same rank (QR of a seeded
Gaussian matrix): the same number of free directions, none chosen by the statistics.
"""

from __future__ import annotations

import hashlib

import torch

from nullcov.models.family import TEXT_KEY
from nullcov.training.factored_projection import FactoredProjection


class RandomSubspaces:
    """Stands in for a :class:`nullcov.training.bank.ProjectionBank` (``constraint.lookup``): each
    projection the wrapped bank gives becomes a random one of the same rank and width.

    The random basis is a function of the seed, the linear's key and the real projection (its
    bytes), so the same real ``P`` (one scheduled step, or one union of steps) always gets the
    same random ``P``, in every call and process.
    """

    def __init__(self, bank, seed: int):
        self.bank, self.seed = bank, seed
        self._random: dict[tuple[str, str], FactoredProjection] = {}
        #: ``id`` of a real projection seen before -> (it, kept alive so the id is not reused; its stand-in):
        #: the bank returns its cached objects, so a training step hashes nothing
        self._seen: dict[int, tuple[FactoredProjection, FactoredProjection]] = {}

    @property
    def step_keys(self) -> list[str]:
        return self.bank.step_keys

    @property
    def text_factors(self) -> dict[str, FactoredProjection]:
        # a UNet's one text projection keeps the label "text" its random stand-in has always been seeded with
        return {key: self.replace("text" if key == TEXT_KEY else key, factor)
                for key, factor in self.bank.text_factors.items()}

    @property
    def text_factor(self) -> FactoredProjection | None:
        return self.text_factors.get(TEXT_KEY)

    def factors(self, timesteps) -> dict[str, FactoredProjection]:
        return {key: self.replace(key, factor) for key, factor in self.bank.factors(timesteps).items()}

    def replace(self, key: str, factor: FactoredProjection) -> FactoredProjection:
        """The random stand-in of ``factor`` (the projection of ``key``)."""
        seen = self._seen.get(id(factor))
        if seen is not None and seen[0] is factor:
            return seen[1]
        digest = hashlib.sha256(factor.matrix.detach().cpu().numpy().tobytes()).hexdigest()
        found = self._random.get((key, digest))
        if found is None:
            found = self._random[(key, digest)] = random_projection(
                factor.dim, factor.null_dim, f"{self.seed}/{key}/{digest}", factor.matrix.device)
        self._seen[id(factor)] = (factor, found)
        return found


def random_projection(dim: int, rank: int, label: str, device=None) -> FactoredProjection:
    """``Q Qᵀ`` with ``Q`` (``dim`` x ``rank``) a random orthonormal basis seeded by ``label``."""
    seed = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little") >> 1
    gaussian = torch.randn((dim, rank), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis = torch.linalg.qr(gaussian).Q if rank else gaussian
    return FactoredProjection("null", basis.to(torch.float32).contiguous().to(device), dim, rank)
