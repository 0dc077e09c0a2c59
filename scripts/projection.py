"""Snakemake adapter: null-space projections of one timestep (nullcov.statistics.jobs.projection_job)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.statistics.jobs import projection_job

with logging_to(snakemake.log[0]):
    projection_job(
        snakemake.input[0],
        snakemake.output[0],
        snakemake.params.statistic,
        snakemake.params.nullspace_threshold,
        snakemake.params.threshold_percent,
    )
