"""The results folder's layout: where each stage writes its files, how a statistic is keyed inside
them, and the provenance entry a projection file carries.

One place for what the rules declare (``rules/*.smk`` build their paths from these names) and
what the package reads (:class:`Results`): a reader given a results folder asks this module for a
file instead of joining path parts itself.

::

    results/
      schedule.json                 the timestep schedule (rule schedule)
      features/shard_<i>/<step>.h5  per-shard sums (rule features; scratch)
      partial/group_<g>/<step>.h5   per-group partial sums (rule merge_group; scratch)
      covariance/<step>.h5          merged moments per step, and text.h5 (rule merge)
      projections/<step>.h5         null-space projections per step, and text.h5 (rule projection)
      validation/                   leakage check (rules validation_*)
      export/                       trainer formats (rules export_*)
      report/                       figures, tables, the fine-tune proof (rules report_*, finetune_proof)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: File name (without ``.h5``) of the text states' statistics, collected once per prompt.
TEXT_NAME = "text"
SCHEDULE = "schedule.json"
COVARIANCE = "covariance"
PROJECTIONS = "projections"
FEATURES = "features"
PARTIAL = "partial"
REPORT = "report"
VALIDATION = "validation"
EXPORT = "export"
FINETUNE = f"{REPORT}/finetune"
#: The attribute of a projection file's provenance that holds the settings that made it.
PROJECTION_ENTRY = "projection"


def statistic_key(layer: str, linear: str) -> str:
    """The key of one linear's statistic inside a step file: ``<layer>/<linear>``."""
    return f"{layer}/{linear}"


def split_key(key: str) -> tuple[str, str]:
    """``(layer, linear)`` of a :func:`statistic_key` (the layer holds dots, never ``/``)."""
    layer, _, linear = key.rpartition("/")
    if not layer:
        raise ValueError(f"statistic key {key!r} is not '<layer>/<linear>'")
    return layer, linear


def projection_settings(statistic: str, nullspace_threshold: float, threshold_percent: float | None) -> dict:
    """The provenance entry (:data:`PROJECTION_ENTRY`) of a projection file."""
    return {"statistic": statistic, "nullspace_threshold": nullspace_threshold,
            "threshold_percent": threshold_percent}


def shard_folder(shard: int | str) -> str:
    return f"{FEATURES}/shard_{shard}"


def group_folder(group: int | str) -> str:
    group = f"{group:04d}" if isinstance(group, int) else group
    return f"{PARTIAL}/group_{group}"


@dataclass(frozen=True)
class Results:
    """A results folder (``results/`` of a run, or any folder laid out the same way)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def schedule(self) -> Path:
        return self.root / SCHEDULE

    def covariance(self, name: str) -> Path:
        """Merged moments of one step (or :data:`TEXT_NAME`)."""
        return self.root / COVARIANCE / f"{name}.h5"

    def projection(self, name: str) -> Path:
        """Null-space projections of one step (or :data:`TEXT_NAME`)."""
        return self.root / PROJECTIONS / f"{name}.h5"

    @property
    def covariance_folder(self) -> Path:
        return self.root / COVARIANCE

    @property
    def projections_folder(self) -> Path:
        return self.root / PROJECTIONS

    def finetune(self, *parts: str) -> Path:
        """A file of the fine-tune proof's outputs."""
        return self.root.joinpath(FINETUNE, *parts)
