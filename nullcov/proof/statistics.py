"""The statistics the fine-tune proof compares, made in process as the workflow's rules make them.

In the workflow, rules make every file the plan declares (:class:`nullcov.proof.plan.ProofPlan`;
rules/finetune.smk): the other CFG-branch setting's statistics (``proof_features``: the feature
job on the same prompts, seeds and schedule, one shard; ``proof_covariance``: the merge) and the
projections at each compared setting the run did not make (``proof_projection``), and the proof
job only reads them. Without Snakemake (the tests, a notebook), :func:`make_planned_files` makes
the missing ones with the same package functions (:func:`nullcov.collection.features.run_feature_job`,
:func:`nullcov.statistics.jobs.merge_job`, :func:`nullcov.statistics.jobs.projection_job`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nullcov.layout import TEXT_NAME, Results, step_file, step_name
from nullcov.proof.plan import UNCONDITIONAL_BRANCH, ProofPlan

log = logging.getLogger(__name__)

#: The one shard of statistics the proof collects itself (rule ``proof_features``: every prompt, first index 0).
SHARD = "0000"


def collect_statistics(results: Results, *, model_spec: str, model_dir: str, prompts: list[str], schedule: dict,
                       config: dict) -> None:
    """The merged moments of ``prompts`` (one shard, first index 0) under ``config`` in ``results``
    (its shard ``0000`` and ``covariance/``): rules ``features`` or ``proof_features``, then the merges."""
    from nullcov.collection.features import run_feature_job
    from nullcov.prompts import prompt_set_sha256
    from nullcov.statistics.jobs import merge_job

    names = [step["name"] for step in schedule["steps"]]
    shard = results.shard(SHARD)
    log.info("collecting statistics of %d prompts with unconditional_branch=%s", len(prompts),
             config["unconditional_branch"])
    run_feature_job(model_spec=model_spec, model_dir=model_dir, prompts=prompts, first_index=0, shard=SHARD,
                    schedule=schedule, config=config,
                    step_paths={name: str(step_file(shard, name)) for name in names},
                    text_path=str(step_file(shard, TEXT_NAME)))
    for name in [*names, TEXT_NAME]:
        merge_job([step_file(shard, name)], results.covariance(name), prompt_set_sha256(prompts))


def make_planned_files(plan: ProofPlan, *, model_spec: str, model_dir: str, prompts: list[str], schedule: dict,
                       config: dict) -> list[Path]:
    """Every merged moments and projection file ``plan`` declares that is missing, made in process:
    a setting's statistics (:func:`collect_statistics` with the setting's CFG branches, in the
    results folder its ``covariance/`` files are in), then its projections at its statistic and
    threshold. ``config``: the run's feature config. Returns the files made."""
    from nullcov.statistics.jobs import projection_job

    made = []
    for setting in plan.compared:
        missing = [Path(path) for path in setting.covariance if not Path(path).is_file()]
        if missing:
            branches = {"unconditional_branch": UNCONDITIONAL_BRANCH[setting.branches]}
            collect_statistics(Results(missing[0].parent.parent), model_spec=model_spec, model_dir=model_dir,
                               prompts=prompts, schedule=schedule, config=config | branches)
            made += missing
        for projection in map(Path, setting.projections):
            if not projection.is_file():
                projection_job(setting.file("covariance", step_name(projection)), projection, setting.statistic,
                               setting.nullspace_threshold, setting.threshold_percent)
                made.append(projection)
    return made
