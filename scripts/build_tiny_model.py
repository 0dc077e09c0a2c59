"""Snakemake adapter: build an embedded tiny model of one family (nullcov.models.tiny_model)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.joblog import logging_to
from nullcov.models.tiny_model import build_tiny_model

with logging_to(snakemake.log[0]):
    build_tiny_model(snakemake.output[0], snakemake.params.family)
