"""Snakemake adapter: the model's training curve from its training.json (nullcov.report.figures_training_curve)."""
import sys

sys.path.insert(0, f"{snakemake.scriptdir}/..")

from nullcov.files import read_json
from nullcov.joblog import logging_to
from nullcov.report.figures_training_curve import training_curve_figure
from nullcov.report.plotting import keep_matplotlib_cache_in_workdir

with logging_to(snakemake.log[0]):
    keep_matplotlib_cache_in_workdir()
    training_curve_figure(snakemake.output[0], read_json(snakemake.input.record))
