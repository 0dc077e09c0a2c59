"""Training and exports: what a trainer uses the projections for.

Owns the projection lookup by timestep (:mod:`.bank`), the factored projections of a training
step (:mod:`.factored_projection`), the null-space-constrained fine-tune (:mod:`.constraint`:
``NullSpaceConstraint``, full and LoRA) and the exports for other trainers (:mod:`.export`).
``from nullcov.training import NullSpaceConstraint, ProjectionBank`` works (imported on first use,
so the parse-time importers of :mod:`.export` never import torch).

May import: the top-level modules, :mod:`nullcov.models`, :mod:`nullcov.statistics` and
:mod:`nullcov.collection`.
"""

_PUBLIC = {"NullSpaceConstraint": "nullcov.training.constraint", "ProjectionBank": "nullcov.training.bank"}


def __getattr__(name):
    """``NullSpaceConstraint`` and ``ProjectionBank``, imported on first use (PEP 562)."""
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nullcov.training' has no attribute {name!r}")
