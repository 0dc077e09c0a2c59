"""Snakemake adapter: null-space projections of one timestep (nullcov.jobs.projection_job)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.jobs import logging_to, projection_job

with logging_to(snakemake.log[0]):
    projection_job(
        snakemake.input[0],
        snakemake.output[0],
        snakemake.params.statistic,
        snakemake.params.nullspace_threshold,
        snakemake.params.threshold_percent,
    )
