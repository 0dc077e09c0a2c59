"""Snakemake adapter: NullBooth's covariance_matrices layout (nullcov.training.export.export_nullbooth)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.layout import step_name
from nullcov.models.schedule import read_schedule
from nullcov.training.export import export_nullbooth

with logging_to(snakemake.log[0]):
    layers = read_schedule(snakemake.input.schedule)["layers"]
    export_nullbooth(
        {step_name(path): path for path in snakemake.input.steps},
        snakemake.output[0],
        snakemake.params.statistic,
        layers,
        text_file=snakemake.input.text[0] if snakemake.input.text else None,
        step_names=snakemake.params.step_names,
    )
