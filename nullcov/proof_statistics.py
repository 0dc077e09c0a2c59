"""The projections the fine-tune proof compares: one results folder per (branches, statistic, threshold).

The run's own statistics (``results/covariance``) give every statistic and threshold: the
projection job itself (:func:`nullcov.jobs.projection_job`) recomputes ``P`` into a scratch folder
beside a link to the run's ``schedule.json`` and ``covariance/``. The other CFG-branch setting
(``unconditional_branch`` flipped) needs other statistics: :func:`collect_statistics` runs the
feature job on the same prompts, seeds and schedule in process, then the merge.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nullcov.proof_plan import threshold_label

log = logging.getLogger(__name__)


def collect_statistics(folder: Path, *, model_spec: str, model_dir: str, prompts: list[str], schedule: dict,
                       config: dict) -> Path:
    """``folder/schedule.json`` and ``folder/covariance/`` for ``prompts`` (one shard) under ``config``."""
    import json

    from nullcov.features import run_feature_job
    from nullcov.jobs import merge_job
    from nullcov.prompts import prompt_set_sha256

    names = [step["name"] for step in schedule["steps"]]
    shard = folder / "features" / "shard_0000"
    (folder / "covariance").mkdir(parents=True, exist_ok=True)
    (folder / "schedule.json").write_text(json.dumps(schedule))
    log.info("collecting statistics of %d prompts with unconditional_branch=%s", len(prompts),
             config["unconditional_branch"])
    run_feature_job(model_spec=model_spec, model_dir=model_dir, prompts=prompts, first_index=0, shard="0000",
                    schedule=schedule, config=config, step_paths={name: str(shard / f"{name}.h5") for name in names},
                    text_path=str(shard / "text.h5"))
    for name in [*names, "text"]:
        merge_job([shard / f"{name}.h5"], folder / "covariance" / f"{name}.h5", prompt_set_sha256(prompts))
    return folder


def project_statistics(statistics_dir: Path, folder: Path, statistic: str, nullspace_threshold: float,
                       threshold_percent: float | None) -> Path:
    """A results folder whose projections are ``statistics_dir``'s statistics at this setting."""
    from nullcov.jobs import projection_job

    statistics_dir = Path(statistics_dir).resolve()
    (folder / "projections").mkdir(parents=True, exist_ok=True)
    for name in ("schedule.json", "covariance"):
        (folder / name).symlink_to(statistics_dir / name)
    for covariance in sorted((statistics_dir / "covariance").glob("*.h5")):
        projection_job(covariance, folder / "projections" / covariance.name, statistic, nullspace_threshold,
                       threshold_percent)
    return folder


def projection_folders(scratch: Path, statistics_dirs: dict[str, Path], statistics: list[str],
                       thresholds: list[tuple[float, float | None]]) -> dict[tuple[str, str, str], Path]:
    """``{(branches, statistic, threshold label): results folder}`` for every combination."""
    folders = {}
    for branches, statistics_dir in statistics_dirs.items():
        for statistic in statistics:
            for absolute, percent in thresholds:
                label = threshold_label(absolute, percent)
                folder = Path(scratch) / f"{branches}-{statistic}-{label}"
                folders[(branches, statistic, label)] = project_statistics(statistics_dir, folder, statistic,
                                                                           absolute, percent)
    return folders
