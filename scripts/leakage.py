"""Snakemake adapter: leakage of random projected updates for a chunk of steps (nullcov.report.validation)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.models.schedule import read_schedule
from nullcov.report.validation import leakage_job

with logging_to(snakemake.log[0]):
    leakage_job(
        names=list(snakemake.params.names),
        covariance_paths=list(snakemake.input.covariance),
        projection_paths=list(snakemake.input.projections),
        validation_dir=snakemake.input.validation,
        output_path=snakemake.output[0],
        schedule=read_schedule(snakemake.input.schedule),
        statistic=snakemake.params.statistic,
        thresholds=list(snakemake.params.thresholds),
        updates=snakemake.params.updates,
        seed=snakemake.params.seed,
    )
