"""Snakemake adapter: merge one timestep's moments of every shard or group (nullcov.statistics.jobs.merge_job)."""
import sys
from pathlib import Path

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.statistics.jobs import merge_job

with logging_to(snakemake.log[0]):
    # The step's file (params.file_name, nullcov.layout.step_file_name) in every shard's or group's folder.
    input_files = [str(Path(folder, snakemake.params.file_name)) for folder in snakemake.input]
    merge_job(input_files, snakemake.output[0], snakemake.params.prompt_sha256, snakemake.params.kind)
