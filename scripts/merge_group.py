"""Snakemake adapter: partial sums over one group of shards, all steps (nullcov.statistics.jobs.merge_group_job)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.statistics.jobs import merge_group_job

with logging_to(snakemake.log[0]):
    merge_group_job(list(snakemake.input), snakemake.output[0], snakemake.params.file_names)
