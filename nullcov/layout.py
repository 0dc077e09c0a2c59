"""The results folder's layout: where each stage writes its files, and the provenance entry a
projection file carries.

One place for what the rules declare (``rules/*.smk`` build their paths from these names) and
what the package reads (:class:`Results`): a reader given a results folder asks this module for a
file instead of joining path parts itself.

::

    results/
      schedule.json                 the timestep schedule (rule schedule)
      plan.txt                      the run plan (rule plan, `snakemake plan` only)
      features/shard_<i>/<step>.h5  per-shard sums, and text.h5 (rule features; scratch)
      partial/group_<g>/<step>.h5   per-group partial sums, and text.h5 (rule merge_group; scratch)
      covariance/<step>.h5          merged moments per step, and text.h5 (rules covariance, covariance_text)
      projections/<step>.h5         null-space projections per step, and text.h5 (rules projection, projection_text)
      validation/features/<step>.h5 the validation prompts' sums (rule validation_inputs)
      validation/                   leakage check (rules leakage, validation_report)
      export/                       trainer formats (rules export_*)
      report/                       figures, tables, the fine-tune proof (rules report_*, finetune_proof)
      proof/statistics/<branches>/  the fine-tune proof's statistics of the other CFG-branch setting:
                                    features/shard_0000/ (rule proof_features; scratch), covariance/<step>.h5
                                    (rules proof_covariance, proof_covariance_text)
      proof/projections/<branches>/<statistic>/<threshold>/<step>.h5
                                    projections of a setting the proof compares that the run did not make
                                    (rules proof_projection, proof_projection_text)

Inside every ``<step>.h5`` a statistic is keyed :func:`nullcov.models.family.statistic_key`
(``<layer>/<linear>``), the text states once under :data:`nullcov.models.family.TEXT_KEY`: what a
model family hooks and how it is keyed is the family's vocabulary (:mod:`nullcov.models.family`).
Importing this module is cheap (no numpy, no torch): the Snakefile imports it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The workflow's results folder, relative to its working directory.
ROOT = "results"
#: File name (without ``.h5``) of the text states' statistics, collected once per prompt.
TEXT_NAME = "text"
#: Suffix of every step file (moments or projections).
STEP_SUFFIX = ".h5"
SCHEDULE = "schedule.json"
PLAN = "plan.txt"
COVARIANCE = "covariance"
PROJECTIONS = "projections"
FEATURES = "features"
PARTIAL = "partial"
REPORT = "report"
VALIDATION = "validation"
VALIDATION_FEATURES = f"{VALIDATION}/{FEATURES}"
EXPORT = "export"
#: Folder name prefixes of the scratch folders: ``shard_<i>`` (feature jobs), ``group_<g>`` (merge groups).
SHARD_PREFIX = "shard_"
GROUP_PREFIX = "group_"
FINETUNE = f"{REPORT}/finetune"
#: A fine-tune proof variant's attn2 weights, in ``<FINETUNE>/<variant>/``.
FINETUNE_WEIGHTS = "unet_attn2.safetensors"
#: An SD3/FLUX fine-tune's trained linears' weights (:mod:`nullcov.proof.flow`), in ``<out>/<variant>/``.
FINETUNE_TRANSFORMER_WEIGHTS = "transformer_linears.safetensors"
#: The fine-tune proof's own statistics and projections (rules/finetune.smk).
PROOF = "proof"
#: The attribute of a projection file's provenance that holds the settings that made it.
PROJECTION_ENTRY = "projection"


def projection_settings(statistic: str, nullspace_threshold: float, threshold_percent: float | None) -> dict:
    """The provenance entry (:data:`PROJECTION_ENTRY`) of a projection file."""
    return {"statistic": statistic, "nullspace_threshold": nullspace_threshold,
            "threshold_percent": threshold_percent}


def step_file_name(name: str) -> str:
    """The file of one step (or :data:`TEXT_NAME`) in any folder of step files: ``<name>.h5``."""
    return f"{name}{STEP_SUFFIX}"


def step_file(folder: str | Path, name: str) -> Path:
    """One step's (or :data:`TEXT_NAME`'s) file inside a folder of step files: a shard's, a group's,
    ``covariance/``, ``projections/`` or ``validation/features/``."""
    return Path(folder) / step_file_name(name)


def step_name(path: str | Path) -> str:
    """The step name (or :data:`TEXT_NAME`) of a step file: the inverse of :func:`step_file`."""
    path = Path(path)
    if path.suffix != STEP_SUFFIX:
        raise ValueError(f"{path} is not a step file (<name>{STEP_SUFFIX})")
    return path.stem


def shard_folder(shard: int | str) -> str:
    """A feature job's folder (``shard``: ``0000``, or an index), relative to the results folder."""
    shard = f"{shard:04d}" if isinstance(shard, int) else shard
    return f"{FEATURES}/{SHARD_PREFIX}{shard}"


