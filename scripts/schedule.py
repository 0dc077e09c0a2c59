"""Snakemake adapter: write results/schedule.json (nullcov.jobs.write_schedule)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.jobs import logging_to, write_schedule

with logging_to(snakemake.log[0]):
    write_schedule(
        snakemake.output[0],
        snakemake.params.scheduler_config,
        snakemake.params.strategy,
        snakemake.params.num_steps,
        snakemake.params.model,
        snakemake.params.model_dir,
        snakemake.params.layers,
    )
