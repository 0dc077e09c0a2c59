"""Snakemake adapter: one safetensors file of every projection (nullcov.training.export.export_safetensors)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.training.export import export_safetensors

with logging_to(snakemake.log[0]):
    export_safetensors(
        snakemake.input.schedule,
        dict(zip(snakemake.params.names, snakemake.input.projections, strict=True)),
        snakemake.output[0],
    )