def group_folder(group: int | str) -> str:
    """A merge group's folder of partial sums, relative to the results folder."""
    group = f"{group:04d}" if isinstance(group, int) else group
    return f"{PARTIAL}/{GROUP_PREFIX}{group}"


@dataclass(frozen=True)
class Results:
    """A results folder (``results/`` of a run, or any folder laid out the same way).

    Every path is a :class:`~pathlib.Path` under :attr:`root`; a name may be a Snakemake
    wildcard (``Results("results").projection("{name}")`` is the projection rule's output).
    """

    root: Path

    def __init__(self, root: str | Path = ROOT):
        object.__setattr__(self, "root", Path(root))

    @property
    def schedule(self) -> Path:
        return self.root / SCHEDULE

    @property
    def plan(self) -> Path:
        return self.root / PLAN

    def covariance(self, name: str) -> Path:
        """Merged moments of one step (or :data:`TEXT_NAME`)."""
        return step_file(self.covariance_folder, name)

    def projection(self, name: str) -> Path:
        """Null-space projections of one step (or :data:`TEXT_NAME`)."""
        return step_file(self.projections_folder, name)

    @property
    def covariance_folder(self) -> Path:
        return self.root / COVARIANCE

    @property
    def projections_folder(self) -> Path:
        return self.root / PROJECTIONS

    @property
    def features_folder(self) -> Path:
        """The feature jobs' shard folders' parent (scratch)."""
        return self.root / FEATURES

    def shard(self, shard: int | str) -> Path:
        """A feature job's folder of step files (:func:`shard_folder`)."""
        return self.root / shard_folder(shard)

    def group(self, group: int | str) -> Path:
        """A merge group's folder of partial sums (:func:`group_folder`)."""
        return self.root / group_folder(group)

    @property
    def validation_features(self) -> Path:
        """The validation prompts' folder of step files (rule ``validation_inputs``)."""
        return self.root / VALIDATION_FEATURES

    def validation(self, *parts: str) -> Path:
        """A file of the leakage check (tables)."""
        return self.root.joinpath(VALIDATION, *parts)

    def export(self, *parts: str) -> Path:
        """An export for another trainer."""
        return self.root.joinpath(EXPORT, *parts)

    def report(self, *parts: str) -> Path:
        """A figure or table of the report."""
        return self.root.joinpath(REPORT, *parts)

    def finetune(self, *parts: str) -> Path:
        """A file of the fine-tune proof's outputs."""
        return self.root.joinpath(FINETUNE, *parts)

    def proof_statistics(self, branches: str) -> Results:
        """The fine-tune proof's statistics of one CFG-branch setting (``conditional``, ``both``) that
        the run did not collect: a results folder of its own (its :meth:`shard` ``0000`` and
        :meth:`covariance`)."""
        return Results(self.root / PROOF / "statistics" / branches)

    def proof_projection(self, branches: str, statistic: str, threshold: str, name: str) -> Path:
        """A projection of one step (or :data:`TEXT_NAME`) at a setting the fine-tune proof compares
        (``threshold``: its label, ``0.02`` or ``p50``) that the run's own projections are not made with."""
        return step_file(self.root / PROOF / "projections" / branches / statistic / threshold, name)


class DeclaredFiles:
    """A run's files given one by one, as a rule declares them, read like a results folder
    (:class:`Results`): the schedule, and each step's (and :data:`TEXT_NAME`'s) merged moments and
    projections, named by their file names (:func:`step_name`). A step whose file was not declared
    has None.
    """

    def __init__(self, schedule: str | Path, covariance=(), projections=()):
        self.schedule = Path(schedule)
        self._covariance = {step_name(path): Path(path) for path in covariance}
        self._projections = {step_name(path): Path(path) for path in projections}

    def covariance(self, name: str) -> Path | None:
        """Merged moments of one step (or :data:`TEXT_NAME`), None if not declared."""
        return self._covariance.get(name)

    def projection(self, name: str) -> Path | None:
        """Null-space projections of one step (or :data:`TEXT_NAME`), None if not declared."""
        return self._projections.get(name)

    def __str__(self) -> str:
        return f"the declared files of {self.schedule}"
