"""The projections the fine-tune proof compares: one results folder per (branches, statistic, threshold).

The run's own statistics come as files (:class:`StatisticsFiles`: the finetune rule's declared
schedule, merged moments and projections, or those of a results folder). They give every
statistic and threshold: each setting gets a scratch results folder (:class:`nullcov.layout.Results`)
that links the schedule and the merged moments, and either links the run's projections (when
their provenance records this very setting) or has the projection job itself
(:func:`nullcov.statistics.jobs.projection_job`) recompute ``P``. The other CFG-branch setting
(``unconditional_branch`` flipped) needs other statistics: :func:`collect_statistics` runs the
feature job on the same prompts, seeds and schedule in process, then the merge.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from nullcov.layout import (
    PROJECTION_ENTRY,
    STEP_SUFFIX,
    TEXT_NAME,
    Results,
    projection_settings,
    step_file,
    step_name,
)
from nullcov.proof.plan import threshold_label

log = logging.getLogger(__name__)

#: The one shard of statistics the proof collects itself.
SHARD = "0000"


@dataclass(frozen=True)
class StatisticsFiles:
    """One set of statistics as files: the schedule, the merged moments per step name (and
    :data:`~nullcov.layout.TEXT_NAME`), and any projections already made from them."""

    schedule: Path
    covariance: dict[str, Path]
    projections: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def declared(cls, schedule, covariance_paths, projection_paths=()) -> StatisticsFiles:
        """From a rule's declared inputs (each file's name is its step's, :func:`nullcov.layout.step_name`)."""
        return cls(Path(schedule), {step_name(path): Path(path) for path in covariance_paths},
                   {step_name(path): Path(path) for path in projection_paths})

    @classmethod
    def in_folder(cls, results_dir) -> StatisticsFiles:
        """Every merged moments file of a results folder, its schedule, and the projections beside them."""
        results = Results(results_dir)
        names = [step_name(path) for path in sorted(results.covariance_folder.glob(f"*{STEP_SUFFIX}"))]
        return cls(results.schedule, {name: results.covariance(name) for name in names},
                   {name: results.projection(name) for name in names if results.projection(name).is_file()})


def collect_statistics(folder: Path, *, model_spec: str, model_dir: str, prompts: list[str], schedule: dict,
                       config: dict) -> StatisticsFiles:
    """``folder`` laid out as a results folder (schedule, one shard, merged moments) for ``prompts``
    (one shard) under ``config``."""
    from nullcov.collection.features import run_feature_job
    from nullcov.prompts import prompt_set_sha256
    from nullcov.statistics.jobs import merge_job

    results = Results(folder)
    names = [step["name"] for step in schedule["steps"]]
    shard = results.shard(SHARD)
    results.covariance_folder.mkdir(parents=True, exist_ok=True)
    results.schedule.write_text(json.dumps(schedule))
    log.info("collecting statistics of %d prompts with unconditional_branch=%s", len(prompts),
             config["unconditional_branch"])
    run_feature_job(model_spec=model_spec, model_dir=model_dir, prompts=prompts, first_index=0, shard=SHARD,
                    schedule=schedule, config=config,
                    step_paths={name: str(step_file(shard, name)) for name in names},
                    text_path=str(step_file(shard, TEXT_NAME)))
    for name in [*names, TEXT_NAME]:
        merge_job([step_file(shard, name)], results.covariance(name), prompt_set_sha256(prompts))
    return StatisticsFiles(results.schedule, {name: results.covariance(name) for name in [*names, TEXT_NAME]})


def made_with(projection_path: Path, settings: dict) -> bool:
    """Whether a projection file's provenance records these settings (:func:`nullcov.layout.projection_settings`)."""
    from nullcov.statistics.store import read_attrs

    return read_attrs(projection_path, "projection")["provenance"].get(PROJECTION_ENTRY) == settings


def project_statistics(statistics: StatisticsFiles, folder: Path, statistic: str, nullspace_threshold: float,
                       threshold_percent: float | None) -> Path:
    """A results folder whose projections are ``statistics``' at this setting: the stored ones when
    they were made with it, else recomputed."""
    from nullcov.statistics.jobs import projection_job

    results = Results(folder)
    results.covariance_folder.mkdir(parents=True, exist_ok=True)
    results.projections_folder.mkdir(parents=True, exist_ok=True)
    results.schedule.symlink_to(Path(statistics.schedule).resolve())
    settings = projection_settings(statistic, nullspace_threshold, threshold_percent)
    for name, covariance in sorted(statistics.covariance.items()):
        results.covariance(name).symlink_to(Path(covariance).resolve())
        made = statistics.projections.get(name)
        if made is not None and made_with(made, settings):
            results.projection(name).symlink_to(Path(made).resolve())
        else:
            projection_job(covariance, results.projection(name), statistic, nullspace_threshold, threshold_percent)
    return folder


def projection_folders(scratch: Path, statistics_files: dict[str, StatisticsFiles],
                       settings: list[tuple[str, str, str]],
                       thresholds: list[tuple[float, float | None]]) -> dict[tuple[str, str, str], Path]:
    """``{(branches, statistic, threshold label): results folder}`` for each of ``settings``
    (:func:`nullcov.proof.plan.compared_settings`); ``thresholds``: the (absolute, percent) values
    behind the labels."""
    values = {threshold_label(*setting): setting for setting in thresholds}
    folders = {}
    for branches, statistic, label in settings:
        folder = Path(scratch) / f"{branches}-{statistic}-{label}"
        folders[(branches, statistic, label)] = project_statistics(statistics_files[branches], folder, statistic,
                                                                   *values[label])
    return folders
