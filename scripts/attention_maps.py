"""Snakemake adapter: cross-attention maps of a few prompts (nullcov.report.attention.run_attention_job)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.models.schedule import read_schedule
from nullcov.report.attention import run_attention_job
from nullcov.report.plotting import keep_matplotlib_cache_in_workdir

RUN_KEYS = ("batch_size", "device")

with logging_to(snakemake.log[0]):
    keep_matplotlib_cache_in_workdir()
    run_attention_job(
        model_dir=snakemake.params.model_dir,
        prompts=list(snakemake.params.prompts),
        prompt_indices=list(snakemake.params.prompt_indices),
        schedule=read_schedule(snakemake.input.schedule),
        config=dict(snakemake.params.config) | {key: snakemake.config[key] for key in RUN_KEYS},
        layer_selection=snakemake.params.layers,
        step_indices=list(snakemake.params.step_indices),
        figure_paths={(index, name): path for index, name, path in snakemake.params.figure_paths},
        data_path=snakemake.output.data,
        threads=snakemake.threads,
    )
